"""Accounts and lists as the operator CLI creates them; API keys and postback tokens are stored as
sha256 digests (shown once, when made)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import asyncpg

from shared import ids
from shared.domains import normalise_domain
from shared.phone import parse_e164
from shared.timeutil import isoformat


def hash_secret(secret: str) -> bytes:
    """How an API key or a postback token is stored: its SHA-256. Keys carry 128 random bits and
    tokens 192, so a fast digest is enough: there is nothing to brute-force. (Migration 0026
    computes the same in SQL for the tokens stored before it.)"""
    return hashlib.sha256(secret.encode()).digest()


# Whether a database upgraded across migration 0026 still keeps plaintext postback tokens for
# gateways of the earlier release, which may still run (a rolling deploy) and look tokens up only
# there: until `forget-postback-tokens` empties them, a token made here is kept in plain too, so
# that such a gateway knows it (a network given it could reach either). A database that never had
# plaintext tokens (created at 0026 or later), or has forgotten them, never gets one.
_UPGRADING = "EXISTS (SELECT 1 FROM accounts WHERE postback_token IS NOT NULL OR previous_postback_token IS NOT NULL)"


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    offer_management: bool


async def create_account(conn: asyncpg.Connection, name: str, *, offer_management: bool = True) -> dict:
    if not name.strip():
        raise ValueError("--name must not be empty")
    key = ids.api_key()
    token = ids.postback_token()
    account_id = await conn.fetchval(
        "INSERT INTO accounts (name, api_key_hash, postback_token_hash, offer_management, postback_token)"
        f" VALUES ($1, $2, $3, $4, CASE WHEN {_UPGRADING} THEN $5 END) RETURNING id",
        name.strip(), hash_secret(key), hash_secret(token), offer_management, token,
    )
    return {"account_id": account_id, "api_key": key, "postback_token": token}


async def rotate_api_key(conn: asyncpg.Connection, account_id: int) -> dict:
    """A new API key for the account; the one it replaces stops working at once (every request
    looks its key up: nothing caches it)."""
    key = ids.api_key()
    found = 0 < account_id < 2**63 and await conn.fetchval(
        "UPDATE accounts SET api_key_hash = $2 WHERE id = $1 RETURNING id", account_id, hash_secret(key)
    )
    if not found:
        raise ValueError(f"account {account_id} does not exist")
    return {"account_id": account_id, "api_key": key}


async def rotate_postback_token(conn: asyncpg.Connection, account_id: int, *, grace_hours: float) -> dict:
    """A new postback token for the account. The one it replaces keeps working for ``grace_hours``
    (0: it stops at once, as for a token that leaked; a gateway trusts a token it looked up for
    up to 30 s more), while the networks' postback URLs are changed to the new one. A token
    replaced earlier and still in its grace period stops working now."""
    if not 0 <= grace_hours <= 24 * 365:
        raise ValueError("--grace-hours must be between 0 and 8760")
    token = ids.postback_token()
    # A plaintext copy of the replaced token moves with it: a gateway of a release before 0026, still
    # running during a rolling deploy, looks tokens up there, and the token is valid for its grace
    # period (the same until; with none, nothing is kept). The new token gets one while the database
    # keeps such copies (_UPGRADING). forget-postback-tokens empties them.
    row = 0 < account_id < 2**63 and await conn.fetchrow(
        "UPDATE accounts SET previous_postback_token_hash = postback_token_hash, postback_token_hash = $2,"
        " previous_postback_token_until = now() + make_interval(secs => $3),"
        " previous_postback_token = CASE WHEN $3 > 0 THEN postback_token END,"
        f" postback_token = CASE WHEN {_UPGRADING} THEN $4 END"
        " WHERE id = $1 RETURNING previous_postback_token_until",
        account_id, hash_secret(token), grace_hours * 3600, token,
    )
    if not row:
        raise ValueError(f"account {account_id} does not exist")
    return {
        "account_id": account_id, "postback_token": token,
        "previous_token_valid_until": isoformat(row["previous_postback_token_until"]),
    }


async def forget_postback_tokens(conn: asyncpg.Connection) -> dict:
    """Empty the plaintext token columns that releases before migration 0026 wrote (and a gateway of
    such a release read): once none runs, only the digests are needed.

    The table is locked against writers first (readers, gateways looking tokens up, go on): a
    create-account or rotation under way may have decided to keep a plaintext copy (_UPGRADING,
    read in its statement's snapshot) and write it after this statement read the table. Its copy
    would be left behind, and would make every later token get one too."""
    async with conn.transaction():
        await conn.execute("LOCK TABLE accounts IN SHARE ROW EXCLUSIVE MODE")
        status = await conn.execute(
            "UPDATE accounts SET postback_token = NULL, previous_postback_token = NULL"
            " WHERE postback_token IS NOT NULL OR previous_postback_token IS NOT NULL"
        )
    return {"accounts": int(status.split()[-1])}


async def create_list(
    conn: asyncpg.Connection,
    *,
    account_id: int,
    name: str,
    phone: str,
    short_domain: str | None = None,
    tracker_domain: str | None = None,
    active: bool = True,
) -> dict:
    if not name.strip():
        raise ValueError("--name must not be empty")
    phone_number = parse_e164(phone)
    short = normalise_domain(short_domain, "--short-domain")
    tracker = normalise_domain(tracker_domain, "--tracker-domain")
    if not 0 < account_id < 2**63 or not await conn.fetchval("SELECT 1 FROM accounts WHERE id = $1", account_id):
        raise ValueError(f"account {account_id} does not exist")
    try:
        list_id = await conn.fetchval(
            "INSERT INTO lists (account_id, name, phone_number, status, short_domain, tracker_domain)"
            " VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            account_id, name.strip(), phone_number, "active" if active else "inactive", short, tracker,
        )
    except asyncpg.UniqueViolationError:
        raise ValueError(f"account {account_id} already has a list for {phone_number}") from None
    return {"list_id": list_id, "phone_number": phone_number, "short_domain": short, "tracker_domain": tracker}
