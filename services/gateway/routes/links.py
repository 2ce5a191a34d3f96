"""POST /api/v2/links, exactly as spec/links.txt."""
from __future__ import annotations

from collections.abc import Callable

import asyncpg
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.gateway import idempotency
from services.gateway.auth import authenticate
from services.gateway.http import JSONResponse, parse_json_object, present, read_body
from services.gateway.lookups import LIST_COLUMNS, OFFER_COLUMNS, find_offer
from services.gateway.publish import publish_link
from shared import ids
from shared.edge import host_of, tracker_url
from shared.errors import ApiError, bad_request, not_found, validation
from shared.phone import PhoneError, parse_e164

LINK_ID_ATTEMPTS = 5


def _ref(data: dict, *names: str) -> str | None:
    for name in names:
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise validation(f"{name} must be a string")
        if str(value).strip():
            return str(value).strip()
    return None


def _given(data: dict, *names: str) -> object:
    """The value of the first of ``names`` that is ``present``, else None."""
    return next((data[name] for name in names if present(data.get(name))), None)


async def create_link(request: Request) -> Response:
    account = await authenticate(request)
    if not account.offer_management:
        raise ApiError(403, "product_not_enabled", "Offer Management is not enabled for this account")
    raw = await read_body(request)
    key = idempotency.requested(request, account.id, raw)
    data = parse_json_object(raw)

    offer_ref = _ref(data, "offerId", "offer_id") or _ref(data, "externalOfferId", "external_offer_id")
    if offer_ref is None:
        raise bad_request("missing_offer_id", "Provide offerId or externalOfferId")
    # An empty value is no value: {"listId": "", "phoneNumber": "+1..."} picks the list by phone.
    list_ref = _given(data, "listId", "list_id")
    phone_ref = _given(data, "phoneNumber", "phone_number")
    if list_ref is None and phone_ref is None:
        raise bad_request("missing_list_identifier", "Provide listId or phoneNumber")
    list_id: int | None = None
    phone: str | None = None
    if list_ref is not None:
        list_id = ids.given_list_id(list_ref, "listId")
        if list_id is None:
            raise not_found("list_not_found", "List not found")
    else:
        try:
            phone = parse_e164(phone_ref)
        except PhoneError as exc:
            raise bad_request("invalid_phone", str(exc)) from None

    db = request.app.state.db
    if key is not None:
        # Answered before (even if its offer was paused since): that answer, and no second link.
        async with db.acquire() as conn:
            if (replayed := await idempotency.replayed(conn, key)) is not None:
                return replayed
    offer = await find_offer(db, account.id, offer_ref)
    if offer is None or offer["status"] != "active":
        raise not_found("offer_not_found", "No active offer matches that id")
    if list_id is not None:
        lst = await db.fetchrow(
            f"SELECT {LIST_COLUMNS} FROM lists WHERE account_id = $1 AND id = $2", account.id, list_id
        )
    else:
        lst = await db.fetchrow(f"SELECT {LIST_COLUMNS} FROM lists WHERE account_id = $1 AND phone_number = $2", account.id, phone)
    if lst is None or lst["status"] != "active":
        raise not_found("list_not_found", "The sending list was not found or is not active")
    if not lst["short_domain"]:
        raise ApiError(409, "no_domain_configured", "The sending list has no link shortener domain configured")

    tracker_domain = lst["tracker_domain"] or request.app.state.settings.default_tracker_domain
    make_id: Callable[[], str] = getattr(request.app.state, "link_id_factory", ids.link_id)
    async with db.acquire() as conn:
        for _ in range(LINK_ID_ATTEMPTS):
            tracker = ids.tracker_id()
            try:
                async with conn.transaction():
                    # The offer again, locked until the commit: a pause, edit or delete that
                    # committed since it was read is seen (404, or its latest row published), and
                    # one that comes now waits, so its own publish lands after this one's.
                    offer = await conn.fetchrow(
                        f"SELECT {OFFER_COLUMNS} FROM offers WHERE id = $1 FOR SHARE", offer["id"]
                    )
                    if offer is None or offer["status"] != "active":
                        raise not_found("offer_not_found", "No active offer matches that id")
                    link = await conn.fetchrow(
                        "INSERT INTO links (id, account_id, offer_id, list_id, domain, domain_host, tracker_id, tracker_url)"
                        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                        " RETURNING id, account_id, offer_id, list_id, domain, domain_host, tracker_id, tracker_url",
                        make_id(), account.id, offer["id"], lst["id"], lst["short_domain"],
                        host_of(lst["short_domain"]), tracker, tracker_url(tracker_domain, tracker),
                    )
                    response = _created(link, offer)
                    if key is not None:
                        # In the link's transaction and before its publish: a request with the
                        # same key that committed first leaves nothing of this one, at the edge either.
                        await key.remember(conn, response)
                    await publish_link(request.app.state.redis, link=link, offer=offer)
                return response
            except asyncpg.UniqueViolationError:
                continue
            except idempotency.Raced:
                assert key is not None
                return await key.winners_answer(conn)
    raise ApiError(500, "id_collision", "Could not generate a unique link id; retry the request")


def _created(link: asyncpg.Record, offer: asyncpg.Record) -> JSONResponse:
    return JSONResponse(
        {
            "success": True,
            "shortUrl": f"{link['domain']}/{link['id']}",
            "linkId": link["id"],
            "clickTrackerUrl": link["tracker_url"],
            "destinationUrl": offer["destination_url"],
            "domain": link["domain"],
            "offerId": offer["id"],
        },
        status_code=201,
    )


ROUTES = [Route("/api/v2/links", create_link, methods=["POST"])]
