"""POST /revenue and /revenue/bulk (spec/revenue.txt); the record path /history/revenue shares.

Records are checked on their own first, then messages and offers are looked up for the whole
batch and the good records inserted with one ``unnest`` statement.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.gateway import idempotency
from services.gateway.auth import authenticate
from services.gateway.http import JSONResponse, parse_json_object, present, read_body, refuse_unstorable
from services.gateway.lookups import find_offers
from shared import ids
from shared.errors import ApiError, bad_request, validation
from shared.ids import MESSAGE_ID_RE
from shared.money import MoneyError, parse_money
from shared.timeutil import TimeError, TimeRangeError, parse_timestamp, utcnow

MAX_RECORDS = 1000
MAX_ERRORS_SHOWN = 100
ATTRIBUTION_TYPES = ("sale", "click", "send")

_INSERT_ROWS = """
INSERT INTO revenue (id, account_id, message_id, offer_id, amount, attribution_type, occurred_at, external_id, source)
SELECT t.id, $1, t.message_id, t.offer_id, t.amount, t.attribution_type, t.occurred_at, t.external_id, $2
FROM unnest($3::text[], $4::text[], $5::text[], $6::numeric[], $7::text[], $8::timestamptz[], $9::text[])
    AS t(id, message_id, offer_id, amount, attribution_type, occurred_at, external_id)
"""
_INSERT_NEW = _INSERT_ROWS + "RETURNING id"
# A known external_id is skipped: an import or bulk sent again records nothing twice.
_INSERT = _INSERT_ROWS + "ON CONFLICT (account_id, external_id) WHERE external_id IS NOT NULL DO NOTHING RETURNING id"


@dataclass
class RevenueRecord:
    index: int
    message_id: str
    amount: Decimal
    attribution_type: str
    offer_ref: str | None
    occurred_at: datetime
    external_id: str | None = None
    id: str = ""
    offer_id: str | None = None


def _ref(value: Any, name: str, *, max_len: int | None = 200) -> str | None:
    """``max_len=None``: a reference looked up, never stored (an offer_id longer than any offer's
    id is an unknown offer, offer_not_found in the spec's order, as on /history/clicks)."""
    if not present(value):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise validation(f"{name} must be a string")
    text = str(value).strip()
    if max_len is not None and len(text) > max_len:
        raise validation(f"{name} is too long")
    return text


def record_list(data: dict[str, Any]) -> list[Any]:
    records = data.get("records")
    if not isinstance(records, list) or not records:
        raise bad_request("missing_records", "The records field is required and must be a non-empty array")
    if len(records) > MAX_RECORDS:
        raise ApiError(413, "too_many_records", f"Exceeded the maximum of {MAX_RECORDS:,} records per request")
    return records


def parse_timestamp_field(record: dict[str, Any], name: str, *, required: bool, now: datetime) -> datetime:
    value = record.get(name)
    if not present(value):
        if required:
            raise bad_request("missing_timestamp", f"The {name} field is required")
        return now
    try:
        return parse_timestamp(value)
    except TimeRangeError as exc:
        raise bad_request("invalid_timestamp", f"The {name} is out of range: {exc}") from None
    except TimeError:
        raise bad_request("invalid_timestamp", f"The {name} is not a valid ISO 8601 datetime") from None


def parse_revenue(index: int, record: Any, now: datetime, *, with_external_id: bool = False) -> RevenueRecord:
    """One record on its own, the spec's codes in the spec's order."""
    refuse_unstorable(record)
    if not isinstance(record, dict):
        raise validation("each record must be a JSON object")
    if not present(record.get("message_id")):
        raise bad_request("missing_message_id", "The message_id field is required")
    if not present(record.get("revenue")):
        raise bad_request("missing_revenue", "The revenue field is required")
    if not present(record.get("attribution_type")):
        raise bad_request("missing_attribution_type", "The attribution_type field is required")
    try:
        amount = parse_money(record["revenue"])
    except MoneyError as exc:
        raise bad_request("invalid_revenue", f"Revenue must be a number greater than or equal to 0 ({exc})") from None
    kind = record["attribution_type"]
    if not isinstance(kind, str) or kind.strip().lower() not in ATTRIBUTION_TYPES:
        raise bad_request("invalid_attribution_type", "Must be one of: sale, click, or send")
    message_id = record["message_id"]
    if isinstance(message_id, bool) or not isinstance(message_id, (str, int)):
        raise bad_request("message_not_found", "No message exists with the given ID")
    return RevenueRecord(
        index=index,
        message_id=str(message_id).strip(),
        amount=amount,
        attribution_type=kind.strip().lower(),
        offer_ref=_ref(record.get("offer_id"), "offer_id", max_len=None),
        occurred_at=parse_timestamp_field(record, "timestamp", required=False, now=now),
        external_id=_ref(record.get("external_id"), "external_id") if with_external_id else None,
    )


# A record without offer_id takes the offer "from the message's short link" (spec/revenue.txt): the
# offer of the first of the account's short links in its body (the per-message code that comes
# first), else, for a message without one, the offer it was sent with. Each message, and each of
# its links, is read by its key (LATERAL with LIMIT, never flattened into a join): with
# "account_id = $1 AND id = ANY($2)" the planner read every message of the account to find a
# batch's 1000 (12,000 rows at 77,000 messages), and it may hash the links table per message.
# The account is checked outside the LIMIT, on purpose: see history.ACCOUNT_MESSAGES.
_MESSAGES = """
SELECT m.id, coalesce(
    (SELECT l.offer_id FROM message_links ml
     CROSS JOIN LATERAL (SELECT offer_id FROM links WHERE id = ml.link_id LIMIT 1) l
     WHERE ml.message_id = m.id ORDER BY nullif(strpos(m.body, ml.code), 0) NULLS LAST, ml.code LIMIT 1),
    m.offer_id) AS offer_id
FROM unnest($2::text[]) AS w(id)
CROSS JOIN LATERAL (SELECT id, body, offer_id, account_id FROM messages WHERE id = w.id LIMIT 1) m
WHERE m.account_id = $1
"""


async def resolve_revenue(
    conn: asyncpg.Connection, account_id: int, records: list[RevenueRecord]
) -> tuple[list[RevenueRecord], list[tuple[int, ApiError]]]:
    """Messages of this account and offers (internal or external id) for the whole batch."""
    wanted = sorted({r.message_id for r in records if MESSAGE_ID_RE.match(r.message_id)})
    messages = {row["id"]: row for row in await conn.fetch(_MESSAGES, account_id, wanted)}
    offers = await find_offers(conn, account_id, [r.offer_ref for r in records if r.offer_ref], include_deleted=True)
    good: list[RevenueRecord] = []
    failed: list[tuple[int, ApiError]] = []
    for r in records:
        message = messages.get(r.message_id)
        if message is None:
            failed.append((r.index, bad_request("message_not_found", "No message exists with the given ID")))
            continue
        if r.offer_ref is not None:
            offer = offers.get(r.offer_ref)
            if offer is None:
                failed.append((r.index, bad_request("offer_not_found", "No offer exists with the given offer_id")))
                continue
            r.offer_id = offer["id"]
        else:
            r.offer_id = message["offer_id"]
        good.append(r)
    for r, revenue_id in zip(good, ids.hex24s(len(good))):
        r.id = revenue_id
    return good, failed


async def insert_revenue(
    conn: asyncpg.Connection, account_id: int, records: list[RevenueRecord], source: str, *, all_new: bool = False
) -> set[str]:
    """One statement for the batch; the ids actually inserted (a known external_id is skipped).
    ``all_new``: insert without ON CONFLICT, which halves the statement's cost (speculative
    insertion per row) and fails on a known external_id instead of skipping it."""
    if not records:
        return set()
    rows = await conn.fetch(
        _INSERT_NEW if all_new else _INSERT, account_id, source,
        [r.id for r in records], [r.message_id for r in records], [r.offer_id for r in records],
        [r.amount for r in records], [r.attribution_type for r in records], [r.occurred_at for r in records],
        [r.external_id for r in records],
    )
    return {row["id"] for row in rows}


def save_error() -> ApiError:
    return ApiError(500, "save_error", "An unexpected error occurred while saving the record")


async def insert_revenue_resilient(
    conn: asyncpg.Connection, account_id: int, records: list[RevenueRecord], source: str
) -> tuple[set[str], list[tuple[int, ApiError]]]:
    """The batch at once; should that fail, record by record, so one bad record sinks only itself.

    The batch is first taken to be all new (an import is rarely sent twice): only when an
    external_id is known already does it go again, skipping the known ones.

    Rows go in external_id order: two imports naming the same external ids in other orders, each
    in a transaction of its own (an Idempotency-Key's), each waited on a row the other had
    inserted first; PostgreSQL broke the deadlock and both requests failed. In one order, one
    waits for the other to end, then skips what it stored."""
    records = sorted(records, key=lambda r: (r.external_id is None, r.external_id or ""))
    for all_new in (True, False):
        try:
            async with conn.transaction():
                return await insert_revenue(conn, account_id, records, source, all_new=all_new), []
        except asyncpg.PostgresError as exc:
            if not (all_new and isinstance(exc, asyncpg.UniqueViolationError)
                    and exc.constraint_name == "revenue_external_id"):
                break
    inserted: set[str] = set()
    failed: list[tuple[int, ApiError]] = []
    for record in records:
        try:
            async with conn.transaction():
                inserted |= await insert_revenue(conn, account_id, [record], source)
        except asyncpg.PostgresError:
            failed.append((record.index, save_error()))
    return inserted, failed


def error_items(failed: list[tuple[int, ApiError]]) -> list[dict[str, Any]]:
    return [{"index": index, "code": err.code, "error": err.message} for index, err in sorted(failed, key=lambda f: f[0])]


async def create(request: Request) -> Response:
    account = await authenticate(request)
    raw = await read_body(request)
    key = idempotency.requested(request, account.id, raw)
    record = parse_revenue(0, parse_json_object(raw), utcnow())
    async with request.app.state.db.acquire() as conn:
        if (replayed := await idempotency.replayed(conn, key)) is not None:
            return replayed
        good, failed = await resolve_revenue(conn, account.id, [record])
        if failed:
            raise failed[0][1]

        async def store() -> Response:
            await insert_revenue(conn, account.id, good, "api")
            return JSONResponse(
                {"success": True, "revenue_id": record.id, "message_id": record.message_id, "revenue": record.amount},
                status_code=201,
            )

        return await idempotency.answer_once(conn, key, store)


async def create_bulk(request: Request) -> Response:
    account = await authenticate(request)
    raw = await read_body(request)
    key = idempotency.requested(request, account.id, raw)
    items = record_list(parse_json_object(raw, records="records"))
    now = utcnow()
    parsed: list[RevenueRecord] = []
    failed: list[tuple[int, ApiError]] = []
    for index, item in enumerate(items):
        try:
            parsed.append(parse_revenue(index, item, now))
        except ApiError as err:
            failed.append((index, err))

    def answer(inserted: set[str]) -> JSONResponse:
        return JSONResponse({"success_count": len(inserted), "error_count": len(failed), "errors": error_items(failed)})

    if not parsed:
        return answer(set())
    async with request.app.state.db.acquire() as conn:
        if (replayed := await idempotency.replayed(conn, key)) is not None:
            return replayed
        good, unresolved = await resolve_revenue(conn, account.id, parsed)
        failed += unresolved
        if not good:
            return answer(set())

        async def store() -> Response:
            inserted, unsaved = await insert_revenue_resilient(conn, account.id, good, "api")
            failed.extend(unsaved)
            return idempotency.unsaved(answer(inserted)) if unsaved else answer(inserted)

        return await idempotency.answer_once(conn, key, store)


ROUTES = [
    Route("/api/v2/revenue", create, methods=["POST"]),
    Route("/api/v2/revenue/bulk", create_bulk, methods=["POST"]),
]
