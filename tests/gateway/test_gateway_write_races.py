"""Concurrent gateway writes (review for races): whatever order they run in, PostgreSQL and the
edge end the same, and each answer is one that some serial order would have given."""
import asyncio
import random

import orjson

from shared import edge
from tests.helpers import make_offer, random_phone


async def test_concurrent_creates_with_one_external_id_make_one_offer(api, db, tenant):
    ext = f"ext-{random.randrange(10**9)}"
    resps = await asyncio.gather(*(
        api.post("/api/v2/offers", headers=tenant.headers, json={"name": f"o{i}", "destination_url": "https://lp.example/",
                                                                  "external_id": ext})
        for i in range(8)
    ))
    codes = sorted(r.status_code for r in resps)
    assert codes == [201] + [409] * 7, [r.text for r in resps]
    assert await db.fetchval("SELECT count(*) FROM offers WHERE account_id = $1 AND external_id = $2", tenant.account_id, ext) == 1


async def test_concurrent_patches_deletes_and_links_leave_the_edge_as_postgresql(api, db, redis, tenant):
    offers = [await make_offer(api, tenant, destination_url="https://lp.example/0") for _ in range(4)]
    rnd = random.Random(7)

    def op(offer_id):
        kind = rnd.choice(["patch_d", "patch_s", "patch_empty", "link", "link", "delete"])
        path = f"/api/v2/offers/{offer_id}"
        if kind == "patch_d":
            return kind, api.patch(path, headers=tenant.headers, json={"destination_url": f"https://lp.example/{rnd.random()}"})
        if kind == "patch_s":
            return kind, api.patch(path, headers=tenant.headers, json={"status": rnd.choice(["active", "paused"])})
        if kind == "patch_empty":
            return kind, api.patch(path, headers=tenant.headers, json={})
        if kind == "delete":
            return kind, api.delete(path, headers=tenant.headers)
        return kind, api.post("/api/v2/links", headers=tenant.headers, json={"offerId": offer_id, "listId": tenant.list_id})

    for _ in range(5):
        ops = [op(o["id"]) for o in offers for _ in range(6)]
        rnd.shuffle(ops)
        resps = await asyncio.gather(*(c for _, c in ops))
        for (kind, _), r in zip(ops, resps):
            assert r.status_code in (200, 201, 404), (kind, r.status_code, r.text)
        for o in offers:
            row = await db.fetchrow(f"SELECT {edge.OFFER_ENTRY_COLUMNS} FROM offers WHERE id = $1", o["id"])
            assert orjson.loads(await redis.get(edge.offer_key(o["id"]))) == edge.offer_entry(row)
        for o in offers:  # revive for the next round
            await db.execute("UPDATE offers SET status = 'active' WHERE id = $1", o["id"])
            await api.patch(f"/api/v2/offers/{o['id']}", headers=tenant.headers, json={})


async def test_concurrent_sends_to_one_new_contact_store_it_once(api, db, tenant):
    phone = random_phone()
    resps = await asyncio.gather(*(
        api.post("/api/v2/send", headers=tenant.headers, json={"to": phone, "list_id": tenant.list_id, "body": f"hi {i}"})
        for i in range(8)
    ))
    assert all(r.status_code == 201 for r in resps), [r.text for r in resps]
    assert await db.fetchval("SELECT count(*) FROM contacts WHERE list_id = $1 AND phone_number = $2", tenant.list_id, phone) == 1
    assert await db.fetchval("SELECT count(*) FROM messages WHERE list_id = $1 AND to_phone = $2", tenant.list_id, phone) == 8
    lists = (await api.get("/api/v2/lists", headers=tenant.headers)).json()["lists"]
    assert [lst["contact_count"] for lst in lists if lst["id"] == tenant.list_id] == [1]
