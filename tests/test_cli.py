"""The operator CLI: one JSON object on stdout, or a one-line error on stderr and a non-zero exit."""
import asyncio
import json
import os
import secrets
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg

import pytest

from shared.accounts import hash_secret


def trackly(settings, *args):
    env = {**os.environ, "TRACKLY_DATABASE_URL": settings.database_url, "TRACKLY_REDIS_URL": settings.redis_url}
    return subprocess.run([sys.executable, "-m", "services.cli", *args], env=env, capture_output=True, text=True, timeout=60)


async def _plain_token_columns(db, account) -> tuple:
    """(postback_token, previous_postback_token, postback_token_hash) of the account: every text
    column of the row, searched for the token, besides."""
    row = await db.fetchrow("SELECT * FROM accounts WHERE id = $1", account["account_id"])
    assert not [k for k, v in row.items() if isinstance(v, str) and account["postback_token"] in v]
    return row["postback_token"], row["previous_postback_token"], row["postback_token_hash"]


async def test_create_account_and_list(settings, db):
    out = trackly(settings, "admin", "create-account", "--name", "Acme")
    assert out.returncode == 0, out.stderr
    account = json.loads(out.stdout)
    assert set(account) == {"account_id", "api_key", "postback_token"}
    assert account["api_key"].startswith("trk_") and len(account["api_key"]) == 36
    assert len(account["postback_token"]) >= 32
    row = await db.fetchrow("SELECT api_key_hash, offer_management FROM accounts WHERE id = $1", account["account_id"])
    assert row["api_key_hash"] == hash_secret(account["api_key"]) and row["offer_management"] is True
    stored = await db.fetchval("SELECT count(*) FROM accounts WHERE api_key_hash::text LIKE $1", f"%{account['api_key']}%")
    assert stored == 0  # never the plain key
    # Nor the plain postback token: a copy of the database must not let its holder post conversions.
    assert await _plain_token_columns(db, account) == (None, None, hash_secret(account["postback_token"]))

    out = trackly(settings, "admin", "create-list", "--account-id", str(account["account_id"]), "--name", "Main",
                  "--phone", "+18005551234", "--short-domain", "HTTPS://SMS.example.com/", "--tracker-domain", "ct.example.com")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"list_id": json.loads(out.stdout)["list_id"], "phone_number": "+18005551234",
                                      "short_domain": "https://SMS.example.com", "tracker_domain": "https://ct.example.com"}


async def test_admin_commands_work_on_a_new_database(settings, db):
    """The operator's first command against an empty database may be create-account: it brings
    the schema up to date first, as trackly run does."""
    name = f"trackly_cli_{secrets.token_hex(4)}"
    await db.execute(f"CREATE DATABASE {name}")
    try:
        fresh = replace(settings, database_url=urlunsplit(urlsplit(settings.database_url)._replace(path=f"/{name}")))
        out = trackly(fresh, "admin", "create-account", "--name", "First")
        assert out.returncode == 0, out.stderr
        account = json.loads(out.stdout)
        out = trackly(fresh, "admin", "create-list", "--account-id", str(account["account_id"]), "--name", "Main",
                      "--phone", "+18005551234")
        assert out.returncode == 0, out.stderr
        # A database with a schema is not upgraded from here (that is `trackly migrate`, a release
        # step): one that is behind is refused, and nothing is written.
        conn = await asyncpg.connect(fresh.database_url)
        try:
            last = await conn.fetchval("DELETE FROM schema_migrations WHERE version = (SELECT max(version) FROM schema_migrations) RETURNING version")
            out = trackly(fresh, "admin", "create-account", "--name", "Second")
            assert out.returncode != 0 and "run `trackly migrate`" in out.stderr and last in out.stderr
            assert await conn.fetchval("SELECT count(*) FROM accounts") == 1
            assert await conn.fetchval("SELECT count(*) FROM schema_migrations WHERE version = $1", last) == 0
        finally:
            await conn.close()
    finally:
        await db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def test_no_offer_management_flag(settings, db):
    out = trackly(settings, "admin", "create-account", "--name", "NoOffers", "--no-offer-management")
    account = json.loads(out.stdout)
    assert await db.fetchval("SELECT offer_management FROM accounts WHERE id = $1", account["account_id"]) is False


@pytest.mark.parametrize("args", [
    ["admin", "create-list", "--account-id", "999999", "--name", "x", "--phone", "+18005551234"],
    ["admin", "create-list", "--account-id", "1", "--name", "x", "--phone", "+1invalid"],
    ["admin", "create-list", "--account-id", "1", "--name", "x", "--phone", "+18005551234", "--short-domain", "ftp://x"],
    # A domain is an origin: short URLs under a path, or with no host, could never be served.
    ["admin", "create-list", "--account-id", "1", "--name", "x", "--phone", "+18005551234", "--short-domain", "https://s.example.com/p"],
    ["admin", "create-list", "--account-id", "1", "--name", "x", "--phone", "+18005551234", "--tracker-domain", "https://"],
    ["admin", "create-list", "--account-id", "1", "--name", "x", "--phone", "+18005551234", "--tracker-domain", "https://a@ct.example.com"],
    ["admin", "create-list", "--account-id", "1", "--name", "x", "--phone", "+18005551234", "--short-domain", "https://s.example.com:99999"],
    ["admin", "create-list", "--account-id", "1", "--name", "x", "--phone", "+18005551234", "--short-domain", "https://s.example.com:"],
    ["admin", "create-list", "--account-id", "1", "--name", "x", "--phone", "+18005551234", "--short-domain", "https://s.example.com:0"],
    ["admin", "create-account"],
    ["admin", "create-account", "--name", "  "],
    ["admin", "create-list", "--account-id", "99999999999999999999", "--name", "x", "--phone", "+18005551234"],
    ["admin", "create-list", "--account-id", "1", "--name", " ", "--phone", "+18005551234"],
])
def test_bad_input_exits_nonzero_with_one_line(settings, args):
    out = trackly(settings, *args)
    assert out.returncode != 0
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("error:")


def test_migrate_reports_an_unreachable_database_in_one_line(settings):
    """trackly migrate is the release step an operator or a deploy script runs first: a database it
    cannot reach is the contract's one-line error, as for the admin commands, not a traceback."""
    out = trackly(replace(settings, database_url="postgresql://postgres@127.0.0.1:1/trackly"), "migrate")
    assert out.returncode != 0 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("error:"), out.stderr


def test_run_reports_an_unreachable_database_in_one_line(settings):
    """trackly run migrates first: a database it cannot reach is one line on stderr (it was the
    migration's ~50-line traceback), and nothing is started."""
    env = {**os.environ, "TRACKLY_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/trackly",
           "TRACKLY_REDIS_URL": settings.redis_url}
    out = subprocess.run([sys.executable, "-m", "services.cli", "run"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "trackly: gateway" not in out.stdout
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("error:"), out.stderr


@pytest.mark.parametrize("command", ["gateway", "redirect", "worker"])
def test_a_redis_url_no_client_takes_is_a_one_line_error_at_start(settings, command):
    env = {**os.environ, "TRACKLY_DATABASE_URL": settings.database_url, "TRACKLY_REDIS_URL": "localhost:6379",
           "TRACKLY_GATEWAY_PORT": "1", "TRACKLY_REDIRECT_PORT": "1"}  # (never bound: refused before)
    out = subprocess.run([sys.executable, "-m", "services.cli", command], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "TRACKLY_REDIS_URL" in out.stderr, out.stderr


@pytest.mark.parametrize("args", [["migrate"], ["admin", "create-account", "--name", "x"], ["admin", "republish"],
                                  ["gateway"], ["redirect"], ["worker"], ["run"]])
def test_embedded_servers_that_cannot_start_are_a_one_line_error(tmp_path, args):
    """Without TRACKLY_DATABASE_URL / TRACKLY_REDIS_URL every command starts the embedded servers
    under TRACKLY_DATA_DIR: one where they cannot be is a one-line error naming it, not a traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKLY_")}
    env["TRACKLY_DATA_DIR"] = str(blocker / "data")  # under a file: no directory can be made there
    out = subprocess.run([sys.executable, "-m", "services.cli", *args], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "TRACKLY_DATA_DIR" in out.stderr, out.stderr


def test_usage_errors_stay_one_line_whatever_the_arguments_hold(settings):
    out = trackly(settings, "admin", "create-account", "--name", "x", "left\nover")  # echoed as given
    assert out.returncode != 0 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("error:"), out.stderr


def test_a_child_is_restarted_with_backoff_once_it_has_run_and_never_while_failing_to_start():
    from services.supervisor import RESTART_AFTER, RESTART_LIMIT, _Restarts

    r = _Restarts(now=0.0)
    assert r.exited("gateway", 2.0) is None  # died while starting: stop everything
    r.started("worker", 0.0)
    assert r.exited("worker", RESTART_AFTER + 1) == 1  # ran, then died: again in 1 s
    assert r.waiting("worker") and not r.due("worker", RESTART_AFTER + 1.5) and r.due("worker", RESTART_AFTER + 2)
    t = RESTART_AFTER + 2
    delays = []
    for _ in range(4):  # keeps dying at once: 2, 4, 8, 16 s
        r.started("worker", t)
        delays.append(r.exited("worker", t + 0.5))
        t += 40
    assert delays == [2, 4, 8, 16]
    r.started("worker", t)
    assert r.exited("worker", t + RESTART_AFTER) == 1  # ran long enough again: back to 1 s
    for _ in range(RESTART_LIMIT - 1):
        t += 40
        r.started("worker", t)
        assert r.exited("worker", t + 0.5)
    r.started("worker", t + 40)
    assert r.exited("worker", t + 40.5) is None  # its RESTART_LIMIT restarts in a row all failed: stop


def test_urls_are_printed_without_their_password():
    from services.supervisor import _without_password

    assert _without_password("postgresql://app:s3cret@db:5432/trackly") == "postgresql://app:***@db:5432/trackly"
    assert _without_password("redis://:s3cret@cache:6379/0") == "redis://:***@cache:6379/0"
    assert _without_password("unix:///tmp/x/redis.sock") == "unix:///tmp/x/redis.sock"
    assert _without_password("postgresql://postgres:@/postgres?host=/tmp/pg") == "postgresql://postgres:@/postgres?host=/tmp/pg"
    # libpq and redis-py also take the password as a query parameter
    assert _without_password("postgresql:///trackly?host=/tmp/pg&password=s3cret&sslmode=disable") == (
        "postgresql:///trackly?host=/tmp/pg&password=***&sslmode=disable")
    assert _without_password("unix:///tmp/x/redis.sock?db=0&Password=s3cret") == "unix:///tmp/x/redis.sock?db=0&Password=***"
    assert _without_password("redis://u:a@b@cache/0?password=c") == "redis://u:***@cache/0?password=***"
    assert _without_password("postgresql:///t?sslpassword=k3y&pass%77ord=s3cret&passwords_are=fine") == (
        "postgresql:///t?sslpassword=***&pass%77ord=***&passwords_are=fine")


async def test_rotate_api_key(settings, db, api):
    account = json.loads(trackly(settings, "admin", "create-account", "--name", "Rotating").stdout)
    old = {"X-Api-Key": account["api_key"]}
    assert (await api.get("/api/v2/lists", headers=old)).status_code == 200
    out = trackly(settings, "admin", "rotate-api-key", "--account-id", str(account["account_id"]))
    assert out.returncode == 0, out.stderr
    rotated = json.loads(out.stdout)
    assert rotated["account_id"] == account["account_id"] and rotated["api_key"].startswith("trk_")
    assert rotated["api_key"] != account["api_key"]
    assert (await api.get("/api/v2/lists", headers=old)).status_code == 401  # the old key, at once
    assert (await api.get("/api/v2/lists", headers={"X-Api-Key": rotated["api_key"]})).status_code == 200
    assert (await _plain_token_columns(db, account))[2] == hash_secret(account["postback_token"])  # unchanged
    for bad in ("999999999", "0"):
        out = trackly(settings, "admin", "rotate-api-key", "--account-id", bad)
        assert out.returncode != 0 and out.stdout == "" and len(out.stderr.strip().splitlines()) == 1, out


async def test_rotate_postback_token(settings, db, api, gateway_app):
    """The replaced token works through its grace period (networks move to the new URL one by
    one), then not; with --grace-hours 0 it stops at once (a leaked token)."""
    account = json.loads(trackly(settings, "admin", "create-account", "--name", "Rotating tokens").stdout)
    first = account["postback_token"]

    async def answers(token: str) -> int:
        gateway_app.state.postback_tokens = {}  # what a gateway trusts without asking lasts 30 s; not that here
        return (await api.get(f"/postback/{token}", params={"click_id": "x", "conversion_id": token[:8]})).status_code

    out = trackly(settings, "admin", "rotate-postback-token", "--account-id", str(account["account_id"]))
    assert out.returncode == 0, out.stderr
    rotated = json.loads(out.stdout)
    second = rotated["postback_token"]
    assert set(rotated) == {"account_id", "postback_token", "previous_token_valid_until"} and second != first
    until = datetime.fromisoformat(rotated["previous_token_valid_until"])
    assert timedelta(hours=71) < until - datetime.now(UTC) <= timedelta(hours=72)
    assert (await answers(first), await answers(second)) == (200, 200)
    row = await db.fetchrow("SELECT * FROM accounts WHERE id = $1", account["account_id"])
    assert (row["postback_token_hash"], row["previous_postback_token_hash"]) == (
        hash_secret(second), hash_secret(first))
    assert not [k for k, v in row.items() if isinstance(v, str) and (first in v or second in v)]
    stored = await db.fetch("SELECT account_id FROM postbacks WHERE account_id = $1", account["account_id"])
    assert len(stored) == 2  # both stored as the account's

    await db.execute("UPDATE accounts SET previous_postback_token_until = now() - interval '1 second' WHERE id = $1",
                     account["account_id"])
    assert (await answers(first), await answers(second)) == (401, 200)  # its grace period is over

    out = trackly(settings, "admin", "rotate-postback-token", "--account-id", str(account["account_id"]), "--grace-hours", "0")
    third = json.loads(out.stdout)["postback_token"]
    assert (await answers(first), await answers(second), await answers(third)) == (401, 401, 200)
    for bad in (["--account-id", "999999999"], ["--account-id", "1", "--grace-hours", "-1"]):
        out = trackly(settings, "admin", "rotate-postback-token", *bad)
        assert out.returncode != 0 and out.stdout == "" and len(out.stderr.strip().splitlines()) == 1, out


async def test_forget_postback_tokens_empties_what_an_earlier_release_kept_in_plain(settings, db, api, gateway_app):
    account = json.loads(trackly(settings, "admin", "create-account", "--name", "Before 0026").stdout)
    # As a release before 0026 (still running during a rolling deploy) would store its token.
    await db.execute("UPDATE accounts SET postback_token = $2 WHERE id = $1", account["account_id"], "plain-kept-1")
    out = trackly(settings, "admin", "forget-postback-tokens")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["accounts"] >= 1
    assert await db.fetchval("SELECT count(*) FROM accounts WHERE postback_token IS NOT NULL") == 0
    gateway_app.state.postback_tokens = {}
    resp = await api.get("/postback/plain-kept-1", params={"click_id": "x", "conversion_id": "f1"})
    assert resp.status_code == 200, resp.text
    assert json.loads(trackly(settings, "admin", "forget-postback-tokens").stdout) == {"accounts": 0}


async def test_forget_postback_tokens_leaves_no_plaintext_token_a_concurrent_command_made(db):
    """create-account and rotate-postback-token keep a plaintext copy of the token they make while
    the database still has some (accounts._UPGRADING, read in the statement's snapshot). One that
    decided so before forget-postback-tokens committed, and wrote after it read the table, left its
    copy behind: forget said it was done, and since the copies decide, every token made from then on
    was kept in plain again. forget waits for the commands under way, and they for it."""
    from shared.accounts import create_account, forget_postback_tokens, rotate_postback_token

    async def plain() -> int:
        return await db.fetchval(
            "SELECT count(*) FROM accounts WHERE postback_token IS NOT NULL OR previous_postback_token IS NOT NULL")

    async with db.acquire() as cli, db.acquire() as operator:
        old = await create_account(cli, "before 0026")
        # As a release before 0026 stored it: the database keeps plaintext copies.
        await cli.execute("UPDATE accounts SET postback_token = $2 WHERE id = $1", old["account_id"], secrets.token_urlsafe(24))
        # An account being created while forget runs.
        async with cli.transaction():
            made = await create_account(cli, "during the forget")
            forgetting = asyncio.create_task(forget_postback_tokens(operator))
            await asyncio.sleep(0.5)
        await asyncio.wait_for(forgetting, 10)
        assert await plain() == 0
        # A rotation under way while forget commits.
        await cli.execute("UPDATE accounts SET postback_token = $2 WHERE id = $1", old["account_id"], secrets.token_urlsafe(24))
        async with operator.transaction():
            await forget_postback_tokens(operator)
            rotating = asyncio.create_task(rotate_postback_token(cli, made["account_id"], grace_hours=1))
            await asyncio.sleep(0.5)
        await asyncio.wait_for(rotating, 10)
        assert await plain() == 0
        assert (await create_account(cli, "after the forget"))["account_id"]
    assert await plain() == 0
