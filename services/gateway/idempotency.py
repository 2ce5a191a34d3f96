"""``Idempotency-Key`` on POST /send, /send/bulk, /revenue, /revenue/bulk, /history/*, /links and
/offers: a retried request is answered, not repeated.

A client that sends the header gets, for a second request with the same key (same account,
within ``shared.idempotency.KEEP``), the answer the first one got, with ``Idempotent-Replayed:
true``, and nothing is stored twice: the answer is written in the same transaction as the
messages (or revenue, link, offer), so a request either stored both or neither (a gateway that crashed before the commit
left no key: the retry sends). The same key with another request (method, path or body) is
``422 idempotency_key_reused``. Two requests with one key at once: the second waits for the
first's transaction on the key's row, then answers as the first did.

Only answers that stored something are remembered: a refused request (400, or a bulk request
whose every record failed its checks) stored nothing, and its retry is simply checked again. A
bulk request with a key is all or nothing against database failures: if a record could not be
saved (``save_error``, not a bad record), nothing of it is kept and it answers 500 ``save_error``,
so that the retry with the same key stores it whole (remembering the partial answer would have
replayed the failure for a day).
(draft-ietf-httpapi-idempotency-key-header; Stripe's API behaves the same way.)
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
from starlette.requests import Request
from starlette.responses import Response

from services.gateway.http import error_response
from shared.errors import ApiError, validation
from shared.idempotency import KEEP

HEADER = "idempotency-key"
REPLAYED = "Idempotent-Replayed"
_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII, no spaces: as Stripe's keys and UUIDs


class _Unsaved(Exception):
    """The work's answer says a record could not be saved: its transaction must roll back."""


def unsaved(response: Response) -> Response:
    """Mark a bulk answer in which a record could not be saved (``answer_once`` with a key then
    keeps nothing of the request)."""
    response.unsaved = True  # type: ignore[attr-defined]
    return response


class Raced(Exception):
    """A request with the same key committed first: this one's transaction must roll back."""


@dataclass(frozen=True)
class IdempotencyKey:
    account_id: int
    key: str
    fingerprint: bytes

    async def replay(self, conn: asyncpg.Connection) -> Response | None:
        """The answer remembered under this key, or None."""
        row = await conn.fetchrow(
            "SELECT fingerprint, status, response FROM idempotency_keys"
            " WHERE account_id = $1 AND key = $2 AND created_at > now() - $3::interval",
            self.account_id, self.key, KEEP,
        )
        if row is None:
            return None
        if row["fingerprint"] != self.fingerprint:
            raise ApiError(
                422, "idempotency_key_reused",
                "This Idempotency-Key was used with a different request; use a new key for a new request",
            )
        return Response(row["response"], status_code=row["status"], media_type="application/json",
                         headers={REPLAYED: "true"})

    async def winners_answer(self, conn: asyncpg.Connection) -> Response:
        """After ``Raced`` (this request's transaction rolled back): the answer of the request
        with the same key that committed first."""
        replayed = await self.replay(conn)
        if replayed is None:  # (its row was committed: only a purge in between could do this)
            raise Raced
        return replayed

    async def remember(self, conn: asyncpg.Connection, response: Response) -> None:
        """Store the answer, in the caller's transaction; Raced if a request with this key
        committed first (a key past KEEP that was not yet purged is taken over)."""
        taken = await conn.fetchval(
            "INSERT INTO idempotency_keys (account_id, key, fingerprint, status, response) VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (account_id, key) DO UPDATE"
            " SET fingerprint = excluded.fingerprint, status = excluded.status, response = excluded.response,"
            " created_at = excluded.created_at"
            " WHERE idempotency_keys.created_at <= now() - $6::interval"
            " RETURNING true",
            self.account_id, self.key, self.fingerprint, response.status_code, bytes(response.body), KEEP,
        )
        if not taken:
            raise Raced


def requested(request: Request, account_id: int, body: bytes) -> IdempotencyKey | None:
    """The request's key, if it sent one (400 if it is malformed)."""
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not _KEY_RE.fullmatch(key):
        raise validation("Idempotency-Key must be 1 to 255 printable ASCII characters without spaces")
    digest = hashlib.sha256()
    for part in (request.method.encode(), request.url.path.encode("utf-8", "surrogateescape")):
        digest.update(len(part).to_bytes(4, "big") + part)
    digest.update(body)
    return IdempotencyKey(account_id, key, digest.digest())


async def answer_once(
    conn: asyncpg.Connection, key: IdempotencyKey | None, work: Callable[[], Awaitable[Response]]
) -> Response:
    """``work()``: its writes and the answer it returns, in one transaction with the answer
    remembered under ``key``; or, if a request with the same key committed first, that request's
    answer (and nothing of this one's is kept). Without a key, just ``work()``."""
    if key is None:
        return await work()
    try:
        async with conn.transaction():
            response = await work()
            if getattr(response, "unsaved", False):
                raise _Unsaved
            await key.remember(conn, response)
            return response
    except _Unsaved:
        return error_response(ApiError(
            500, "save_error",
            "Some records could not be saved, so none was kept; retry the request with the same Idempotency-Key",
        ))
    except Raced:
        return await key.winners_answer(conn)


async def replayed(conn: asyncpg.Connection, key: IdempotencyKey | None) -> Response | None:
    """The answer remembered under the request's key, if it sent one and it was answered before."""
    return None if key is None else await key.replay(conn)
