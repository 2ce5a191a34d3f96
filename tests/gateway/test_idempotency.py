"""Idempotency-Key on POST /send and /send/bulk: a retry is answered as the first request was,
and nothing is stored twice."""
from __future__ import annotations

import asyncio
import secrets
from decimal import Decimal

import asyncpg
import httpx
import orjson

from services.worker.expiry import expire_once
from shared.idempotency import KEEP
from tests.gateway.test_api_basics import assert_error
from tests.helpers import Tenant, make_link, make_offer, make_tenant, random_phone


def keyed(tenant: Tenant, key: str) -> dict[str, str]:
    return {**tenant.headers, "Idempotency-Key": key}


async def stored(db: asyncpg.Pool, tenant: Tenant, phone: str) -> int:
    return await db.fetchval("SELECT count(*) FROM messages WHERE account_id = $1 AND to_phone = $2", tenant.account_id, phone)


async def test_a_retried_send_is_answered_not_repeated(api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool) -> None:
    offer = await make_offer(api, tenant)
    link = await make_link(api, tenant, offer["id"])
    phone, key = random_phone(), secrets.token_hex(8)
    body = {"to": phone, "list_id": tenant.list_id, "body": f"Deal {link['shortUrl']}"}
    first = await api.post("/api/v2/send", headers=keyed(tenant, key), json=body)
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    again = await api.post("/api/v2/send", headers=keyed(tenant, key), json=body)
    assert (again.status_code, again.json(), again.headers["idempotent-replayed"]) == (201, first.json(), "true")
    assert await stored(db, tenant, phone) == 1
    # Without the key, or with another, it is a new send.
    assert (await api.post("/api/v2/send", headers=tenant.headers, json=body)).status_code == 201
    other = await api.post("/api/v2/send", headers=keyed(tenant, key + "x"), json=body)
    assert other.status_code == 201 and other.json()["message_id"] != first.json()["message_id"]
    assert await stored(db, tenant, phone) == 3


async def test_a_key_is_the_accounts_own(api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool) -> None:
    other = await make_tenant(db)
    key, phone = secrets.token_hex(8), random_phone()
    mine = await api.post("/api/v2/send", headers=keyed(tenant, key), json={"to": phone, "list_id": tenant.list_id, "body": "a"})
    theirs = await api.post("/api/v2/send", headers=keyed(other, key), json={"to": phone, "list_id": other.list_id, "body": "a"})
    assert mine.status_code == theirs.status_code == 201
    assert mine.json()["message_id"] != theirs.json()["message_id"]
    assert "idempotent-replayed" not in theirs.headers


async def test_the_same_key_with_another_request_is_refused(api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool) -> None:
    key, phone = secrets.token_hex(8), random_phone()
    body = {"to": phone, "list_id": tenant.list_id, "body": "a"}
    assert (await api.post("/api/v2/send", headers=keyed(tenant, key), json=body)).status_code == 201
    changed = await api.post("/api/v2/send", headers=keyed(tenant, key), json={**body, "body": "b"})
    assert_error(changed, 422, "idempotency_key_reused")
    elsewhere = await api.post("/api/v2/send/bulk", headers=keyed(tenant, key), json={"messages": [body]})
    assert_error(elsewhere, 422, "idempotency_key_reused")
    assert await stored(db, tenant, phone) == 1


async def test_a_malformed_key_is_refused(api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool) -> None:
    phone = random_phone()
    for key in ("", "has space", "x" * 256, "é"):
        resp = await api.post(
            "/api/v2/send", headers=keyed(tenant, key) if key.isascii() else {**tenant.headers, "Idempotency-Key": key.encode()},
            json={"to": phone, "list_id": tenant.list_id, "body": "a"},
        )
        assert_error(resp, 400, "validation_error")
    assert await stored(db, tenant, phone) == 0


async def test_a_bulk_send_is_answered_once_and_a_refusal_is_not_remembered(
    api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool
) -> None:
    key = secrets.token_hex(8)
    phones = [random_phone() for _ in range(3)]
    body = {"messages": [{"to": p, "list_id": tenant.list_id, "body": f"m{i}"} for i, p in enumerate(phones)]
            + [{"to": "+1invalid", "list_id": tenant.list_id, "body": "x"}]}
    first = await api.post("/api/v2/send/bulk", headers=keyed(tenant, key), json=body)
    assert first.status_code == 200 and first.json()["queued_count"] == 3 and first.json()["error_count"] == 1
    again = await api.post("/api/v2/send/bulk", headers=keyed(tenant, key), json=body)
    assert (again.json(), again.headers["idempotent-replayed"]) == (first.json(), "true")
    assert [await stored(db, tenant, p) for p in phones] == [1, 1, 1]
    # Every record refused: nothing stored, nothing remembered; the same key with a good request sends.
    key = secrets.token_hex(8)
    refused = await api.post("/api/v2/send/bulk", headers=keyed(tenant, key),
                             json={"messages": [{"to": "+1invalid", "list_id": tenant.list_id, "body": "x"}]})
    assert refused.json()["queued_count"] == 0
    phone = random_phone()
    fixed = await api.post("/api/v2/send/bulk", headers=keyed(tenant, key),
                           json={"messages": [{"to": phone, "list_id": tenant.list_id, "body": "x"}]})
    assert fixed.json()["queued_count"] == 1 and "idempotent-replayed" not in fixed.headers


async def test_concurrent_requests_with_one_key_store_one_send(
    api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool
) -> None:
    key, phone = secrets.token_hex(8), random_phone()
    body = {"messages": [{"to": phone, "list_id": tenant.list_id, "body": "once"}]}
    answers = await asyncio.gather(*(api.post("/api/v2/send/bulk", headers=keyed(tenant, key), json=body) for _ in range(10)))
    assert {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1
    assert sum("idempotent-replayed" not in a.headers for a in answers) == 1
    assert await stored(db, tenant, phone) == 1


async def test_keys_are_forgotten_after_a_day(api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool) -> None:
    key, phone = secrets.token_hex(8), random_phone()
    body = {"to": phone, "list_id": tenant.list_id, "body": "a"}
    first = await api.post("/api/v2/send", headers=keyed(tenant, key), json=body)
    await db.execute("UPDATE idempotency_keys SET created_at = now() - $3::interval - interval '1 second'"
                     " WHERE account_id = $1 AND key = $2", tenant.account_id, key, KEEP)
    # Past KEEP the key is a new request, before and after the worker has deleted it.
    late = await api.post("/api/v2/send", headers=keyed(tenant, key), json=body)
    assert late.status_code == 201 and late.json()["message_id"] != first.json()["message_id"]
    assert "idempotent-replayed" not in late.headers
    assert await stored(db, tenant, phone) == 2
    await db.execute("UPDATE idempotency_keys SET created_at = now() - $3::interval - interval '1 second'"
                     " WHERE account_id = $1 AND key = $2", tenant.account_id, key, KEEP)
    assert await expire_once(db) >= 1
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys WHERE account_id = $1", tenant.account_id) == 0
    assert (await api.post("/api/v2/send", headers=keyed(tenant, key), json=body)).status_code == 201
    assert await stored(db, tenant, phone) == 3


async def revenue_rows(db: asyncpg.Pool, message_id: str) -> int:
    return await db.fetchval("SELECT count(*) FROM revenue WHERE message_id = $1", message_id)


async def test_a_retried_revenue_record_is_answered_not_counted_twice(
    api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool
) -> None:
    sent = await api.post("/api/v2/send", headers=tenant.headers, json={"to": random_phone(), "list_id": tenant.list_id, "body": "a"})
    message_id = sent.json()["message_id"]
    key = secrets.token_hex(8)
    body = {"message_id": message_id, "revenue": "24.99", "attribution_type": "sale"}
    first = await api.post("/api/v2/revenue", headers=keyed(tenant, key), json=body)
    assert first.status_code == 201, first.text
    again = await api.post("/api/v2/revenue", headers=keyed(tenant, key), json=body)
    assert (again.status_code, again.json(), again.headers["idempotent-replayed"]) == (201, first.json(), "true")
    assert_error(await api.post("/api/v2/revenue", headers=keyed(tenant, key), json={**body, "revenue": 1}),
                 422, "idempotency_key_reused")
    bulk_key = secrets.token_hex(8)
    bulk = {"records": [body, {**body, "revenue": "1.01"}, {**body, "message_id": "zzzzzzzz"}]}
    answers = await asyncio.gather(*(api.post("/api/v2/revenue/bulk", headers=keyed(tenant, bulk_key), json=bulk)
                                     for _ in range(5)))
    assert {a.status_code for a in answers} == {200} and len({a.content for a in answers}) == 1
    assert answers[0].json()["success_count"] == 2 and answers[0].json()["error_count"] == 1
    assert sum("idempotent-replayed" not in a.headers for a in answers) == 1
    assert await revenue_rows(db, message_id) == 3
    detail = (await api.get(f"/api/v2/messages/{message_id}", headers=tenant.headers)).json()
    assert Decimal(str(detail["revenue"])) == Decimal("50.99")


async def test_history_imports_take_an_idempotency_key(api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool) -> None:
    phone = random_phone()
    sends = {"records": [{"to": phone, "list_id": tenant.list_id, "timestamp": "2026-01-01T00:00:00Z"}]}
    key = secrets.token_hex(8)
    first = await api.post("/api/v2/history/sends", headers=keyed(tenant, key), json=sends)
    again = await api.post("/api/v2/history/sends", headers=keyed(tenant, key), json=sends)
    assert first.json()["success_count"] == 1 and again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true" and await stored(db, tenant, phone) == 1
    message_id = await db.fetchval("SELECT id FROM messages WHERE account_id = $1 AND to_phone = $2", tenant.account_id, phone)
    revenue = {"records": [{"message_id": message_id, "revenue": "5", "attribution_type": "sale"}]}  # no external_id
    key = secrets.token_hex(8)
    for _ in range(2):
        assert (await api.post("/api/v2/history/revenue", headers=keyed(tenant, key), json=revenue)).json()["success_count"] == 1
    assert await revenue_rows(db, message_id) == 1
    offer = await make_offer(api, tenant)
    clicks = {"records": [{"message_id": message_id, "offer_id": offer["id"], "phone_number": phone,
                           "timestamp": "2026-01-01T01:00:00Z"}]}
    key = secrets.token_hex(8)
    first = await api.post("/api/v2/history/clicks", headers=keyed(tenant, key), json=clicks)
    again = await api.post("/api/v2/history/clicks", headers=keyed(tenant, key), json=clicks)
    assert first.json()["success_count"] == 1 and again.json() == first.json()  # not a duplicate the second time
    assert again.headers["idempotent-replayed"] == "true"


async def test_a_keyed_bulk_request_that_could_not_save_a_record_keeps_nothing_and_its_retry_stores(
    api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool
) -> None:
    """A database failure (here a trigger refusing this account's revenue) under a key: nothing is
    kept and the answer is 500 save_error, so the retry with the same key stores the request
    whole. Remembering the partial answer replayed the failure for a day (found by review)."""
    sent = await api.post("/api/v2/send", headers=tenant.headers, json={"to": random_phone(), "list_id": tenant.list_id, "body": "a"})
    message_id = sent.json()["message_id"]
    name = f"refuse_revenue_{tenant.account_id}"
    await db.execute(f"""
        CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.account_id = {tenant.account_id} THEN RAISE EXCEPTION 'refused'; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER {name} BEFORE INSERT ON revenue FOR EACH ROW EXECUTE FUNCTION {name}();
    """)
    body = {"records": [{"message_id": message_id, "revenue": "2", "attribution_type": "sale"}]}
    key = secrets.token_hex(8)
    try:
        for url in ("/api/v2/revenue/bulk", "/api/v2/history/revenue"):
            assert_error(await api.post(url, headers=keyed(tenant, key + url), json=body), 500, "save_error")
        # Without a key: the per-record answer, as before.
        plain = await api.post("/api/v2/revenue/bulk", headers=tenant.headers, json=body)
        assert plain.status_code == 200 and plain.json()["errors"][0]["code"] == "save_error"
    finally:
        await db.execute(f"DROP TRIGGER {name} ON revenue; DROP FUNCTION {name}()")
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys WHERE account_id = $1 AND key LIKE $2",
                             tenant.account_id, key + "%") == 0
    for url in ("/api/v2/revenue/bulk", "/api/v2/history/revenue"):
        retry = await api.post(url, headers=keyed(tenant, key + url), json=body)
        assert retry.status_code == 200 and retry.json()["success_count"] == 1, retry.text
    assert await revenue_rows(db, message_id) == 2


async def links_of(db: asyncpg.Pool, tenant: Tenant) -> int:
    return await db.fetchval("SELECT count(*) FROM links WHERE account_id = $1", tenant.account_id)


async def test_a_retried_link_is_answered_not_made_twice(
    api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool, redis: object
) -> None:
    offer = await make_offer(api, tenant)
    key, body = secrets.token_hex(8), {"offerId": offer["id"], "listId": tenant.list_id}
    first = await api.post("/api/v2/links", headers=keyed(tenant, key), json=body)
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    # The retry of a request that made its link gets that link, even once the offer is paused
    # (it would be refused now, but it was not then).
    assert (await api.patch(f"/api/v2/offers/{offer['id']}", headers=tenant.headers, json={"status": "paused"})).status_code == 200
    again = await api.post("/api/v2/links", headers=keyed(tenant, key), json=body)
    assert (again.status_code, again.json(), again.headers["idempotent-replayed"]) == (201, first.json(), "true")
    assert await links_of(db, tenant) == 1
    assert_error(await api.post("/api/v2/links", headers=keyed(tenant, key), json={**body, "listId": str(tenant.list_id)}),
                 422, "idempotency_key_reused")
    # A refusal is not remembered: the same key, once the offer is active again, makes the link.
    refused_key = secrets.token_hex(8)
    assert_error(await api.post("/api/v2/links", headers=keyed(tenant, refused_key), json=body), 404, "offer_not_found")
    assert (await api.patch(f"/api/v2/offers/{offer['id']}", headers=tenant.headers, json={"status": "active"})).status_code == 200
    made = await api.post("/api/v2/links", headers=keyed(tenant, refused_key), json=body)
    assert made.status_code == 201 and "idempotent-replayed" not in made.headers
    assert await links_of(db, tenant) == 2


async def test_concurrent_link_requests_with_one_key_make_one_link_and_publish_one(
    api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool, redis: object
) -> None:
    offer = await make_offer(api, tenant)
    key, body = secrets.token_hex(8), {"offerId": offer["id"], "listId": tenant.list_id}
    answers = await asyncio.gather(*(api.post("/api/v2/links", headers=keyed(tenant, key), json=body) for _ in range(10)))
    assert {a.status_code for a in answers} == {201}
    assert len({a.content for a in answers}) == 1
    assert sum("idempotent-replayed" not in a.headers for a in answers) == 1
    assert await links_of(db, tenant) == 1
    # The requests that lost the race published nothing: the edge holds the offer's one link.
    published = [k async for k in redis.scan_iter(match="trk:s:sms.example.com:*", count=1000)  # type: ignore[attr-defined]
                 if orjson.loads(await redis.get(k)).get("o") == offer["id"]]  # type: ignore[attr-defined]
    assert published == [f"trk:s:sms.example.com:{answers[0].json()['linkId']}".encode()]


async def test_a_retried_offer_is_answered_not_made_twice(api: httpx.AsyncClient, tenant: Tenant, db: asyncpg.Pool) -> None:
    key, body = secrets.token_hex(8), {"name": "Retried", "destination_url": "https://example.com/"}
    answers = await asyncio.gather(*(api.post("/api/v2/offers", headers=keyed(tenant, key), json=body) for _ in range(5)))
    assert {a.status_code for a in answers} == {201}
    assert len({a.content for a in answers}) == 1
    assert sum("idempotent-replayed" not in a.headers for a in answers) == 1
    again = await api.post("/api/v2/offers", headers=keyed(tenant, key), json=body)
    assert (again.status_code, again.json(), again.headers["idempotent-replayed"]) == (201, answers[0].json(), "true")
    assert await db.fetchval("SELECT count(*) FROM offers WHERE account_id = $1 AND name = 'Retried'", tenant.account_id) == 1
    assert_error(await api.post("/api/v2/offers", headers=keyed(tenant, key), json={**body, "name": "Other"}),
                 422, "idempotency_key_reused")
    # A refusal (a taken external_id) is not remembered.
    taken = await make_offer(api, tenant, external_id="net-1")
    other_key = secrets.token_hex(8)
    assert_error(await api.post("/api/v2/offers", headers=keyed(tenant, other_key), json={**body, "external_id": "net-1"}),
                 409, "duplicate_external_id")
    await api.delete(f"/api/v2/offers/{taken['id']}", headers=tenant.headers)
    made = await api.post("/api/v2/offers", headers=keyed(tenant, other_key), json={**body, "external_id": "net-1"})
    assert made.status_code == 201 and "idempotent-replayed" not in made.headers
