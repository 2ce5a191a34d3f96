"""GET /contacts/{phone}/journey: what one contact received, clicked and converted on, in order."""
from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from services.gateway.attribution_sql import JOURNEY
from services.gateway.auth import authenticate
from services.gateway.http import JSONResponse
from shared.errors import bad_request, not_found
from shared.money import money_sum
from shared.phone import PhoneError, parse_e164


def _event(row: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"type": row["type"], "at": row["at"], "message_id": row["message_id"], "offer_id": row["offer_id"]}
    if row["type"] == "converted":
        event["revenue"] = row["revenue"]
        if row["attribution_type"] is not None:
            event["attribution_type"] = row["attribution_type"]
    return event


async def journey(request: Request) -> JSONResponse:
    account = await authenticate(request)
    raw = request.path_params["phone"].strip()
    if raw and raw[0].isdigit():
        raw = "+" + raw  # a "+" sent unencoded in a URL can arrive as a space, stripped above
    try:
        phone = parse_e164(raw)
    except PhoneError:
        raise bad_request("invalid_phone", "Invalid phone number format") from None
    rows = await request.app.state.db.fetch(JOURNEY, account.id, phone)
    if not rows:
        raise not_found("not_found", "No contact with this phone number")
    return JSONResponse(
        {
            "success": True,
            "phone_number": phone,
            "messages_received": sum(1 for r in rows if r["type"] == "sent"),
            "clicks": sum(1 for r in rows if r["type"] == "clicked"),
            "conversions": sum(r["conversions"] for r in rows),
            "total_revenue": money_sum(r["revenue"] for r in rows if r["revenue"] is not None),
            "events": [_event(r) for r in rows],
        }
    )


ROUTES = [Route("/api/v2/contacts/{phone}/journey", journey, methods=["GET"])]
