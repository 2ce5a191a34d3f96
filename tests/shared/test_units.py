"""Pure helpers: ids, money, phones, time, hosts, settings."""
import time
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from shared import ids, jsonio, settings
from shared.edge import host_of
from shared.money import MoneyError, MoneyTooPrecise, money_sum, parse_money, to_json_number
from shared.phone import PhoneError, parse_e164
from shared.timeutil import TimeError, TimeRangeError, isoformat, parse_timestamp


def test_id_formats():
    assert ids.OFFER_ID_RE.match(ids.hex24())
    assert ids.LINK_ID_RE.match(ids.link_id())
    assert ids.MESSAGE_ID_RE.match(ids.message_id())
    assert ids.CLICK_ID_RE.match(ids.click_id())
    assert len(ids.message_link_code()) == 7
    codes = ids.message_link_codes(1000)
    assert len(set(codes)) == 1000 and all(len(c) == 7 and c.isalnum() and c.isascii() for c in codes)
    batch = ids.message_ids(1000)
    assert len(set(batch)) == 1000 and all(ids.MESSAGE_ID_RE.match(m) for m in batch)
    clicks, hexes = ids.click_ids(1000), ids.hex24s(1000)
    assert len(set(clicks)) == 1000 and all(ids.CLICK_ID_RE.fullmatch(c) for c in clicks)
    assert len(set(hexes)) == 1000 and all(ids.OFFER_ID_RE.fullmatch(h) for h in hexes)
    key = ids.api_key()
    assert key.startswith("trk_") and len(key) == 36 and all(c in "0123456789abcdef" for c in key[4:])
    assert len(ids.postback_token()) >= 32


def test_reserved_paths_are_never_codes(monkeypatch):
    rolls = iter(["readyz", "healthz", "Ab3kX9", "metrics", "Zx81Qa7"])
    monkeypatch.setattr(ids, "_alnum", lambda n: next(rolls))
    assert ids.link_id() == "Ab3kX9"
    assert ids.message_link_code() == "Zx81Qa7"
    rolls = iter(["healthzAbcdefgmetrics", "Zx81Qa7", "healthz", "Qq1Ww2e"])
    assert ids.message_link_codes(3) == ["Zx81Qa7", "Abcdefg", "Qq1Ww2e"]


def test_ids_do_not_repeat():
    assert len({ids.click_id() for _ in range(10_000)}) == 10_000
    assert len({ids.message_id() for _ in range(10_000)}) == 10_000


@pytest.mark.parametrize("raw, expected", [
    (Decimal("24.99"), Decimal("24.99")), ("24.99", Decimal("24.99")), (25, Decimal(25)),
    (" 0.10 ", Decimal("0.10")), ("0", Decimal(0)), (0.1, Decimal("0.1")),
    # Exactly as sent, past the millionth too: a client's binary float noise is what it sent.
    (Decimal("0.30000000000000004"), Decimal("0.30000000000000004")), ("1.0000005", Decimal("1.0000005")),
    ("999999999999.123456789012345678901234567891", Decimal("999999999999.123456789012345678901234567891")),
    (Decimal("1E-30"), Decimal("1E-30")), ("0." + "0" * 29 + "1" + "0" * 50, Decimal("1E-30")),
])
def test_money_accepts_numbers_and_decimal_strings(raw, expected):
    amount = parse_money(raw)
    assert amount == expected and str(to_json_number(amount)) == str(to_json_number(expected))


@pytest.mark.parametrize("raw", ["0." + "0" * 30 + "1", Decimal("1E-31"), Decimal("0.1234567890123456789012345678901")])
def test_money_refuses_more_than_30_places(raw):
    with pytest.raises(MoneyTooPrecise):
        parse_money(raw)


@pytest.mark.parametrize("raw, expected", [
    ("1." + "0" * 16400, "1"), (Decimal("0E-20000"), "0"), (Decimal("0E+999999999"), "0"), (Decimal("2.5E+3"), "2500"),
    (Decimal("12.340000000000000000000000000000000"), "12.34"), (Decimal("1.50"), "1.50"),
])
def test_money_in_a_form_postgresql_can_hold(raw, expected):
    # The value as sent; the form within numeric's bounds (at most 30 places, no exponent).
    assert str(parse_money(raw)) == expected


def test_money_output_and_sums_are_not_rounded_to_28_digits():
    amount = Decimal("999999999999.123456789012345678901234567891")  # 42 digits
    assert str(to_json_number(amount)) == "999999999999.123456789012345678901234567891"
    assert str(to_json_number(Decimal("24.990000"))) == "24.99"
    assert money_sum([amount, amount, Decimal("0.000000000000000000000000000009")]) == Decimal(
        "1999999999998.246913578024691357802469135791")


@pytest.mark.parametrize("raw", [True, None, "abc", "1e5", "NaN", "-1", Decimal("-0.01"), [], {}, "1" * 20,
                                 Decimal("1e999999999"), Decimal("-1e999999999"), "٢٤.٩٩", "２４"])
def test_money_rejects_everything_else(raw):
    with pytest.raises(MoneyError):
        parse_money(raw)


def test_json_numbers_past_the_digit_limit_are_invalid_json():
    with pytest.raises(jsonio.JsonError):
        jsonio.loads(b'{"a": ' + b"1" * 5000 + b"}")


def test_money_is_exact_through_json():
    data = jsonio.loads(b'{"a": 0.1, "b": 0.2}')
    assert parse_money(data["a"]) + parse_money(data["b"]) == Decimal("0.3")
    assert jsonio.dumps({"r": Decimal("24.990000")}) == b'{"r":24.99}'
    assert jsonio.dumps({"r": Decimal("100")}) == b'{"r":100}'


@pytest.mark.parametrize("raw", ["+14155551234", "+18005551234", "+447911123456", "+390612345678", "+4930123456"])
def test_phone_accepts_e164(raw):
    assert parse_e164(raw) == raw


@pytest.mark.parametrize("raw", ["+1invalid", "14155551234", "+1234", "", None, 14155551234, "+1 415 555 1234", "+999999999999999",
    "+12345678", "+14155551",  # +1 and 7 digits: dialable only inside an area code, not a full number
    "+4401234567890",  # a trunk prefix after the country code is not E.164
])
def test_phone_rejects_non_e164(raw):
    with pytest.raises(PhoneError):
        parse_e164(raw)


def test_timestamps_are_utc():
    assert parse_timestamp("2026-02-08T12:00:00Z") == datetime(2026, 2, 8, 12, tzinfo=UTC)
    assert parse_timestamp("2026-02-08T12:00:00") == datetime(2026, 2, 8, 12, tzinfo=UTC)
    assert parse_timestamp("2026-02-08T14:00:00+02:00") == datetime(2026, 2, 8, 12, tzinfo=UTC)
    assert parse_timestamp(1770552000, allow_unix=True) == datetime(2026, 2, 8, 12, tzinfo=UTC)
    assert parse_timestamp("1770552000", allow_unix=True) == datetime(2026, 2, 8, 12, tzinfo=UTC)
    assert parse_timestamp("1770552000250", allow_unix=True) == datetime(2026, 2, 8, 12, 0, 0, 250000, tzinfo=UTC)  # ms
    # An offset whose "+" an unencoded query string turned into a space.
    assert parse_timestamp("2026-02-08T14:00:00 02:00") == datetime(2026, 2, 8, 12, tzinfo=UTC)
    assert parse_timestamp("2026-02-08T12:00:00.5 00:00") == datetime(2026, 2, 8, 12, 0, 0, 500000, tzinfo=UTC)
    assert isoformat(datetime(2026, 2, 8, 12, tzinfo=UTC)) == "2026-02-08T12:00:00Z"
    for bad in ["yesterday", "", "2026-13-01T00:00:00Z", 5, "2026-02-08T14:00:00 2"]:
        with pytest.raises(TimeError):
            parse_timestamp(bad)
    assert parse_timestamp("1970-01-01T00:00:00Z") == datetime(1970, 1, 1, tzinfo=UTC)
    assert parse_timestamp(0, allow_unix=True) == datetime(1970, 1, 1, tzinfo=UTC)
    for out in ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "1969-12-31T23:59:59Z", "2100-01-01T00:00:00Z"]:
        with pytest.raises(TimeRangeError):
            parse_timestamp(out)
    for out_unix in [-1, 4_102_444_800, 1e300, "99999999999999999999"]:  # 4102444800: 2100-01-01
        with pytest.raises(TimeRangeError):
            parse_timestamp(out_unix, allow_unix=True)


def test_host_matching_ignores_case_port_and_scheme():
    assert host_of("https://SMS.Example.com:8443/x") == "sms.example.com"
    assert host_of("sms.example.com:8001") == "sms.example.com"
    assert host_of("http://ct.localhost:8001") == "ct.localhost"


def test_settings_from_environment():
    s = settings.load({"TRACKLY_GATEWAY_PORT": "9000", "TRACKLY_TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1",
                       "TRACKLY_DEFAULT_TRACKER_DOMAIN": "https://ct.example.com/"})
    assert s.gateway_port == 9000 and s.redirect_port == 8001
    assert s.default_tracker_domain == "https://ct.example.com"
    assert len(s.trusted_proxies) == 2 and s.embedded
    with pytest.raises(SystemExit):
        settings.load({"TRACKLY_REDIRECT_PORT": "x"})
    for name in ("TRACKLY_GATEWAY_PORT", "TRACKLY_REDIRECT_PORT"):  # refused at start, not at bind time
        assert settings.load({name: "65535"}) and settings.load({name: "1"})
        for bad in ("0", "-1", "65536", "99999"):
            with pytest.raises(SystemExit, match=name):
                settings.load({name: bad})
    with pytest.raises(SystemExit):
        settings.load({"TRACKLY_TRUSTED_PROXIES": "10.0.0.0/33"})
    assert s.message_code_days == 0 and settings.load({"TRACKLY_MESSAGE_CODE_DAYS": "30"}).message_code_days == 30
    for bad in ("-1", "36501"):
        with pytest.raises(SystemExit):
            settings.load({"TRACKLY_MESSAGE_CODE_DAYS": bad})
    # The edge's cache must not outlive CONTRACT.md §4's 15 s for a paused offer.
    assert s.link_cache_ttl == 5.0 and settings.load({"TRACKLY_LINK_CACHE_TTL": "0.5"}).link_cache_ttl == 0.5
    for bad in ("inf", "nan", "11", "-1", "x"):
        with pytest.raises(SystemExit):
            settings.load({"TRACKLY_LINK_CACHE_TTL": bad})


def test_settings_refuse_what_the_services_could_not_use():
    # The platform's tracker domain is an origin, as a list's (--tracker-domain): a bare host is
    # https; a path, a query or another scheme would make tracker URLs the redirect cannot serve.
    assert settings.load({"TRACKLY_DEFAULT_TRACKER_DOMAIN": "ct.example.com"}).default_tracker_domain == "https://ct.example.com"
    assert settings.load({}).default_tracker_domain == "http://ct.localhost:8001"
    for bad in ("https://ct.example.com/track?x=1", "ftp://ct.example.com", "https://ct.example.com/c"):
        with pytest.raises(SystemExit, match="TRACKLY_DEFAULT_TRACKER_DOMAIN"):
            settings.load({"TRACKLY_DEFAULT_TRACKER_DOMAIN": bad})
    # uvicorn's levels (it failed with a traceback at start); any case.
    assert settings.load({"TRACKLY_LOG_LEVEL": "WARNING"}).log_level == "warning"
    with pytest.raises(SystemExit, match="TRACKLY_LOG_LEVEL"):
        settings.load({"TRACKLY_LOG_LEVEL": "verbose"})
    for bad in ("0", "-5"):  # (was taken as 1)
        with pytest.raises(SystemExit, match="TRACKLY_LINK_CACHE_SIZE must be at least 1"):
            settings.load({"TRACKLY_LINK_CACHE_SIZE": bad})
    # uvicorn's own 5 s unless set (above a load balancer's idle timeout, when one is in front).
    assert settings.load({}).keepalive_seconds == 5
    assert settings.load({"TRACKLY_KEEPALIVE_SECONDS": "65"}).keepalive_seconds == 65
    for bad in ("0", "3601", "1.5", "x"):
        with pytest.raises(SystemExit, match="TRACKLY_KEEPALIVE_SECONDS"):
            settings.load({"TRACKLY_KEEPALIVE_SECONDS": bad})


def test_settings_refuse_database_and_redis_urls_no_client_takes():
    """A URL of a scheme asyncpg or redis-py refuses can never work: the gateway served 503 and the
    worker retried forever on such a TRACKLY_DATABASE_URL, and a TRACKLY_REDIS_URL ended every
    service in a traceback. Refused at start, as the ports are."""
    for name, good in (("TRACKLY_DATABASE_URL", ("postgresql://app@db/trackly", "postgres://db/t", "POSTGRESQL://db/t",
                                                 "postgresql:///trackly?host=/tmp/pg", "postgresql://h1:5432,h2/t")),
                       ("TRACKLY_REDIS_URL", ("redis://cache:6379/0", "rediss://cache/1", "unix:///tmp/x/redis.sock"))):
        for url in good:
            assert getattr(settings.load({name: url}), name.removeprefix("TRACKLY_").lower()) == url
        for bad in ("db.example.com", "mysql://db/t", "http://cache:6379", "localhost:6379"):
            with pytest.raises(SystemExit, match=name):
                settings.load({name: bad})


def test_trusted_proxies_default_to_loopback_and_can_be_none():
    loopback = settings.load({}).trusted_proxies
    assert [str(n) for n in loopback] == ["127.0.0.0/8", "::1/128"]
    assert settings.load({"TRACKLY_TRUSTED_PROXIES": ""}).trusted_proxies == ()


def test_a_repeating_failure_is_logged_once_per_period_with_its_count(caplog):
    import logging

    from shared.logs import Throttled

    logger = logging.getLogger("trackly.test.throttled")
    report = Throttled(logger, logging.WARNING, "redis down (%s)", every=1.0)
    with caplog.at_level(logging.WARNING, logger="trackly.test.throttled"):
        for n in range(5):
            report(f"try {n}")
        assert [r.getMessage() for r in caplog.records] == ["redis down (try 0) (1 times since the last report)"]
        time.sleep(1.05)
        report("try 5", times=3)
    assert caplog.records[-1].getMessage() == "redis down (try 5) (7 times since the last report)"
    assert report.count == 8
