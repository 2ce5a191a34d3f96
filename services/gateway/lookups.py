"""Account-scoped lookups shared by several endpoints. Another account's rows are never found."""
from __future__ import annotations

from collections.abc import Iterable

import asyncpg

OFFER_COLUMNS = (
    "id, account_id, name, destination_url, external_id, status, payout, currency,"
    " click_window_days, affiliate_id, created_at, updated_at"
)


async def find_offer(conn: asyncpg.Connection | asyncpg.Pool, account_id: int, ref: str) -> asyncpg.Record | None:
    """An offer by internal id, else by external id; deleted offers are not found."""
    return await conn.fetchrow(
        f"SELECT {OFFER_COLUMNS} FROM offers"
        " WHERE account_id = $1 AND status <> 'deleted' AND (id = $2 OR external_id = $2)"
        " ORDER BY (id = $2) DESC LIMIT 1",
        account_id, ref,
    )


async def find_offers(
    conn: asyncpg.Connection | asyncpg.Pool, account_id: int, refs: Iterable[str], *, include_deleted: bool = False
) -> dict[str, asyncpg.Record]:
    """Many refs at once; the result maps each ref that resolved: an internal id wins, then a live
    offer's external id. ``include_deleted``: deleted offers resolve too, after live ones (what
    happened in the past may name an offer deleted since: revenue, history imports); of deleted
    ones, the one deleted last (the last to hold the external id), as the worker's lookup takes."""
    wanted = sorted(set(refs))
    if not wanted:
        return {}
    rows = await conn.fetch(
        f"SELECT {OFFER_COLUMNS} FROM offers"
        " WHERE account_id = $1 AND ($3 OR status <> 'deleted') AND (id = ANY($2::text[]) OR external_id = ANY($2::text[]))"
        # Live ones last: they overwrite a deleted one's external id; a deleted one is never
        # written again, so the deleted are in the order they were deleted.
        " ORDER BY status = 'deleted' DESC, updated_at, id",
        account_id, wanted, include_deleted,
    )
    found: dict[str, asyncpg.Record] = {}
    for row in rows:
        if row["external_id"] in wanted:
            found[row["external_id"]] = row
    for row in rows:
        found[row["id"]] = row
    return found


LIST_COLUMNS = "id, account_id, name, phone_number, status, short_domain, tracker_domain"


async def find_lists(
    conn: asyncpg.Connection | asyncpg.Pool, account_id: int, *, ids: Iterable[int] = (), phones: Iterable[str] = ()
) -> tuple[dict[int, asyncpg.Record], dict[str, asyncpg.Record]]:
    rows = await conn.fetch(
        f"SELECT {LIST_COLUMNS} FROM lists WHERE account_id = $1"
        " AND (id = ANY($2::bigint[]) OR phone_number = ANY($3::text[]))",
        account_id, sorted(set(ids)), sorted(set(phones)),
    )
    return {r["id"]: r for r in rows}, {r["phone_number"]: r for r in rows}
