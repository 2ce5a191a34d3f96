"""GET /api/v2/postbacks: what the networks sent, newest first, and what became of it.

Every postback is stored as it arrived and answered 200 (networks retry anything else), so one
that could not be used (a payout that is not a number, a status we do not know, an error while
processing it) is only visible here: the log a network integration is debugged with.
"""
from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from services.gateway.auth import authenticate
from services.gateway.http import JSONResponse, page_params
from shared import jsonio
from shared.errors import validation
from shared.timeutil import isoformat

# A postback's state, defined once: selected for each row and filtered on.
_STATE = (
    "CASE WHEN p.is_duplicate THEN 'duplicate' WHEN p.process_error IS NOT NULL THEN 'failed'"
    " WHEN p.processed_at IS NULL THEN 'pending' ELSE 'processed' END"
)
STATES = ("duplicate", "failed", "pending", "processed")

# A postback's params are listed when they are at most this long as JSON; bigger ones are stored
# whole but listed as a note of their size: a page of 100 postbacks of ~5 MB each was a third of
# a gigabyte in one answer (any holder of the postback token can send them). The stored
# (compressed) size is checked first, so most big ones are never decompressed to be measured.
MAX_LISTED_PARAMS = 64 * 1024
_LISTED_PARAMS = (
    f"CASE WHEN pg_column_size(p.params) > {MAX_LISTED_PARAMS} THEN NULL"
    f" WHEN octet_length(p.params::text) > {MAX_LISTED_PARAMS} THEN NULL ELSE p.params END"
)

# The postback, and the conversion it belongs to (several postbacks move one conversion).
_SELECT = (
    # As text, read back with exact numbers (jsonio.loads_stored): the pool's jsonb codec (orjson)
    # reads every number as a binary float, and 24.990000000000000001 was listed as 24.99.
    f"SELECT p.id, p.received_at, p.method, pg_column_size(p.params) AS params_size, ({_LISTED_PARAMS})::text AS params,"
    " p.network, p.conversion_key, p.click_id, p.status, p.payout,"
    " p.currency, p.offer_ref, p.converted_at, p.parse_error, p.is_duplicate, p.processed_at, p.process_error,"
    f" c.offer_id AS conversion_offer_id, c.attributed, c.unattributed_reason, {_STATE} AS state"
    " FROM postbacks p LEFT JOIN conversions c"
    " ON c.account_id = p.account_id AND c.network = p.network AND c.conversion_key = p.conversion_key"
    " AND p.parse_error IS NULL"
)


# The keys the receiver makes for a conversion whose postbacks name no conversion id
# (shared.postback_fields.normalise): by its click, or its own.
_OWN_KEY_RE = re.compile(r"postback:[0-9a-f]{32}")


def _conversion_id(row: Any) -> str | None:
    """The conversion id the network sent, not the key made in its absence (``click:<click id>``,
    ``postback:<hex>``), which looked like one sent."""
    key = row["conversion_key"]
    if key is None or (row["click_id"] is not None and key == f"click:{row['click_id']}") or _OWN_KEY_RE.fullmatch(key):
        return None
    return key


def postback_json(row: Any) -> dict[str, Any]:
    # What we read from the params: nothing where they could not be read (the params show what
    # was sent; defaults such as "approved" or the time received would look like values).
    parsed = row["parse_error"] is None
    return {
        "id": row["id"],
        "received_at": isoformat(row["received_at"]),
        "method": row["method"],
        "network": row["network"],
        # exactly what was sent, unless too big to list
        "params": jsonio.loads_stored(row["params"]) if row["params"] is not None else {
            "_omitted": f"more than {MAX_LISTED_PARAMS} bytes as JSON ({row['params_size']} stored): too long to list"},
        "click_id": row["click_id"],
        "conversion_id": _conversion_id(row) if parsed else None,
        "status": row["status"] if parsed else None,
        "payout": row["payout"] if parsed else None,
        "currency": row["currency"] if parsed else None,
        "offer_ref": row["offer_ref"],  # the offer as the network named it (external or internal id)
        "converted_at": isoformat(row["converted_at"]) if parsed else None,
        "state": row["state"],
        "error": row["parse_error"] or row["process_error"],
        "processed_at": isoformat(row["processed_at"]),
        # The conversion it belongs to, once the worker has processed it: its offer (internal id,
        # as everywhere else) and whether a click won it (else why not: click_not_found, expired...).
        "offer_id": row["conversion_offer_id"],
        "attributed": row["attributed"],
        "unattributed_reason": row["unattributed_reason"],
    }


async def list_postbacks(request: Request) -> JSONResponse:
    account = await authenticate(request)
    page = page_params(request)
    state = request.query_params.get("state") or None
    if state is not None and state not in STATES:
        raise validation(f"state must be one of {', '.join(STATES)}")
    where = "p.account_id = $1" + (f" AND {_STATE} = $2" if state else "")
    args = (account.id, state) if state else (account.id,)
    db = request.app.state.db
    total = await db.fetchval(f"SELECT count(*) FROM postbacks p WHERE {where}", *args)
    rows = await db.fetch(
        f"{_SELECT} WHERE p.id IN (SELECT p.id FROM postbacks p WHERE {where}"
        f" ORDER BY p.id DESC LIMIT {page.per_page} OFFSET {page.offset}) ORDER BY p.id DESC",
        *args,
    )
    return JSONResponse({"success": True, "postbacks": [postback_json(r) for r in rows], "pagination": page.envelope(total)})


ROUTES = [Route("/api/v2/postbacks", list_postbacks, methods=["GET"])]
