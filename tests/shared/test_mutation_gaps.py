"""Behaviour the rest of the suite left unpinned (found by mutation testing): configuration
defaults and empty variables, money and time boundaries, ids, the operator CLI and the supervisor's
stop (the click drainer's are in tests/worker/test_drain_gaps.py, `trackly run` on SIGTERM in
tests/e2e/test_run.py)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from shared import ids, settings
from shared.errors import ApiError
from shared.money import MoneyError, MoneyTooLarge, parse_money, to_json_number
from shared.phone import PhoneError, parse_e164
from shared.process import die_with_parent
from shared.timeutil import TimeError, parse_date, parse_timestamp
from tests.helpers import free_port, random_phone
from tests.test_cli import trackly


# --- settings (CONTRACT.md §1) -----------------------------------------------------------------


def test_settings_defaults_are_the_contracts():
    s = settings.load({})
    assert (s.gateway_port, s.redirect_port) == (8000, 8001)
    assert s.data_dir == Path(".trackly")
    assert s.default_tracker_domain == "http://ct.localhost:8001"
    assert s.geoip_db is None and s.database_url is None and s.redis_url is None and s.embedded
    assert (Settings := settings.Settings)().gateway_port == 8000 and Settings().redirect_port == 8001


def test_empty_variables_mean_unset():
    """An env file's ``TRACKLY_X=`` (or the supervisor's children without a URL) is the default,
    not an error nor an empty value: empty URLs still mean the embedded servers."""
    blank = {name: "" for name in (
        "TRACKLY_DATABASE_URL", "TRACKLY_REDIS_URL", "TRACKLY_GATEWAY_PORT", "TRACKLY_REDIRECT_PORT",
        "TRACKLY_DATA_DIR", "TRACKLY_GEOIP_DB", "TRACKLY_DEFAULT_TRACKER_DOMAIN", "TRACKLY_LINK_CACHE_TTL",
        "TRACKLY_LINK_CACHE_SIZE", "TRACKLY_MESSAGE_CODE_DAYS", "TRACKLY_KEEPALIVE_SECONDS",
    )}
    s = settings.load(blank)
    assert s.database_url is None and s.redis_url is None and s.embedded
    assert (s.gateway_port, s.redirect_port, s.data_dir, s.geoip_db) == (8000, 8001, Path(".trackly"), None)
    assert s.default_tracker_domain == "http://ct.localhost:8001"
    assert (s.link_cache_ttl, s.link_cache_size, s.message_code_days, s.keepalive_seconds) == (5.0, 100_000, 0, 5)
    assert settings.load({"TRACKLY_GEOIP_DB": "/data/geo.mmdb"}).geoip_db == Path("/data/geo.mmdb")


def test_link_cache_ttl_bounds_are_inclusive():
    assert settings.load({"TRACKLY_LINK_CACHE_TTL": str(settings.MAX_LINK_CACHE_TTL)}).link_cache_ttl == 10.0
    assert settings.load({"TRACKLY_LINK_CACHE_TTL": "0"}).link_cache_ttl == 0.0
    assert settings.load({"TRACKLY_MESSAGE_CODE_DAYS": "36500"}).message_code_days == 36_500


# --- money, time, phones, ids ------------------------------------------------------------------


def test_money_limit_is_exclusive_and_exact():
    assert parse_money("999999999999.999999") == Decimal("999999999999.999999")
    for too_large in ("1000000000000", Decimal("1000000000000.000001"), Decimal("1E+12")):
        with pytest.raises(MoneyTooLarge):
            parse_money(too_large)


def test_negative_money_only_where_allowed():
    assert parse_money("-1.5", allow_negative=True) == Decimal("-1.5")
    assert parse_money(Decimal("-999999999999"), allow_negative=True) == Decimal("-999999999999")
    with pytest.raises(MoneyTooLarge):
        parse_money("-1000000000000", allow_negative=True)
    with pytest.raises(MoneyError):
        parse_money("-1.5")


@pytest.mark.parametrize("stored, printed", [
    ("10.000000", "10"), ("100", "100"), ("1000.500000", "1000.5"), ("0.000000", "0"), ("24.990000", "24.99"),
])
def test_money_prints_in_plain_digits(stored, printed):
    assert str(to_json_number(Decimal(stored))) == printed


def test_unix_times_from_1e11_are_milliseconds():
    # 100,000,000,000 as seconds would be the year 5138; as milliseconds it is 1973-03-03.
    assert parse_timestamp(100_000_000_000, allow_unix=True) == datetime(1973, 3, 3, 9, 46, 40, tzinfo=UTC)
    assert parse_timestamp("100000000000", allow_unix=True) == datetime(1973, 3, 3, 9, 46, 40, tzinfo=UTC)


def test_dates_are_checked():
    assert parse_date("2026-02-08") == date(2026, 2, 8)
    for bad in ("2026-02-30", "yesterday", "", "2026-13-01"):
        with pytest.raises(TimeError):
            parse_date(bad)


def test_phone_surrounding_blanks_are_ignored_and_leading_zero_country_refused():
    assert parse_e164(" +14155551234\n") == "+14155551234"
    for bad in ("+014155551234", "+0014155551234"):
        with pytest.raises(PhoneError):
            parse_e164(bad)


def test_database_ids_fit_a_bigint():
    assert ids.bigint(2**63 - 1) == ids.bigint(str(2**63 - 1)) == 2**63 - 1
    assert ids.bigint(2**63) is None and ids.bigint(str(2**63)) is None and ids.bigint("9" * 19) is None
    assert ids.bigint(-1) is None and ids.bigint(True) is None and ids.bigint("٣") is None
    assert ids.given_list_id("42", "list_id") == 42 and ids.given_list_id(-1, "list_id") is None
    for malformed in (True, False, 1.5, None, [1]):
        with pytest.raises(ApiError):
            ids.given_list_id(malformed, "list_id")


# --- the operator CLI (CONTRACT.md §1-§2) ------------------------------------------------------


async def test_create_list_inactive(settings, db):
    account = json.loads(trackly(settings, "admin", "create-account", "--name", "Dormant").stdout)
    statuses = []
    for extra in ([], ["--inactive"]):
        out = trackly(settings, "admin", "create-list", "--account-id", str(account["account_id"]), "--name", "L",
                      "--phone", random_phone("+1800"), *extra)
        assert out.returncode == 0, out.stderr
        statuses.append(await db.fetchval("SELECT status FROM lists WHERE id = $1", json.loads(out.stdout)["list_id"]))
    assert statuses == ["active", "inactive"]


async def test_a_second_list_for_the_same_number_is_a_one_line_error(settings, db):
    account = json.loads(trackly(settings, "admin", "create-account", "--name", "Twice").stdout)
    args = ("admin", "create-list", "--account-id", str(account["account_id"]), "--name", "L", "--phone", "+18005550199")
    assert trackly(settings, *args).returncode == 0
    out = trackly(settings, *args)
    assert out.returncode != 0 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("error:")
    assert await db.fetchval("SELECT count(*) FROM lists WHERE account_id = $1", account["account_id"]) == 1


def test_admin_output_is_exactly_one_json_object(settings):
    out = trackly(settings, "admin", "create-account", "--name", "One")
    assert out.returncode == 0, out.stderr
    assert isinstance(json.loads(out.stdout), dict)  # the whole of stdout: one object, nothing else
    assert out.stdout.count("\n") == 1 and out.stdout.endswith("}\n")


def test_an_unexpected_failure_is_still_one_line(settings):
    """A server the CLI cannot reach: not a traceback, one line and a non-zero exit."""
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    out = trackly(replace(settings, database_url=dead), "admin", "create-account", "--name", "X")
    assert out.returncode != 0 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("error:"), out.stderr


def test_migrate_twice_prints_what_it_applied_and_exits_0(settings):
    for _ in range(2):
        out = trackly(settings, "migrate")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"applied": []}


def test_republish_failure_is_one_line(settings):
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    out = trackly(replace(settings, database_url=dead), "admin", "republish")
    assert out.returncode != 0 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("error:"), out.stderr


# --- the supervisor behind `trackly run` --------------------------------------------------------


def test_children_are_asked_to_stop_before_they_are_killed():
    from services.supervisor import CHILD_STOP_TIMEOUT, _stop_children

    polite = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.05)"],
                              start_new_session=True, preexec_fn=die_with_parent())
    try:
        time.sleep(0.3)
        started = time.monotonic()
        _stop_children({"polite": polite})
        assert polite.returncode == -signal.SIGTERM  # SIGTERM, not the kill after CHILD_STOP_TIMEOUT
        assert time.monotonic() - started < CHILD_STOP_TIMEOUT / 2
    finally:
        if polite.poll() is None:
            polite.kill()
            polite.wait()


def test_a_child_that_ignores_sigterm_is_killed_in_time_for_the_20_s_contract():
    from services.supervisor import _stop_children

    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint(flush=True)\n"
                               "while True: time.sleep(0.05)"],
        start_new_session=True, stdout=subprocess.PIPE, preexec_fn=die_with_parent(),
    )
    try:
        stubborn.stdout.readline()  # its handler is set
        started = time.monotonic()
        _stop_children({"stubborn": stubborn})
        elapsed = time.monotonic() - started
        assert stubborn.returncode == -signal.SIGKILL
        # The embedded servers are stopped after the children, within the same 20 s.
        assert elapsed < 15, elapsed
    finally:
        if stubborn.poll() is None:
            stubborn.kill()
            stubborn.wait()
        stubborn.stdout.close()
