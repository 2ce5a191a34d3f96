"""GET /api/v2/postbacks: what the networks sent, newest first, and what became of it.

Every postback is stored as it arrived and answered 200 (networks retry anything else), so one
that could not be used (a payout that is not a number, a status we do not know, an error while
processing it) is only visible here: the log a network integration is debugged with.
"""
from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from services.gateway.auth import authenticate
from services.gateway.http import JSONResponse, page_params
from shared.errors import validation
from shared.timeutil import isoformat

# state -> SQL condition; a row is in exactly one state.
STATES = {
    "duplicate": "is_duplicate",
    "failed": "NOT is_duplicate AND process_error IS NOT NULL",
    "pending": "NOT is_duplicate AND processed_at IS NULL",
    "processed": "NOT is_duplicate AND processed_at IS NOT NULL AND process_error IS NULL",
}

_COLUMNS = (
    "id, received_at, method, params, network, conversion_key, click_id, status, payout, currency, offer_ref,"
    " converted_at, parse_error, is_duplicate, processed_at, process_error"
)


def _state(row: Any) -> str:
    if row["is_duplicate"]:
        return "duplicate"
    if row["process_error"] is not None:
        return "failed"
    return "pending" if row["processed_at"] is None else "processed"


def postback_json(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "received_at": isoformat(row["received_at"]),
        "method": row["method"],
        "network": row["network"],
        "params": row["params"],  # exactly what was sent
        "click_id": row["click_id"],
        "conversion_id": row["conversion_key"],
        "status": row["status"],
        "payout": row["payout"],
        "currency": row["currency"],
        "offer_id": row["offer_ref"],
        "converted_at": isoformat(row["converted_at"]),
        "state": _state(row),
        "error": row["parse_error"] or row["process_error"],
        "processed_at": isoformat(row["processed_at"]),
    }


async def list_postbacks(request: Request) -> JSONResponse:
    account = await authenticate(request)
    page = page_params(request)
    state = request.query_params.get("state") or None
    if state is not None and state not in STATES:
        raise validation(f"state must be one of {', '.join(STATES)}")
    where = "account_id = $1" + (f" AND {STATES[state]}" if state else "")
    db = request.app.state.db
    total = await db.fetchval(f"SELECT count(*) FROM postbacks WHERE {where}", account.id)
    rows = await db.fetch(
        f"SELECT {_COLUMNS} FROM postbacks WHERE {where} ORDER BY id DESC LIMIT {page.per_page} OFFSET {page.offset}",
        account.id,
    )
    return JSONResponse({"success": True, "postbacks": [postback_json(r) for r in rows], "pagination": page.envelope(total)})


ROUTES = [Route("/api/v2/postbacks", list_postbacks, methods=["GET"])]
