"""The worker's check that every offer at the edge is what PostgreSQL holds (edge_offers.py)."""
from __future__ import annotations

import asyncio

import httpx
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.worker import edge_offers
from services.worker import main as worker_main
from shared import edge
from tests.helpers import make_offer

ACTIVE, PAUSED = "active", "paused"


async def edge_status(redis, offer_id: str) -> str | None:
    raw = await redis.get(edge.offer_key(offer_id))
    return None if raw is None else edge.loads(raw)["s"]


async def plant(db, redis, offer: dict, status: str) -> None:
    """What a publish whose transaction then rolled back leaves at the edge."""
    row = await db.fetchrow("SELECT * FROM offers WHERE id = $1", offer["id"])
    await redis.set(edge.offer_key(offer["id"]), edge.dumps(edge.offer_entry({**row, "status": status})))


async def test_entries_unlike_postgresql_are_published_again(api, db, redis, tenant):
    unpaused = await make_offer(api, tenant, status=PAUSED)
    await plant(db, redis, unpaused, ACTIVE)
    missing = await make_offer(api, tenant)
    await redis.delete(edge.offer_key(missing["id"]))
    garbled = await make_offer(api, tenant)
    await redis.set(edge.offer_key(garbled["id"]), b"\x00not json")
    kept = await make_offer(api, tenant)
    kept_raw = await redis.get(edge.offer_key(kept["id"]))

    assert await edge_offers.check_offers(db, redis) >= 3
    for offer in (unpaused, missing, garbled, kept):
        row = await db.fetchrow("SELECT * FROM offers WHERE id = $1", offer["id"])
        assert edge.loads(await redis.get(edge.offer_key(offer["id"]))) == edge.offer_entry(row)
    assert await redis.get(edge.offer_key(kept["id"])) == kept_raw
    await plant(db, redis, unpaused, ACTIVE)  # again, in a later turn
    await edge_offers.check_offers(db, redis)
    assert await edge_status(redis, unpaused["id"]) == PAUSED


async def test_a_change_in_flight_is_waited_for_not_undone(api, db, redis, tenant, caplog):
    # As the gateway changes an offer: the row updated, the change published, then the commit. The
    # check sees the edge ahead of what is committed; it waits for the row's lock, then publishes
    # what committed: the change if it committed, the row as it was if it rolled back.
    for outcome in ("commit", "rollback"):
        offer = await make_offer(api, tenant)
        async with db.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            row = await conn.fetchrow("UPDATE offers SET status = 'paused' WHERE id = $1 RETURNING *", offer["id"])
            await redis.set(edge.offer_key(offer["id"]), edge.dumps(edge.offer_entry(row)))
            check = asyncio.ensure_future(edge_offers.check_offers(db, redis))
            await asyncio.sleep(0.3)
            assert not check.done()  # waiting for the lock the change holds
            await (transaction.commit() if outcome == "commit" else transaction.rollback())
        await asyncio.wait_for(check, 10)
        assert await edge_status(redis, offer["id"]) == (PAUSED if outcome == "commit" else ACTIVE), outcome
        # A change that committed was already at the edge: nothing written, nothing reported.
        reported = offer["id"] in "".join(r.getMessage() for r in caplog.records if r.name == edge_offers.log.name)
        assert reported == (outcome == "rollback"), outcome
        caplog.clear()


class _ReplyLost:
    """The gateway's Redis during a network blip: its first SET is applied but the reply is lost;
    every later one times out, until the blip is over."""

    def __init__(self, real: object) -> None:
        self._real = real
        self._applied = False

    async def set(self, *args: object, **kwargs: object) -> bool:
        if not self._applied:
            await self._real.set(*args, **kwargs)  # type: ignore[attr-defined]
            self._applied = True
        raise RedisTimeoutError("Timeout reading from socket")

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


async def test_a_failed_unpause_stops_answering_once_the_worker_checks(api, db, redis, settings, tenant, gateway_app, monkeypatch):
    # PATCH paused -> active: the publish reaches Redis, its reply does not, so the request fails
    # and PostgreSQL rolls back; the gateway's own republish fails too (the blip). The running
    # worker's check puts the edge back to paused.
    offer = await make_offer(api, tenant, status=PAUSED)
    real = gateway_app.state.redis
    gateway_app.state.redis = _ReplyLost(real)
    try:
        transport = httpx.ASGITransport(app=gateway_app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
            resp = await client.patch(f"/api/v2/offers/{offer['id']}", headers=tenant.headers, json={"status": ACTIVE})
    finally:
        gateway_app.state.redis = real
    assert resp.status_code == 503, resp.text
    assert await db.fetchval("SELECT status FROM offers WHERE id = $1", offer["id"]) == PAUSED
    assert await edge_status(redis, offer["id"]) == ACTIVE  # what the blip left

    monkeypatch.setattr(edge_offers, "CHECK_INTERVAL", 0.05)
    ctx: dict = {"settings": settings}
    await worker_main.startup(ctx)
    try:
        for _ in range(200):
            if await edge_status(redis, offer["id"]) == PAUSED:
                break
            await asyncio.sleep(0.05)
        assert await edge_status(redis, offer["id"]) == PAUSED
    finally:
        await worker_main.shutdown(ctx)
