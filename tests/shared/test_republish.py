"""Rebuilding the edge's Redis from PostgreSQL after Redis lost its data."""
import asyncio
import json
import re

from shared import edge
from shared.republish import republish
from tests.helpers import make_link, make_offer, random_phone
from tests.test_cli import trackly


async def edge_keys(api, db, tenant):
    """An offer, a link and a message (with a creative) sent through it: their edge keys."""
    offer = await make_offer(api, tenant, destination_url="https://lp.example/?c={click_id}&cr={creative}")
    link = await make_link(api, tenant, offer["id"])
    resp = await api.post("/api/v2/send", headers=tenant.headers, json={
        "to": random_phone(), "list_id": tenant.list_id, "body": f"Hi {link['shortUrl']}", "creative_id": "cr-9"})
    body = await db.fetchval("SELECT body FROM messages WHERE id = $1", resp.json()["message_id"])
    code = re.search(r"sms\.example\.com/([A-Za-z0-9]{7})", body).group(1)
    tracker_id = link["clickTrackerUrl"].rpartition("/")[2]
    keys = [edge.short_key("sms.example.com", link["linkId"]), edge.tracker_key(tracker_id),
            edge.short_key("sms.example.com", code), edge.offer_key(offer["id"])]
    return offer, keys


async def test_republish_writes_back_exactly_what_the_gateway_published(api, db, redis, tenant):
    offer, keys = await edge_keys(api, db, tenant)
    published = [await redis.get(k) for k in keys]
    assert all(published)
    await redis.delete(*keys)
    async with db.acquire() as conn:
        counts = await republish(conn, redis)
    assert [await redis.get(k) for k in keys] == published
    assert counts["links"] >= 1 and counts["message_codes"] >= 1 and counts["offers"] >= 1


async def test_republish_keeps_an_offer_change_made_while_it_runs(api, db, redis, tenant):
    offer, keys = await edge_keys(api, db, tenant)
    key = edge.offer_key(offer["id"])

    class PauseMidPass:
        """The real Redis; the offer is paused (published and committed by the gateway) after the
        offers pass has read it and before it writes what it read. (Not awaited there: the pass
        holds the offer's row until it has written it, and the pause waits for that.)"""

        pause = None

        async def mset(self, mapping):
            if key in mapping and self.pause is None:
                self.pause = asyncio.ensure_future(
                    api.patch(f"/api/v2/offers/{offer['id']}", headers=tenant.headers, json={"status": "paused"}))
                await asyncio.sleep(0.2)
            await redis.mset(mapping)

    wrapped = PauseMidPass()
    async with db.acquire() as conn:
        await republish(conn, wrapped)
    assert (await wrapped.pause).status_code == 200
    assert edge.loads(await redis.get(key))["s"] == "paused"


async def test_republish_writes_the_offers_before_the_links_and_codes_that_need_them(api, db, redis, tenant):
    """The edge answers a link or message code only with its offer's entry (404 without it). A pass
    on an emptied Redis that wrote the offers last left every link and code answering 404 until its
    very end (minutes, for tens of millions of codes), though most were written long before."""
    offer, keys = await edge_keys(api, db, tenant)
    link_key, _, code_key, offer_key = keys
    await redis.delete(*keys)

    class Watch:
        """The real Redis; notes whether the offer is there when its link and its code are written."""

        offer_there: dict[str, bool] = {}

        async def mset(self, mapping):
            for key in (link_key, code_key):
                if key in mapping:
                    self.offer_there[key] = bool(await redis.exists(offer_key))
            await redis.mset(mapping)

    watch = Watch()
    async with db.acquire() as conn:
        await republish(conn, watch)
    assert watch.offer_there == {link_key: True, code_key: True}


async def test_republish_never_leaves_an_offer_change_in_flight_undone(api, db, redis, tenant):
    """The gateway publishes an offer's change after its UPDATE and before its COMMIT. A change in
    flight when the pass reads the offers (published, not committed) was overwritten with the
    committed row; one that committed after the pass read the changed offers again stayed undone
    at the edge (a paused offer answering) until the worker's offer check, which a worker makes only
    once its pass is over: minutes, for tens of millions of codes."""

    from services.gateway.publish import publish_offer

    offer = await make_offer(api, tenant)
    key = edge.offer_key(offer["id"])
    async with db.acquire() as gateway, db.acquire() as conn:
        tx = gateway.transaction()
        await tx.start()
        row = await gateway.fetchrow(
            f"UPDATE offers SET status = 'paused', updated_at = now() WHERE id = $1 RETURNING {edge.OFFER_ENTRY_COLUMNS}",
            offer["id"])
        await publish_offer(redis, row)
        running = asyncio.ensure_future(republish(conn, redis, writers_wait=30))
        await asyncio.sleep(0.5)  # the pass reads the offers (and reads them again) meanwhile
        await tx.commit()
        await running
    assert edge.loads(await redis.get(key))["s"] == "paused"


async def test_a_fetch_of_the_pass_may_outlast_the_pools_command_timeout(api, db, redis, settings, tenant):
    """The worker makes its pass on a connection of its pool, whose command timeout (60 s) bounds
    every statement. The codes' first fetch hashes every message before its first row (28 s for
    15M messages on this machine): from about 30M on, the worker's pass failed there, every time,
    and the edge never had its codes back. Here a fetch made to wait (a lock) for longer than a
    short command timeout."""
    from shared import db as shared_db

    await edge_keys(api, db, tenant)
    pool = await shared_db.create_pool(settings.database_url, command_timeout=0.3)
    try:
        async with db.acquire() as locker, pool.acquire() as conn:
            tx = locker.transaction()
            await tx.start()
            await locker.execute("LOCK TABLE message_links IN ACCESS EXCLUSIVE MODE")
            running = asyncio.ensure_future(republish(conn, redis))
            await asyncio.sleep(1)
            await tx.rollback()
            counts = await running
    finally:
        await pool.close()
    assert counts["message_codes"] >= 1


async def test_cli_republish(api, db, redis, settings, tenant):
    _, keys = await edge_keys(api, db, tenant)
    await redis.delete(*keys)
    out = trackly(settings, "admin", "republish")
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout)
    assert set(counts) == {"links", "message_codes", "offers", "message_code_days"}
    assert counts["message_code_days"] == 0 and min(counts.values()) >= 0 < counts["message_codes"]
    assert all([await redis.get(k) for k in keys])


async def test_message_codes_expire_a_set_number_of_days_after_their_send(db, redis, settings, tenant):
    """TRACKLY_MESSAGE_CODE_DAYS bounds the Redis memory per-message codes take: each code lives that
    many days from its message's send (from now for a send dated ahead; a history import of older
    sends publishes none). A republish applies the setting to the codes already in Redis: those
    within it get what they have left, those past it are deleted; with 0 every code is kept."""
    from dataclasses import replace
    from datetime import timedelta

    import httpx

    from services.gateway.app import create_app
    from shared.timeutil import isoformat, utcnow

    day_ms = 86_400_000
    days_ago = (10, 40, -400)  # history sends; the last is dated ahead
    app = create_app(replace(settings, message_code_days=30))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway.test"
    ) as api:
        link = await make_link(api, tenant, (await make_offer(api, tenant))["id"])
        body = f"Hi {link['shortUrl']}"
        sent = await api.post("/api/v2/send", headers=tenant.headers,
                              json={"to": random_phone(), "list_id": tenant.list_id, "body": body})
        now = utcnow()
        imported = await api.post("/api/v2/history/sends", headers=tenant.headers, json={"records": [
            {"to": random_phone(), "list_id": tenant.list_id, "body": body, "timestamp": isoformat(now - timedelta(days=d))}
            for d in days_ago]})
        assert imported.json()["success_count"] == 3, imported.text
    rows = await db.fetch(
        "SELECT ml.code, m.id, m.sent_at FROM message_links ml JOIN messages m ON m.id = ml.message_id"
        " WHERE m.account_id = $1 ORDER BY m.sent_at DESC", tenant.account_id)
    ahead, fresh, older, expired = [edge.short_key("sms.example.com", r["code"]) for r in rows]
    assert rows[1]["id"] == sent.json()["message_id"]

    def about(days: int):
        return lambda ms: days * day_ms - 60_000 < ms <= days * day_ms

    async def lifetimes(*checks) -> None:
        for key, check in zip((ahead, fresh, older, expired), checks):
            assert check(await redis.pttl(key)), (key, await redis.pttl(key))

    never = (lambda ms: ms == -2)
    await lifetimes(about(30), about(30), about(20), never)

    # Published while the setting was off: kept for good, until a republish applies the setting.
    await redis.set(expired, b'{"k":"x","m":"y"}')
    await redis.persist(fresh)
    async with db.acquire() as conn:
        counts = await republish(conn, redis, code_days=30)
    await lifetimes(about(30), about(30), about(20), never)
    async with db.acquire() as conn:
        unbounded = await republish(conn, redis)
    kept = (lambda ms: ms == -1)
    await lifetimes(kept, kept, kept, kept)
    assert unbounded["message_codes"] - counts["message_codes"] >= 1


async def test_republish_waits_for_a_link_published_before_the_loss_and_committed_after(api, db, redis, tenant):
    """The gateway publishes a link before its transaction commits. Redis loses the key in between,
    and the pass (the worker's, once it sees the loss) starts before that commit: once done, it
    waits for the transaction and writes its link too, rather than miss it from its snapshot. The
    rest is written first: the wait holds no link of the edge back."""
    import asyncio

    from services.gateway.publish import publish_link

    offer = await db.fetchrow("SELECT * FROM offers WHERE id = $1", (await make_offer(api, tenant))["id"])
    committed = await make_link(api, tenant, offer["id"])
    async with db.acquire() as writer, db.acquire() as conn:
        tx = writer.transaction()
        await tx.start()
        link = await writer.fetchrow(
            "INSERT INTO links (id, account_id, offer_id, list_id, domain, domain_host, tracker_id, tracker_url)"
            " VALUES ('Wt8kQ2', $1, $2, $3, 'https://sms.example.com', 'sms.example.com', $4, $5) RETURNING *",
            tenant.account_id, offer["id"], tenant.list_id, "7f0c4e2a-1b3d-4c5e-8f9a-0b1c2d3e4f50",
            "https://ct.example.com/c/7f0c4e2a-1b3d-4c5e-8f9a-0b1c2d3e4f50",
        )
        await publish_link(redis, link=link, offer=offer)
        keys = [edge.short_key("sms.example.com", "Wt8kQ2"), edge.tracker_key(link["tracker_id"])]
        others = [edge.short_key("sms.example.com", committed["linkId"]), edge.offer_key(offer["id"])]
        await redis.delete(*keys, *others)  # Redis loses its data
        running = asyncio.ensure_future(republish(conn, redis, writers_wait=30))
        await asyncio.sleep(0.5)
        waited = not running.done()
        written_meanwhile = [await redis.get(k) for k in others]
        await tx.commit()
        await running
    assert all([await redis.get(k) for k in keys])
    assert waited and all(written_meanwhile)


async def test_republish_waits_for_an_offer_published_before_the_loss_and_committed_after(api, db, redis, tenant):
    """As for a link: an offer created in a transaction open when the pass began (published before
    Redis lost it) is not in the pass's read of the offers; once that transaction has committed,
    the pass writes it too."""
    from services.gateway.publish import publish_offer

    async with db.acquire() as writer, db.acquire() as conn:
        tx = writer.transaction()
        await tx.start()
        row = await writer.fetchrow(
            "INSERT INTO offers (id, account_id, name, destination_url) VALUES ('ofWt8kQ2', $1, 'late', 'https://lp.example/')"
            f" RETURNING {edge.OFFER_ENTRY_COLUMNS}", tenant.account_id)
        await publish_offer(redis, row)
        key = edge.offer_key("ofWt8kQ2")
        await redis.delete(key)  # Redis loses its data
        running = asyncio.ensure_future(republish(conn, redis, writers_wait=30))
        await asyncio.sleep(0.5)
        await tx.commit()
        await running
    assert edge.loads(await redis.get(key)) == edge.offer_entry(row)


async def test_republish_waits_only_so_long_for_a_transaction_left_open(db, redis, caplog):
    async with db.acquire() as idle, db.acquire() as conn:
        tx = idle.transaction()
        await tx.start()
        await idle.fetchval("SELECT pg_current_xact_id()")  # it has written (holds a transaction id)
        try:
            counts = await republish(conn, redis, writers_wait=0.3)
        finally:
            await tx.rollback()
    assert counts["offers"] >= 0
    assert "republished without waiting longer for 1 transactions" in caplog.text


async def test_republish_waits_only_for_transactions_on_its_own_database(settings, db, redis, caplog):
    """pg_locks names every database's transactions: one left open on another database of the same
    server (another application's, another test run's) has published nothing here, and the pass,
    which runs while the edge answers 404 for every link, must not wait a minute for it."""
    import asyncio
    import secrets

    import asyncpg

    from tests.helpers import scratch_database

    # (its own database: the suite's may be "postgres")
    async with scratch_database(settings, db, f"trackly_other_{secrets.token_hex(4)}") as dsn:
        other = await asyncpg.connect(dsn)
        try:
            async with other.transaction(), db.acquire() as conn:
                await other.fetchval("SELECT pg_current_xact_id()")  # it has written (holds a transaction id)
                counts = await asyncio.wait_for(republish(conn, redis, writers_wait=30), 15)
        finally:
            await other.close()
    assert counts["offers"] >= 0
    assert "without waiting longer" not in caplog.text
