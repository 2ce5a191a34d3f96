"""POST /history/sends, /history/clicks, /history/revenue: bulk imports of what happened elsewhere.

Each takes up to 1000 records. A record is checked on its own, then the batch is resolved and
written set-based (``unnest`` / ``COPY`` with ``ON CONFLICT``); one bad record fails alone. The
answer is ``{success_count, error_count, duplicates_skipped, errors}``, errors capped at 100.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from collections.abc import Callable
from typing import Any, TypeVar

import asyncpg
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.gateway import idempotency
from services.gateway.auth import authenticate
from services.gateway.http import JSONResponse, parse_json_object, present, read_body, refuse_unstorable
from services.gateway.lookups import find_offers
from services.gateway.routes.revenue import (
    MAX_ERRORS_SHOWN,
    insert_revenue_resilient,
    parse_revenue,
    parse_timestamp_field,
    record_list,
    resolve_revenue,
    save_error,
)
from services.gateway.sending import (
    SendRecord, delete_contacts, insert_messages, insert_new_contacts, parse_send, resolve,
)
from shared.accounts import Account
from shared.errors import ApiError, bad_request, not_found, validation
from shared import ids
from shared.ids import MESSAGE_ID_RE
from shared.phone import PhoneError, parse_e164
from shared.timeutil import utcnow


R = TypeVar("R")


@dataclass
class Outcome:
    success: int = 0
    duplicates: int = 0
    failed: list[tuple[int, ApiError]] | None = None

    def fail(self, index: int, err: ApiError) -> None:
        if self.failed is None:
            self.failed = []
        self.failed.append((index, err))

    def first_of_each(self, records: list[R], key: Callable[[R], str | None]) -> list[R]:
        """The records in order, a later one with the same (not None) ``key`` counted a duplicate."""
        kept: list[R] = []
        seen: set[str] = set()
        for record in records:
            k = key(record)
            if k is not None:
                if k in seen:
                    self.duplicates += 1
                    continue
                seen.add(k)
            kept.append(record)
        return kept

    def parse_each(self, items: list[Any], parse: Callable[[int, Any], R]) -> list[R]:
        """``parse(index, record)`` of each record; a record it refuses is failed here."""
        parsed: list[R] = []
        for index, raw in enumerate(items):
            try:
                parsed.append(parse(index, raw))
            except ApiError as err:
                self.fail(index, err)
        return parsed

    def response(self) -> JSONResponse:
        failed = sorted(self.failed or [], key=lambda f: f[0])
        response = JSONResponse(
            {
                "success_count": self.success,
                "error_count": len(failed),
                "duplicates_skipped": self.duplicates,
                "errors": [{"index": i, "code": e.code, "error": e.message} for i, e in failed[:MAX_ERRORS_SHOWN]],
            }
        )
        if any(e.code == "save_error" for _, e in failed):  # a database failure, not a bad record
            idempotency.unsaved(response)
        return response


# ---------------------------------------------------------------------------------------------
# /history/clicks

@dataclass
class ClickRecord:
    index: int
    message_id: str
    offer_ref: str
    raw: dict[str, Any]  # the record: its timestamps are parsed after the lookups (the spec's order)
    clicked_at: datetime | None = None
    offer_id: str = ""
    click_id: str = ""
    list_id: int = 0  # the message's list and recipient (its contact), as the request looked it up
    to_phone: str = ""


def _required(record: dict[str, Any], name: str, code: str) -> str:
    value = record.get(name)
    if value is None or isinstance(value, (bool, dict, list)) or not str(value).strip():
        raise bad_request(code, f"A record is missing the {name} field")
    return str(value).strip()


def parse_click(index: int, record: Any) -> ClickRecord:
    """The checks a record passes on its own before its message and offer are looked up: the
    spec's table puts the missing fields first, then message_not_found and offer_not_found, then
    invalid_timestamp (``check_click``)."""
    refuse_unstorable(record)
    if not isinstance(record, dict):
        raise validation("each record must be a JSON object")
    message_id = _required(record, "message_id", "missing_message_id")
    offer_ref = _required(record, "offer_id", "missing_offer_id")
    _required(record, "phone_number", "missing_phone_number")
    if not present(record.get("timestamp")):
        raise bad_request("missing_timestamp", "The timestamp field is required")
    return ClickRecord(index, message_id, offer_ref, record)


def check_click(record: ClickRecord, now: datetime) -> ApiError | None:
    """The checks after the lookups (the timestamps, then the phone number's form): the error,
    or None with ``clicked_at`` set."""
    try:
        record.clicked_at = parse_timestamp_field(record.raw, "timestamp", required=True, now=now)
        if record.raw.get("send_timestamp") is not None:
            parse_timestamp_field(record.raw, "send_timestamp", required=False, now=now)
    except ApiError as err:
        return err
    try:
        parse_e164(str(record.raw["phone_number"]).strip())
    except PhoneError:
        return bad_request("invalid_phone", "phone_number must be an E.164 phone number")
    return None


# The batch's messages (of the account; any account's), each read by its key (LATERAL with LIMIT,
# never flattened into a join): with "id = ANY($1)" the planner read the whole messages table for
# a batch (8 ms at 77,000 messages, growing with them), with "account_id = $1 AND id = ANY($2)"
# every message of the account. The account is checked outside the LIMIT (no condition is pushed
# into a subquery with one): inside, an account that statistics still call small was read through
# its own index, every message of it per probe (0.8 s for 1000 at 6,500 messages).
ACCOUNT_MESSAGES = """
SELECT m.id, m.list_id, m.to_phone FROM unnest($2::text[]) AS w(id)
CROSS JOIN LATERAL (SELECT id, list_id, to_phone, account_id FROM messages WHERE id = w.id LIMIT 1) m
WHERE m.account_id = $1
"""
MESSAGE_OWNER = "SELECT account_id FROM messages WHERE id = $1"
MESSAGE_OWNERS = """
SELECT m.* FROM unnest($1::text[]) AS w(id)
CROSS JOIN LATERAL (SELECT id, account_id FROM messages WHERE id = w.id LIMIT 1) m
"""


# Only clicks that became their message's first click are stored (one per message, like the
# edge's); the raw clicks row keeps message click_count in agreement. The first clicks go in
# message id order byte by byte ("C"), the drainer's (its ids are COLLATE "C" columns): in the
# database's collation (en_US in PostgreSQL's Docker image) "a..." came before "B...", after it
# for a drain storing the same messages, and the two deadlocked.
_STORE_CLICKS = """
WITH input AS (
    SELECT * FROM unnest($2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::bigint[], $7::text[])
        AS t(message_id, click_id, offer_id, clicked_at, list_id, to_phone)
),
firsts AS (
    INSERT INTO message_clicks (message_id, click_id, account_id, offer_id, clicked_at, source)
    SELECT message_id, click_id, $1, offer_id, clicked_at, 'history' FROM input ORDER BY message_id COLLATE "C"
    ON CONFLICT (message_id) DO NOTHING
    RETURNING message_id
),
stored AS (  -- the firsts, with what the request's lookup read of their messages
    SELECT i.* FROM input i JOIN firsts f USING (message_id)
),
raw AS (
    INSERT INTO clicks (id, account_id, offer_id, list_id, message_id, clicked_at, source)
    SELECT click_id, $1, offer_id, list_id, message_id, clicked_at, 'history' FROM stored
),
contact_counts AS (
    INSERT INTO contacts (account_id, list_id, phone_number, click_count, last_clicked_at)
    SELECT $1, list_id, to_phone, count(*), max(clicked_at)
    FROM stored
    GROUP BY list_id, to_phone
    ORDER BY list_id, to_phone
    ON CONFLICT (list_id, phone_number) DO UPDATE
        SET click_count = contacts.click_count + excluded.click_count,
            last_clicked_at = greatest(contacts.last_clicked_at, excluded.last_clicked_at)
),
rematch AS (  -- conversions that named one of these messages wait for its first click: see 0017
    INSERT INTO rematch_requests (account_id, click_id)
    SELECT DISTINCT $1::bigint, c.click_id
    -- In the click id's collation: message ids are COLLATE "C", and compared in it, the index on
    -- click_id (default collation) could not be used: every waiting conversion of every account read.
    FROM conversions c JOIN firsts f ON c.click_id = f.message_id COLLATE "default"
    WHERE c.account_id = $1 AND NOT c.attributed AND c.click_id IS NOT NULL
      AND c.unattributed_reason IN ('click_not_found', 'before_click')
)
SELECT message_id FROM stored  -- (each data-modifying CTE runs to completion, read or not)
"""


async def _store_clicks(conn: asyncpg.Connection, account_id: int, records: list[ClickRecord]) -> set[str]:
    async with conn.transaction():
        rows = await conn.fetch(
            _STORE_CLICKS, account_id,
            [r.message_id for r in records], [r.click_id for r in records], [r.offer_id for r in records],
            [r.clicked_at for r in records], [r.list_id for r in records], [r.to_phone for r in records],
        )
    return {r["message_id"] for r in rows}


async def import_clicks(request: Request) -> Response:
    account, key, items = await _records(request)
    now = utcnow()
    out = Outcome()
    parsed = out.parse_each(items, parse_click)
    if not parsed:
        return out.response()
    async with request.app.state.db.acquire() as conn:
        if (replayed := await idempotency.replayed(conn, key)) is not None:
            return replayed
        wanted = sorted({r.message_id for r in parsed if MESSAGE_ID_RE.match(r.message_id)})
        messages = {row["id"]: row for row in await conn.fetch(ACCOUNT_MESSAGES, account.id, wanted)}
        offers = await find_offers(conn, account.id, [r.offer_ref for r in parsed], include_deleted=True)
        good: list[ClickRecord] = []
        seen: set[str] = set()
        for r in parsed:
            if r.message_id not in messages:
                out.fail(r.index, not_found("message_not_found", "No message exists with the given message_id"))
            elif r.offer_ref not in offers:
                out.fail(r.index, not_found("offer_not_found", "No offer exists with the given offer_id"))
            elif (err := check_click(r, now)) is not None:
                out.fail(r.index, err)
            elif r.message_id in seen:
                out.duplicates += 1  # one click per message: the first record of the batch wins
            else:
                seen.add(r.message_id)
                r.offer_id = offers[r.offer_ref]["id"]
                r.list_id, r.to_phone = messages[r.message_id]["list_id"], messages[r.message_id]["to_phone"]
                good.append(r)
        if not good:
            return out.response()
        for r, click_id in zip(good, ids.click_ids(len(good))):
            r.click_id = "h" + click_id

        async def store() -> Response:
            try:
                stored = await _store_clicks(conn, account.id, good)
                out.success += len(stored)
                out.duplicates += len(good) - len(stored)
            except asyncpg.PostgresError:
                for r in good:
                    try:
                        stored = await _store_clicks(conn, account.id, [r])
                    except asyncpg.PostgresError:
                        out.fail(r.index, save_error())
                        continue
                    out.success += len(stored)
                    out.duplicates += 1 - len(stored)
            return out.response()

        return await idempotency.answer_once(conn, key, store)


async def _records(request: Request) -> tuple[Account, idempotency.IdempotencyKey | None, list[Any]]:
    """The account, the Idempotency-Key if one was sent, and the request's records."""
    account = await authenticate(request)
    raw = await read_body(request)
    key = idempotency.requested(request, account.id, raw)
    return account, key, record_list(parse_json_object(raw, records="records"))


# ---------------------------------------------------------------------------------------------
# /history/sends

def parse_history_send(index: int, record: Any, now: datetime) -> SendRecord:
    parsed = parse_send(index, record, body_required=False)
    assert isinstance(record, dict)  # parse_send checked it
    message_id = record.get("message_id")
    if message_id is not None and message_id != "":
        if not isinstance(message_id, str) or not MESSAGE_ID_RE.match(message_id):
            raise validation("message_id must be 8 characters of [A-Za-z0-9]")
        parsed.message_id = message_id
    parsed.sent_at = parse_timestamp_field(record, "timestamp", required=True, now=now)
    return parsed


async def import_sends(request: Request) -> Response:
    account, key, items = await _records(request)
    now = utcnow()
    out = Outcome()
    parsed = out.parse_each(items, lambda index, raw: parse_history_send(index, raw, now))
    if not parsed:
        return out.response()
    redis, code_days = request.app.state.redis, request.app.state.settings.message_code_days
    async with request.app.state.db.acquire() as conn:
        if (replayed := await idempotency.replayed(conn, key)) is not None:
            return replayed
        given = sorted({r.message_id for r in parsed if r.message_id})
        existing = {row["id"]: row["account_id"] for row in await conn.fetch(MESSAGE_OWNERS, given)}
        candidates: list[SendRecord] = []
        for r in parsed:
            if r.message_id is not None and existing.get(r.message_id) == account.id:
                out.duplicates += 1
            elif r.message_id is not None and r.message_id in existing:
                out.fail(r.index, validation("message_id is already in use"))
            else:
                candidates.append(r)
        resolved = await resolve(conn, account.id, candidates, past=True)
        for r, err in resolved.failed:
            out.fail(r.index, err)
        # A message id given twice: the first record that passed its checks is the message (one
        # that failed does not take the id from a good one after it).
        fresh = out.first_of_each(sorted(resolved.good, key=lambda r: r.index), lambda r: r.message_id)
        if not fresh:
            return out.response()
        # Stored in message id order, the batch and record by record alike: two imports under
        # Idempotency-Keys (each one transaction) giving the same ids in other orders each held
        # rows the other waited on, and went on crossing record by record (a deadlock a second,
        # every one a save_error). In one order, one waits for the other, then skips what it stored.
        fresh.sort(key=lambda r: r.message_id or "")

        async def store() -> Response:
            try:
                await insert_messages(conn, redis, account.id, fresh, resolved.links, source="history",
                                      code_days=code_days)
                out.success += len(fresh)
            except asyncpg.PostgresError:
                # A given id taken meanwhile, or a record the database refused: one at a time.
                # In a key's transaction, their new contacts first, all at once, as a batch takes
                # them: record by record (a contact, then its message, then the next contact), this
                # import held contacts while it waited on the next one, which another import's
                # batch held while it waited on this one's (a deadlock: a save_error). Those that
                # no stored record reached are deleted at the end (they count in list sizes).
                unreached: set[tuple[int, str]] = set()
                if key is not None:
                    try:
                        async with conn.transaction():
                            unreached = await insert_new_contacts(conn, account.id, fresh)
                    except asyncpg.PostgresError:
                        pass  # (each record inserts its own, as before)
                for r in fresh:
                    try:
                        await insert_messages(conn, redis, account.id, [r], resolved.links, source="history",
                                              code_days=code_days)
                        unreached.discard((r.list_row["id"], r.to))
                        out.success += 1
                    except asyncpg.UniqueViolationError:
                        # Its id was taken meanwhile: by this account (an import of it at the same
                        # time) a duplicate; by another, as when it was taken before the check.
                        owner = r.message_id and await conn.fetchval(MESSAGE_OWNER, r.message_id)
                        if owner == account.id:
                            out.duplicates += 1
                        elif owner:
                            out.fail(r.index, validation("message_id is already in use"))
                        else:
                            out.fail(r.index, save_error())
                    except asyncpg.PostgresError:
                        out.fail(r.index, save_error())
                await delete_contacts(conn, unreached)
            return out.response()

        return await idempotency.answer_once(conn, key, store)


# ---------------------------------------------------------------------------------------------
# /history/revenue

async def import_revenue(request: Request) -> Response:
    account, key, items = await _records(request)
    now = utcnow()
    out = Outcome()
    parsed = out.parse_each(items, lambda index, raw: parse_revenue(index, raw, now, with_external_id=True))
    if not parsed:
        return out.response()
    async with request.app.state.db.acquire() as conn:
        if (replayed := await idempotency.replayed(conn, key)) is not None:
            return replayed
        good, failed = await resolve_revenue(conn, account.id, parsed)
        for index, err in failed:
            out.fail(index, err)
        unique = out.first_of_each(good, lambda r: r.external_id)
        if not unique:
            return out.response()

        async def store() -> Response:
            inserted, unsaved = await insert_revenue_resilient(conn, account.id, unique, "history")
            for index, err in unsaved:
                out.fail(index, err)
            out.success += len(inserted)
            out.duplicates += len(unique) - len(inserted) - len(unsaved)
            return out.response()

        return await idempotency.answer_once(conn, key, store)


ROUTES = [
    Route("/api/v2/history/sends", import_sends, methods=["POST"]),
    Route("/api/v2/history/clicks", import_clicks, methods=["POST"]),
    Route("/api/v2/history/revenue", import_revenue, methods=["POST"]),
]
