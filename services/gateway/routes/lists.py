"""Read-only sending lists (operators create them with ``trackly admin create-list``)."""
from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from services.gateway.auth import authenticate
from services.gateway.http import JSONResponse, page_params
from shared import ids
from shared.errors import not_found

_SELECT = (
    "SELECT l.id, l.name, l.phone_number, l.status, l.short_domain, l.tracker_domain,"
    # The sum of the list's count deltas (migration 0010), not a count of its contacts.
    " (SELECT coalesce(sum(n.contacts), 0)::bigint FROM list_contact_counts n WHERE n.list_id = l.id)"
    " AS contact_count FROM lists l"
)


def list_json(row: Any) -> dict[str, Any]:
    return {k: row[k] for k in ("id", "name", "phone_number", "status", "short_domain", "tracker_domain", "contact_count")}


async def list_lists(request: Request) -> JSONResponse:
    account = await authenticate(request)
    page = page_params(request)
    db = request.app.state.db
    total = await db.fetchval("SELECT count(*) FROM lists WHERE account_id = $1", account.id)
    rows = await db.fetch(
        f"{_SELECT} WHERE l.account_id = $1 ORDER BY l.id LIMIT {page.per_page} OFFSET {page.offset}", account.id
    )
    return JSONResponse({"success": True, "lists": [list_json(r) for r in rows], "pagination": page.envelope(total)})


async def get_list(request: Request) -> JSONResponse:
    account = await authenticate(request)
    raw = request.path_params["list_id"]
    row = None
    list_id = ids.bigint(raw)
    if list_id is not None:
        row = await request.app.state.db.fetchrow(f"{_SELECT} WHERE l.id = $1 AND l.account_id = $2", list_id, account.id)
    if row is None:
        raise not_found("list_not_found", "List not found")
    # CONTRACT.md §3 gives this answer as the list's fields, as it does for a message's detail;
    # they are also under "list", the envelope GET /lists and the offer endpoints use.
    fields = list_json(row)
    return JSONResponse({"success": True, **fields, "list": fields})


ROUTES = [
    Route("/api/v2/lists", list_lists, methods=["GET"]),
    Route("/api/v2/lists/{list_id}", get_list, methods=["GET"]),
]
