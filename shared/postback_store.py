"""Storing a postback as a network sent it: by the gateway's receiver, and by the worker for the
postbacks the receiver spooled in Redis while PostgreSQL could not take them.

Networks retry a postback they got no 2xx for only a few times, some never: one refused during a
PostgreSQL restart or failover was a conversion lost. The receiver answers 200 for a postback it
has stored, in PostgreSQL or, when PostgreSQL is unavailable, in the spool (a Redis stream, as
durable as the clicks). The worker stores each spooled postback as the receiver would have, with
the time it was received, and deletes it from the spool once committed. Its ``spool_id`` (the
stream entry's id, unique among postbacks) makes the store happen once, whatever fails between
the commit and the delete.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from shared import jsonio
from shared.postback_fields import Postback, accepts_move, normalise

# The stream of postbacks received while PostgreSQL was unavailable, oldest first (``spool_entry``:
# what was received in one field, the fields sent in another, as exact JSON). Never trimmed: an
# entry leaves it once stored.
SPOOL_STREAM = "trk:postback-spool"
# Where the worker moves a spooled postback PostgreSQL refuses (the account deleted since, say):
# kept for the operator, out of the way of the others.
SPOOL_REFUSED = "trk:postback-spool:refused"
# The spool shares its Redis with the click stream, which a full Redis refuses (noeviction): what
# it takes is bounded, so that a long outage (or a flood) never costs a click. Past either bound a
# postback is answered 503, and the network retries it later. Networks send a few hundred bytes.
SPOOL_MAX_ENTRIES = 1_000_000
SPOOL_MAX_ENTRY_BYTES = 64 * 1024
# And in bytes, as Redis counts the stream's memory (sampled): the two bounds above alone allowed
# 64 GB (a flood of large postbacks with one token known), far past a Redis shared with the clicks.
SPOOL_MAX_BYTES = 1 << 30
# Tokens the gateways have seen answer for an account lately (one key per token digest, refreshed
# at each lookup): with PostgreSQL unavailable, a postback whose token is neither in the gateway's
# own cache nor here is answered 503 rather than spooled (anyone may send any token), and one
# found here is spooled by its digest, for the worker to check against PostgreSQL.
KNOWN_TOKEN_PREFIX = "trk:postback-token:"
KNOWN_TOKEN_SECONDS = 7 * 86400
# XADD unless the spool holds SPOOL_MAX_ENTRIES or SPOOL_MAX_BYTES already (then nil).
_SPOOL_ADD = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
if (redis.call('MEMORY', 'USAGE', KEYS[1]) or 0) >= tonumber(ARGV[4]) then return false end
return redis.call('XADD', KEYS[1], '*', 'p', ARGV[2], 'q', ARGV[3])
"""


class SpoolFull(Exception):
    """The spool takes no more (SPOOL_MAX_ENTRIES, SPOOL_MAX_BYTES), or the postback is too big for it."""


async def spool(redis: Any, entry: dict[str, bytes]) -> None:
    """Add ``entry`` (``spool_entry``) to the spool, or raise SpoolFull."""
    if len(entry["p"]) + len(entry["q"]) > SPOOL_MAX_ENTRY_BYTES:
        raise SpoolFull(f"a postback over {SPOOL_MAX_ENTRY_BYTES} bytes is not spooled")
    if await redis.eval(_SPOOL_ADD, 1, SPOOL_STREAM, SPOOL_MAX_ENTRIES, entry["p"], entry["q"], SPOOL_MAX_BYTES) is None:
        raise SpoolFull(f"the postback spool holds {SPOOL_MAX_ENTRIES} postbacks or {SPOOL_MAX_BYTES} bytes")


def known_token_key(digest: bytes) -> str:
    """The Redis key that says a gateway saw the token of this digest answer lately."""
    return KNOWN_TOKEN_PREFIX + digest.hex()


# The account of a postback token, given its digest: the current token, or the one it replaced
# while its grace period lasted at $2 (accounts.rotate_postback_token).
ACCOUNT_OF_TOKEN = """
SELECT id FROM accounts WHERE postback_token_hash = $1
UNION ALL
SELECT id FROM accounts WHERE previous_postback_token_hash = $1 AND previous_postback_token_until > $2
LIMIT 1
"""

_INSERT = """
INSERT INTO postbacks (account_id, received_at, method, params, network, conversion_key, click_id, status,
                       payout, currency, offer_ref, converted_at, parse_error, dedupe_key, is_duplicate, processed_at,
                       process_error, spool_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
ON CONFLICT (account_id, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
RETURNING id
"""

# The latest accepted postback of a conversion: a repeat of it is a duplicate.
_LATEST = """
SELECT id, status, payout, click_id, currency, received_at FROM postbacks
WHERE account_id = $1 AND network = $2 AND conversion_key = $3 AND dedupe_key IS NOT NULL
ORDER BY id DESC LIMIT 1
"""

# The unique index that a spooled postback stored before violates.
SPOOL_ID_INDEX = "postbacks_spool_id"


@dataclass(frozen=True)
class Stored:
    postback_id: int  # the row stored (for a duplicate, the row that records the repeat)
    duplicate: bool  # a repeat of the conversion's latest accepted postback: never processed
    processable: bool  # to be processed by the worker (neither a duplicate nor unparseable)


async def store(
    db: asyncpg.Pool | asyncpg.Connection,
    account_id: int,
    received_at: datetime,
    method: str,
    params: dict[str, Any],
    pb: Postback,
    *,
    spool_id: str | None = None,
) -> Stored:
    """Store one postback: ``params`` as ``jsonio.storable`` left them, ``pb`` what
    ``postback_fields.normalise`` read of them. A spooled one stored before raises
    asyncpg.UniqueViolationError on SPOOL_ID_INDEX, and nothing is stored again."""
    unparseable = pb.parse_error is not None
    values = [
        # Numbers in a JSON body are Decimals: stored as the exact JSON numbers that were sent.
        account_id, received_at, method, orjson.Fragment(jsonio.dumps(params)), pb.network, pb.conversion_key,
        pb.click_id, pb.status, pb.payout, pb.currency, pb.offer_ref, pb.converted_at, pb.parse_error,
    ]
    if unparseable:  # kept for the operator and never processed
        postback_id = await db.fetchval(_INSERT, *values, None, False, received_at, "unparseable", spool_id)
        return Stored(postback_id, False, False)
    latest = await db.fetchrow(_LATEST, account_id, pb.network, pb.conversion_key)
    if spool_id is not None and latest is not None and await _superseded(db, account_id, pb, received_at, latest):
        postback_id = await db.fetchval(
            _INSERT, *values, None, False, received_at,
            f"superseded: received before postback {latest['id']} of its conversion, stored after it", spool_id)
        return Stored(postback_id, False, False)
    if latest is None or not pb.repeats(latest["status"], latest["payout"], latest["click_id"], latest["currency"]):
        postback_id = await db.fetchval(
            _INSERT, *values, pb.dedupe_key(latest["id"] if latest else 0), False, None, None, spool_id)
        if postback_id is not None:
            return Stored(postback_id, False, True)
    postback_id = await db.fetchval(_INSERT, *values, None, True, received_at, None, spool_id)
    return Stored(postback_id, True, False)


# The postbacks of a conversion received after a given time (a spooled one's), accepted or
# repeats: a repeat of the latest stored is the network's word all the same (approved, rejected,
# approved again: the second approval, stored before the spooled rejection, was its repeat).
_RECEIVED_AFTER = """
SELECT status, payout FROM postbacks
WHERE account_id = $1 AND network = $2 AND conversion_key = $3 AND (dedupe_key IS NOT NULL OR is_duplicate)
  AND received_at > $4
"""


async def _superseded(db: asyncpg.Pool | asyncpg.Connection, account_id: int, pb: Postback, received_at: datetime,
                      latest: asyncpg.Record) -> bool:
    """Whether a spooled postback is superseded by postbacks of its conversion received after it
    but stored first (by a gateway that reached PostgreSQL before the workers drained the spool):
    the conversion must end as if they had been applied in the order received. One of them
    overrides it when the status machine would have taken that one's move after it: applying it
    now would then move the conversion back (an approval spooled, its rejection stored at once:
    approved again, its payout counted as revenue), so it is kept, not applied. Otherwise it
    stands whatever followed (a reversal is final; an approval is not undone by a late pending),
    and applied now it ends the same. The latest stored may have been received before it while a
    repeat of it was received after (approved, the spooled rejection, approved again): the
    repeats count too. One that only names a click or a currency the latest did
    not is news, as for any postback."""
    if pb.status is None:
        return False
    if pb.repeats(latest["status"], latest["payout"], pb.click_id, latest["currency"] or pb.currency):
        return False
    payout = pb.payout if pb.payout is not None else latest["payout"] if latest["payout"] is not None else Decimal(0)
    later = await db.fetch(_RECEIVED_AFTER, account_id, pb.network, pb.conversion_key, received_at)
    return any(accepts_move(pb.status, payout, row["status"], payout if row["payout"] is None else row["payout"])
               for row in later if row["status"] is not None)


def spool_entry(*, account_id: int | None, token_digest: bytes | None, received_at: datetime, method: str,
                params: dict[str, Any], body_error: str | None, conversion_key: str | None) -> dict[str, bytes]:
    """The stream entry of a postback to store later: its account, or its token's digest when the
    account could not be looked up (the worker looks it up, as of ``received_at``); and the
    conversion key the gateway gave it. A postback naming neither id gets a random one, and its
    store may have committed before PostgreSQL failed to answer (a lost connection, the budget
    run out): stored again under the same key, it is a repeat of itself, not a second conversion."""
    return {
        "p": orjson.dumps({
            "a": account_id,
            "t": token_digest.hex() if token_digest is not None else None,
            "r": received_at.isoformat(),
            "m": method,
            "e": body_error,
            "k": conversion_key,
        }),
        "q": orjson.dumps(params, default=_exact_number),
    }


def _exact_number(value: object) -> object:
    # A JSON body's numbers as they were sent ("1.50" stays 1.50: jsonio.dumps writes 1.5).
    if isinstance(value, Decimal) and value.is_finite():
        return orjson.Fragment(str(value))
    raise TypeError(f"cannot spool {type(value).__name__}")


@dataclass(frozen=True)
class Spooled:
    account_id: int | None
    token_digest: bytes | None
    received_at: datetime
    method: str
    params: dict[str, Any]
    body_error: str | None
    conversion_key: str | None

    def postback(self) -> Postback:
        """What the receiver read of it, under the conversion key the gateway gave it."""
        pb = normalise(self.params, self.received_at, self.body_error)
        if self.conversion_key is not None:
            pb = replace(pb, conversion_key=self.conversion_key)
        return pb


def read_spool_entry(fields: dict[bytes, bytes]) -> Spooled:
    """What ``spool_entry`` wrote (ValueError, KeyError or TypeError for anything else)."""
    data = orjson.loads(fields[b"p"])
    # The params with their numbers as sent (Decimals), as the receiver had them.
    params = jsonio.loads(fields[b"q"])
    if not isinstance(params, dict):
        raise ValueError("the spooled params are not an object")
    received_at = datetime.fromisoformat(data["r"])
    if received_at.tzinfo is None:
        raise ValueError("the spooled receipt time has no offset")
    digest = bytes.fromhex(data["t"]) if data["t"] is not None else None
    account_id = data["a"]
    if account_id is None and digest is None or account_id is not None and (
            type(account_id) is not int or not 0 < account_id < 2**63):
        raise ValueError("the spooled postback names no account")
    key = data.get("k")
    # What the store would fail on at every pass, holding up the entries after it.
    if type(data["m"]) is not str or any(v is not None and type(v) is not str for v in (data["e"], key)):
        raise ValueError("the spooled method, body error or conversion key is not text")
    return Spooled(account_id, digest, received_at, data["m"], params, data["e"], key)
