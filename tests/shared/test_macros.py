"""Macro filling (shared/macros.py): pure functions, so plain unit tests."""
from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from shared import macros


def values(**overrides: object) -> dict[str, str]:
    base = dict(
        click_id="c" * 32, offer_id="o" * 24, account_id=7, affiliate_id="aff9",
        query={"sub1": "s1", "sub2": "s2", "sub3": "s3", "sub4": "s4", "sub5": "s5",
               "source": "sms", "creative": "cr1", "cost": "0.05"},
        ip="203.0.113.9", user_agent="Mozilla/5.0 (iPhone)", datetime="2026-11-23T01:02:03Z",
        country_code="GB", message_id="Msg12345",
    )
    base.update(overrides)
    return macros.click_values(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("macro", "expected"),
    [
        ("{click_id}", "c" * 32),
        ("{transaction_id}", "c" * 32),
        ("{affiliate_id}", "aff9"),
        ("{offer_id}", "o" * 24),
        ("{account_id}", "7"),
        ("{sub1}", "s1"), ("{sub2}", "s2"), ("{sub3}", "s3"), ("{sub4}", "s4"), ("{sub5}", "s5"),
        ("{source}", "sms"),
        ("{creative}", "cr1"),
        ("{cost}", "0.05"),
        ("{ip}", "203.0.113.9"),
        ("{user_agent}", "Mozilla%2F5.0%20%28iPhone%29"),
        ("{datetime}", "2026-11-23T01%3A02%3A03Z"),
        ("{country_code}", "GB"),
        ("{{sendId}}", "Msg12345"),
        ("{CLICK_ID}", "c" * 32),  # names are case-insensitive
        ("{{ click_id }}", "c" * 32),
    ],
)
def test_every_macro(macro: str, expected: str) -> None:
    assert macros.render(f"https://lp.example/x?v={macro}&z=1", values()) == f"https://lp.example/x?v={expected}&z=1"


def test_values_are_encoded_so_they_cannot_inject() -> None:
    evil = "a&admin=1#frag/../x?y= z"
    url = macros.render("https://lp.example/p/{sub1}?s={sub2}", values(query={"sub1": evil, "sub2": evil}))
    parts = urlsplit(url)
    assert parts.path == "/p/a%26admin%3D1%23frag%2F..%2Fx%3Fy%3D%20z"
    assert parts.fragment == ""
    assert parse_qs(parts.query) == {"s": [evil]}


def test_unknown_and_empty_macros_become_empty() -> None:
    url = macros.render("https://lp.example/?a={nope}&b={sub3}&c={{whatever}}&d={affiliate_id}",
                        values(query={}, affiliate_id=None))
    assert url == "https://lp.example/?a=&b=&c=&d="


def test_send_id_is_empty_outside_a_message() -> None:
    assert macros.render("https://lp.example/?m={{sendId}}", values(message_id=None)) == "https://lp.example/?m="


def test_query_cannot_override_click_facts() -> None:
    url = macros.render("https://lp.example/?c={click_id}&ip={ip}", values(query={"click_id": "forged", "ip": "1.1.1.1"}))
    assert url == f"https://lp.example/?c={'c' * 32}&ip=203.0.113.9"


def test_no_macros_appends_click_id_and_given_subs() -> None:
    v = values(query={"sub1": "a b", "sub3": "x&y", "source": "sms"})
    assert macros.render("https://lp.example/land", v) == f"https://lp.example/land?click_id={'c' * 32}&sub1=a%20b&sub3=x%26y"
    assert macros.render("https://lp.example/land?k=1#top", v) == (
        f"https://lp.example/land?k=1&click_id={'c' * 32}&sub1=a%20b&sub3=x%26y#top"
    )
    assert macros.render("https://lp.example/land?", values(query={})) == f"https://lp.example/land?click_id={'c' * 32}"


def test_parse_keeps_literals_and_names() -> None:
    t = macros.parse("https://x/{a}-{{B}}{c}")
    assert t.has_macros
    assert t.names == ("a", "b", "c")
    assert t.literals == ("https://x/", "-", "", "")
    assert not macros.parse("https://x/{ not a macro }").has_macros


@pytest.mark.parametrize(
    "template",
    [
        "https://lp.example/x?" + "&".join(f"{m}={{{m}}}" for m in sorted(macros.KNOWN_MACROS - {"sendid"}))
        + "&s={{sendId}}&u={unknown}&w={{other}}",
        "https://lp.example/land",
        "https://lp.example/land?k=1#frag",
    ],
)
@pytest.mark.parametrize("message_id", ["Msg12345", None])
def test_fill_facts_matches_fill(template: str, message_id: str | None) -> None:
    """The redirect's fast path gives exactly what the reference functions give."""
    query = {"sub1": "a b", "sub2": "x&y", "sub5": "5", "source": "sms", "creative": "c/1", "cost": "0.1", "other": "no"}
    facts = macros.ClickFacts("c" * 32, "aff9", "o" * 24, "7", "203.0.113.9", "Mozilla/5.0 (iPhone)", "2026-11-23T01:02:03Z", "GB", message_id)
    expected = macros.render(template, values(query=query, message_id=message_id))
    assert macros.fill_facts(macros.parse(template), facts, query) == expected
    # The redirect passes the same fields as a plain tuple.
    assert macros.fill_facts(macros.parse(template), tuple(facts), query) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["abc123", "a-b_c.d~e", "é", "Ⅻ", "²", "ab cd", "x&y", "日本", "ǅ"])
def test_non_ascii_letters_and_digits_are_percent_encoded(value: str) -> None:
    """Unicode letters and digits pass ``str.isalnum`` but are not URL-safe: both paths encode them."""
    from urllib.parse import quote

    expected = quote(value, safe="")
    assert macros.encode(value) == expected
    template = macros.parse("https://lp.example/?s={sub1}")
    facts = macros.ClickFacts("c" * 32, None, "o" * 24, "7", None, None, "2026-11-23T01:02:03Z", None, None)
    assert macros.fill_facts(template, facts, {"sub1": value}) == f"https://lp.example/?s={expected}"


@pytest.mark.parametrize("value", [".", ".."])
def test_a_dot_segment_value_is_filled_as_empty(value: str) -> None:
    """/offers/{sub1}/landing with sub1=".." sent the visitor to /offers/../landing, i.e.
    elsewhere on the advertiser's host (percent-encoding would not help: browsers read %2E as a
    dot in a path). Found by the redirect review. Other values with dots are left as they are."""
    template = macros.parse("https://shop.example/offers/{sub1}/landing?s={sub2}")
    facts = macros.ClickFacts("c" * 32, None, "o" * 24, "7", None, None, "2026-11-23T01:02:03Z", None, None)
    assert macros.fill_facts(template, facts, {"sub1": value, "sub2": value}) == "https://shop.example/offers//landing?s="
    assert macros.render(template.raw, values(query={"sub1": value, "sub2": value})) == "https://shop.example/offers//landing?s="
    assert macros.fill_facts(template, facts, {"sub1": "...", "sub2": "a.b"}) == "https://shop.example/offers/.../landing?s=a.b"
