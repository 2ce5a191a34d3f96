"""POST /send, POST /send/bulk, GET /messages/{id}."""
from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from services.gateway.attribution_sql import MESSAGE_OUTCOMES
from services.gateway.auth import authenticate
from services.gateway.http import JSONResponse, read_json_object
from services.gateway.sending import SendRecord, insert_messages, parse_send, resolve
from shared.errors import ApiError, not_found, validation
from shared.ids import MESSAGE_ID_RE

MAX_BULK = 1000


async def send(request: Request) -> JSONResponse:
    account = await authenticate(request)
    record = parse_send(0, await read_json_object(request))
    async with request.app.state.db.acquire() as conn:
        resolved = await resolve(conn, account.id, [record])
        if resolved.failed:
            raise resolved.failed[0][1]
        await insert_messages(conn, request.app.state.redis, account.id, resolved.good, resolved.links,
                              code_days=request.app.state.settings.message_code_days)
    return JSONResponse({"success": True, "message_id": record.message_id, "status": "queued"}, status_code=201)


def bulk_items(data: dict[str, Any], key: str) -> list[Any]:
    items = data.get(key)
    if not isinstance(items, list) or not items:
        raise validation(f"{key} must be a non-empty array")
    if len(items) > MAX_BULK:
        raise ApiError(413, "too_many_records", f"At most {MAX_BULK} records per request")
    return items


async def send_bulk(request: Request) -> JSONResponse:
    account = await authenticate(request)
    items = bulk_items(await read_json_object(request), "messages")
    parsed: list[SendRecord] = []
    errors: list[dict[str, Any]] = []

    def fail(index: int, raw: Any, err: ApiError) -> None:
        to = raw.get("to") if isinstance(raw, dict) else None
        if not isinstance(to, str):  # echoed as given; a number only as its digits
            to = str(to) if isinstance(to, int) and not isinstance(to, bool) else None
        errors.append({"index": index, "to": to, "code": err.code, "error": err.message})

    for index, raw in enumerate(items):
        try:
            parsed.append(parse_send(index, raw))
        except ApiError as err:
            fail(index, raw, err)
    sent: list[SendRecord] = []
    if parsed:
        async with request.app.state.db.acquire() as conn:
            resolved = await resolve(conn, account.id, parsed)
            for record, err in resolved.failed:
                fail(record.index, items[record.index], err)
            if resolved.good:
                await insert_messages(conn, request.app.state.redis, account.id, resolved.good, resolved.links,
                                      code_days=request.app.state.settings.message_code_days)
                sent = resolved.good
    errors.sort(key=lambda e: e["index"])
    return JSONResponse(
        {
            "success": True,
            "queued_count": len(sent),
            "error_count": len(errors),
            "errors": errors,
            "messages": [{"index": r.index, "to": r.to, "message_id": r.message_id} for r in sorted(sent, key=lambda r: r.index)],
        }
    )


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
