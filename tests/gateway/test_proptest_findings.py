"""Regressions found by property-based differential testing of send-body rewriting."""
from __future__ import annotations

import pytest

from services.gateway import sending
from shared import macros


@pytest.mark.parametrize("blank", ["\u00a0", "\u2003", "\u3000", "\u202f"])
def test_send_id_with_a_unicode_blank_is_read_in_a_body_as_in_a_destination(blank: str) -> None:
    """README: "{{sendId}} in a body is read as in a destination: any case, blanks inside the
    braces". A destination reads {{<NBSP>sendId}} as the message id (shared.macros); a body left
    it as written (SEND_ID_RE's \\s was ASCII-only), so the SMS went out with the raw macro."""
    macro = "{{" + blank + "sendId" + blank + "}}"
    assert macros.parse(f"https://lp.example/?m={macro}").names == ("sendid",)
    record = sending.SendRecord(index=0, to="+14155551234", list_id=1, list_number=None, body=f"Ref {macro} STOP",
                                offer_ref=None, creative_id=None, schedule_id=None, message_id="Mid12345")
    cut = sending.cut_bodies([record.body], {})[record.body]
    sending._fill(record, {}, cut, [])
    assert record.final_body == "Ref Mid12345 STOP"


def test_a_lookalike_send_id_is_still_left_as_written() -> None:
    # The non-ASCII letters the ASCII flag kept out must stay out.
    for body in ("{{send\u0131d}}", "{{\u017fendId}}", "{{SEND\u0130D}}", "{sendId}"):
        assert not sending.SEND_ID_RE.search(body), body
