"""Offers CRUD. Every change is republished to the edge so the redirect sees pauses and deletes."""
from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import SplitResult, urlsplit

import asyncpg
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.gateway import idempotency
from services.gateway.auth import authenticate
from services.gateway.http import JSONResponse, optional_str, page_params, parse_json_object, read_body, read_json_object
from services.gateway.lookups import OFFER_COLUMNS
from services.gateway.publish import publish_offer
from shared import ids, macros
from shared.errors import ApiError, not_found, validation
from shared.money import CURRENCY_RE, MoneyError, parse_money

# (A space or a tab is taken as given: the redirect percent-encodes them in the Location.)
_CONTROL_CHAR = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Macros a destination may hold: every known one used once is 18. Each is filled per click with up to
# 1000 characters the visitor sends (9000 percent-encoded): a template of ~500 cost the shared edge
# ~40 ms of CPU per click and answered a 4.5 MB Location.
MAX_MACROS = 32
_FIELDS = ("name", "destination_url", "external_id", "status", "payout", "currency", "click_window_days", "affiliate_id")


def offer_json(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "destination_url": row["destination_url"],
        "external_id": row["external_id"],
        "status": row["status"],
        "payout": row["payout"],
        "currency": row["currency"],
        "click_window_days": row["click_window_days"],
        "affiliate_id": row["affiliate_id"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


def _split_with_host(url: str) -> SplitResult | None:
    """The URL split, if it has a host (and a port that is a number, if any)."""
    try:
        split = urlsplit(url)
        split.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return None
    return split if split.hostname else None


def _clean(data: dict[str, Any], *, partial: bool) -> dict[str, Any]:
    """Validate the offer fields present in ``data``; with ``partial=False`` apply defaults."""
    out: dict[str, Any] = {}
    if "name" in data or not partial:
        name = optional_str(data, "name", max_len=500)
        if not name:
            raise validation("name is required")
        out["name"] = name
    if "destination_url" in data or not partial:
        url = optional_str(data, "destination_url", max_len=4000)
        split = _split_with_host(url) if url and url.lower().startswith(("http://", "https://")) else None
        if split is None:
            raise validation("destination_url must be an http(s) URL with a host")
        if _CONTROL_CHAR.search(url):  # it becomes a Location header, where these cannot go
            raise validation("destination_url must not contain control characters")
        if "{" in split.netloc or "}" in split.netloc:
            # A macro in the host is filled from what the visitor sends ({sub1}=.evil.net): the
            # tracker domain would redirect anyone anywhere. Macros belong in the path and query.
            raise validation("destination_url must not put a macro in its host")
        if len(macros.MACRO_RE.findall(url)) > MAX_MACROS:
            raise validation(f"destination_url may hold at most {MAX_MACROS} macros")
        out["destination_url"] = url
    if "external_id" in data:
        out["external_id"] = optional_str(data, "external_id", max_len=200)
    if "affiliate_id" in data:
        out["affiliate_id"] = optional_str(data, "affiliate_id", max_len=200)
    if "status" in data or not partial:
        status = data.get("status")
        if status is None and not partial:  # absent or null: the default, as for every optional field
            status = "active"
        if status not in ("active", "paused"):
            raise validation("status must be active or paused")
        out["status"] = status
    if "payout" in data and data["payout"] is not None:
        try:
            out["payout"] = parse_money(data["payout"])
        except MoneyError as exc:
            raise validation(f"payout: {exc}") from None
    elif "payout" in data:
        out["payout"] = None
    if "currency" in data or not partial:
        currency = data.get("currency")
        # Absent, null or "": the default. (Not any falsy value: false, 0, [] or {} is no currency
        # code, and was stored as USD.)
        if (currency is None or currency == "") and not partial:
            currency = "USD"
        if not isinstance(currency, str) or not CURRENCY_RE.fullmatch(currency.upper()):
            raise validation("currency must be a 3-letter ISO 4217 code")
        out["currency"] = currency.upper()
    if "click_window_days" in data or not partial:
        days = data.get("click_window_days")
        if days is None and not partial:
            days = 90
        if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 90:
            raise validation("click_window_days must be an integer from 1 to 90")
        out["click_window_days"] = days
    return out


def _offer_id(request: Request) -> str:
    """The path's offer id: internal ids only (CONTRACT.md §3); anything else is simply not found."""
    offer_id: str = request.path_params["offer_id"]
    if not ids.OFFER_ID_RE.match(offer_id):
        raise not_found("offer_not_found", "Offer not found")
    return offer_id


async def _fetch(request: Request, account_id: int, offer_id: str) -> Any:
    row = await request.app.state.db.fetchrow(
        f"SELECT {OFFER_COLUMNS} FROM offers WHERE id = $1 AND account_id = $2 AND status <> 'deleted'",
        offer_id, account_id,
    )
    if row is None:
        raise not_found("offer_not_found", "Offer not found")
    return row


def _duplicate_external_id() -> ApiError:
    return ApiError(409, "duplicate_external_id", "Another offer of this account has that external_id")


async def create_offer(request: Request) -> Response:
    account = await authenticate(request)
    raw = await read_body(request)
    key = idempotency.requested(request, account.id, raw)
    fields = _clean(parse_json_object(raw), partial=False)
    fields.setdefault("external_id", None)
    fields.setdefault("affiliate_id", None)
    fields.setdefault("payout", None)
    db = request.app.state.db
    async with db.acquire() as conn:
        if (replayed := await idempotency.replayed(conn, key)) is not None:
            return replayed
        try:
            async with conn.transaction():
                try:
                    row = await conn.fetchrow(
                        f"INSERT INTO offers (id, account_id, {', '.join(_FIELDS)})"
                        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                        f" RETURNING {OFFER_COLUMNS}",
                        ids.hex24(), account.id, *(fields[f] for f in _FIELDS),
                    )
                except asyncpg.UniqueViolationError:
                    raise _duplicate_external_id() from None
                response = JSONResponse({"success": True, "offer": offer_json(row)}, status_code=201)
                if key is not None:  # (before the publish: a request that raced it leaves nothing at the edge)
                    await key.remember(conn, response)
                await publish_offer(request.app.state.redis, row)
        except idempotency.Raced:
            assert key is not None
            return await key.winners_answer(conn)
    return response


async def list_offers(request: Request) -> JSONResponse:
    account = await authenticate(request)
    page = page_params(request)
    db = request.app.state.db
    status = request.query_params.get("status")
    # ``deleted``: the offers deleted (soft), which reports by offer and old conversions still
    # name; they are listed only when asked for, and read-only (GET /offers/{id} answers 404).
    if status is not None and status not in ("active", "paused", "deleted"):
        raise validation("status must be active, paused or deleted")
    where = "account_id = $1" + (" AND status = $2" if status else " AND status <> 'deleted'")
    args: list[Any] = [account.id] + ([status] if status else [])
    total = await db.fetchval(f"SELECT count(*) FROM offers WHERE {where}", *args)
    rows = await db.fetch(
        f"SELECT {OFFER_COLUMNS} FROM offers WHERE {where} ORDER BY created_at, id"
        f" LIMIT {page.per_page} OFFSET {page.offset}",
        *args,
    )
    return JSONResponse({"success": True, "offers": [offer_json(r) for r in rows], "pagination": page.envelope(total)})


async def get_offer(request: Request) -> JSONResponse:
    account = await authenticate(request)
    row = await _fetch(request, account.id, _offer_id(request))
    return JSONResponse({"success": True, "offer": offer_json(row)})


@contextlib.asynccontextmanager
async def _edge_kept_with_postgresql(request: Request, account_id: int, offer_id: str) -> AsyncIterator[None]:
    """A change is published to the edge just before its commit (so an acknowledged pause is at
    the edge). If the request fails after that (the commit, or a publish whose reply was lost),
    the edge may be ahead of PostgreSQL: the row as committed is published again, best effort."""
    try:
        yield
    except ApiError:  # refused before anything was published (not found, duplicate external id)
        raise
    except Exception:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_republish(request, account_id, offer_id), REPUBLISH_TIMEOUT)
        raise


async def _republish(request: Request, account_id: int, offer_id: str) -> None:
    """The committed row to the edge, read FOR SHARE and published before this transaction ends,
    as every change does: a change that commits meanwhile publishes after this, not before."""
    async with request.app.state.db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"SELECT {OFFER_COLUMNS} FROM offers WHERE id = $1 AND account_id = $2 FOR SHARE", offer_id, account_id
        )
        if row is not None:
            await publish_offer(request.app.state.redis, row)


REPUBLISH_TIMEOUT = 2.0


async def update_offer(request: Request) -> JSONResponse:
    account = await authenticate(request)
    data = await read_json_object(request)
    await _fetch(request, account.id, _offer_id(request))
    fields = _clean(data, partial=True)
    db = request.app.state.db
    async with _edge_kept_with_postgresql(request, account.id, request.path_params["offer_id"]), \
            db.acquire() as conn, conn.transaction():
        if fields:
            names = list(fields)
            assignments = ", ".join(f"{name} = ${i + 3}" for i, name in enumerate(names))
            try:
                row = await conn.fetchrow(
                    f"UPDATE offers SET {assignments}, updated_at = now()"
                    f" WHERE id = $1 AND account_id = $2 AND status <> 'deleted' RETURNING {OFFER_COLUMNS}",
                    request.path_params["offer_id"], account.id, *(fields[n] for n in names),
                )
            except asyncpg.UniqueViolationError:
                raise _duplicate_external_id() from None
        else:  # nothing to change: the edge gets the row as it is, locked so no change overtakes it
            row = await conn.fetchrow(
                f"SELECT {OFFER_COLUMNS} FROM offers WHERE id = $1 AND account_id = $2 AND status <> 'deleted' FOR SHARE",
                request.path_params["offer_id"], account.id,
            )
        if row is None:
            raise not_found("offer_not_found", "Offer not found")
        await publish_offer(request.app.state.redis, row)
    return JSONResponse({"success": True, "offer": offer_json(row)})


async def delete_offer(request: Request) -> JSONResponse:
    """Soft delete: links keep their history, the edge answers 404 for them from now on."""
    account = await authenticate(request)
    offer_id = _offer_id(request)
    db = request.app.state.db
    async with _edge_kept_with_postgresql(request, account.id, offer_id), db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "UPDATE offers SET status = 'deleted', updated_at = now()"
            f" WHERE id = $1 AND account_id = $2 AND status <> 'deleted' RETURNING {OFFER_COLUMNS}",
            offer_id, account.id,
        )
        if row is None:
            raise not_found("offer_not_found", "Offer not found")
        await publish_offer(request.app.state.redis, row)
    return JSONResponse({"success": True, "id": row["id"], "deleted": True})


ROUTES = [
    Route("/api/v2/offers", create_offer, methods=["POST"]),
    Route("/api/v2/offers", list_offers, methods=["GET"]),
    Route("/api/v2/offers/{offer_id}", get_offer, methods=["GET"]),
    Route("/api/v2/offers/{offer_id}", update_offer, methods=["PATCH"]),
    Route("/api/v2/offers/{offer_id}", delete_offer, methods=["DELETE"]),
]
