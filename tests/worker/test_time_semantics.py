"""Attribution's window against the times clients give, in every form they may give them."""
from __future__ import annotations

from datetime import timedelta

from tests.helpers import make_offer
from tests.worker.test_attribution import T0, clicked_message, conversion, postback


async def test_a_conversion_a_fraction_of_a_microsecond_before_the_clicks_second_is_before_it(
        api, db, tenant, run_worker):
    # The click at T0 + 0.3 s counts from T0 (its {datetime}); 11:59:59.9999999 is before it, given
    # as ISO 8601 or as unix seconds alike (rounded, the unix form reached T0 and was credited).
    offer = await make_offer(api, tenant, payout=2)
    second_before = int(T0.timestamp()) - 1
    stamps = {"iso": "2026-03-01T11:59:59.9999999Z", "unix": f"{second_before}.9999999",
              "unix-ms": f"{second_before}999.9999", "in-its-second": f"{second_before + 1}.0000001"}
    for key, stamp in stamps.items():
        _, _, click_id = await clicked_message(api, db, tenant, offer=offer, at=T0 + timedelta(milliseconds=300))
        assert await postback(api, tenant, click_id=click_id, conversion_id=key, timestamp=stamp) == "accepted"
    await run_worker()
    verdicts = {key: (await conversion(db, tenant, key))["unattributed_reason"] for key in stamps}
    assert verdicts == {"iso": "before_click", "unix": "before_click", "unix-ms": "before_click", "in-its-second": None}
