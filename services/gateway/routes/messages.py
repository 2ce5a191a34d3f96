"""POST /send, POST /send/bulk, GET /messages/{id}."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.gateway.attribution_sql import MESSAGE_OUTCOMES
from services.gateway import idempotency
from services.gateway.auth import authenticate
from services.gateway.http import JSONResponse, parse_json_object, read_body
from services.gateway.sending import Resolved, SendRecord, insert_messages, parse_send, resolve
from shared.errors import ApiError, not_found, validation
from shared.ids import MESSAGE_ID_RE

MAX_BULK = 1000


async def send(request: Request) -> Response:
    account = await authenticate(request)
    raw = await read_body(request)
    key = idempotency.requested(request, account.id, raw)
    record = parse_send(0, parse_json_object(raw))
    async with request.app.state.db.acquire() as conn:
        if (replayed := await idempotency.replayed(conn, key)) is not None:
            return replayed
        resolved = await resolve(conn, account.id, [record])
        if resolved.failed:
            raise resolved.failed[0][1]
        return await _store(request, conn, account.id, resolved, key, lambda: JSONResponse(
            {"success": True, "message_id": record.message_id, "status": "queued"}, status_code=201))


def bulk_items(data: dict[str, Any], key: str) -> list[Any]:
    items = data.get(key)
    if not isinstance(items, list) or not items:
        raise validation(f"{key} must be a non-empty array")
    if len(items) > MAX_BULK:
        raise ApiError(413, "too_many_records", f"At most {MAX_BULK} records per request")
    return items


async def send_bulk(request: Request) -> Response:
    account = await authenticate(request)
    raw = await read_body(request)
    key = idempotency.requested(request, account.id, raw)
    items = bulk_items(parse_json_object(raw, records="messages"), "messages")
    parsed: list[SendRecord] = []
    errors: list[dict[str, Any]] = []

    def fail(index: int, raw: Any, err: ApiError) -> None:
        to = raw.get("to") if isinstance(raw, dict) else None
        if not isinstance(to, str):  # echoed as given; a number only as its digits
            to = str(to) if isinstance(to, int) and not isinstance(to, bool) else None
        errors.append({"index": index, "to": to, "code": err.code, "error": err.message})

    def answer(sent: list[SendRecord]) -> JSONResponse:
        errors.sort(key=lambda e: e["index"])
        return JSONResponse(
            {
                "success": True,
                "queued_count": len(sent),
                "error_count": len(errors),
                "errors": errors,
                "messages": [
                    {"index": r.index, "to": r.to, "message_id": r.message_id} for r in sorted(sent, key=lambda r: r.index)
                ],
            }
        )

    for index, item in enumerate(items):
        try:
            parsed.append(parse_send(index, item))
        except ApiError as err:
            fail(index, item, err)
    if not parsed:
        return answer([])
    async with request.app.state.db.acquire() as conn:
        if (replayed := await idempotency.replayed(conn, key)) is not None:
            return replayed
        resolved = await resolve(conn, account.id, parsed)
        for record, err in resolved.failed:
            fail(record.index, items[record.index], err)
        if not resolved.good:
            return answer([])
        return await _store(request, conn, account.id, resolved, key, lambda: answer(resolved.good))


async def _store(
    request: Request, conn: asyncpg.Connection, account_id: int, resolved: Resolved,
    key: idempotency.IdempotencyKey | None, answer: Callable[[], Response],
) -> Response:
    """Insert the resolved messages and return ``answer()``, made once their ids are final. With
    an Idempotency-Key the answer is remembered in the messages' transaction; if a request with
    the same key committed first, its answer is returned instead (and nothing is stored)."""
    response: Response | None = None

    async def remember(conn: asyncpg.Connection) -> None:
        nonlocal response
        assert key is not None
        response = answer()
        await key.remember(conn, response)

    try:
        await insert_messages(conn, request.app.state.redis, account_id, resolved.good, resolved.links,
                              code_days=request.app.state.settings.message_code_days,
                              also=remember if key is not None else None)
    except idempotency.Raced:
        assert key is not None
        return await key.winners_answer(conn)
    return response or answer()


async def get_message(request: Request) -> JSONResponse:
    account = await authenticate(request)
    message_id = request.path_params["message_id"]
    db = request.app.state.db
    row = None
    if MESSAGE_ID_RE.match(message_id):
        row = await db.fetchrow(
            "SELECT id, to_phone, list_id, body, status, sent_at, offer_id FROM messages WHERE id = $1 AND account_id = $2",
            message_id, account.id,
        )
    if row is None:
        raise not_found("message_not_found", "No message exists with the given ID")
    outcome = await db.fetchrow(MESSAGE_OUTCOMES, [message_id])
    return JSONResponse(
        {
            "success": True,
            "message_id": row["id"],
            "to": row["to_phone"],
            "list_id": row["list_id"],
            "body": row["body"],
            "status": row["status"],
            "sent_at": row["sent_at"],
            "offer_id": row["offer_id"],
            "clicked": outcome["first_clicked_at"] is not None,
            "first_clicked_at": outcome["first_clicked_at"],
            "click_count": outcome["click_count"],
            "conversions": outcome["conversions"],
            "revenue": outcome["revenue"],
        }
    )


ROUTES = [
    Route("/api/v2/send", send, methods=["POST"]),
    Route("/api/v2/send/bulk", send_bulk, methods=["POST"]),
    Route("/api/v2/messages/{message_id}", get_message, methods=["GET"]),
]
