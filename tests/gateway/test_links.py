"""POST /api/v2/links: every field and error code of spec/links.txt, and the edge keys it publishes."""
import asyncio
import uuid

import orjson
import pytest

from shared.edge import offer_key, short_key, tracker_key
from tests.gateway.test_api_basics import assert_error
from tests.helpers import add_list, make_offer, make_tenant


async def test_link_fields_and_published_keys(api, tenant, redis):
    offer = await make_offer(api, tenant, external_id="12345")
    resp = await api.post("/api/v2/links", headers=tenant.headers, json={"offerId": offer["id"], "listId": tenant.list_id})
    assert resp.status_code == 201
    link = resp.json()
    assert set(link) >= {"shortUrl", "linkId", "clickTrackerUrl", "destinationUrl", "domain", "offerId"}
    assert len(link["linkId"]) == 6 and link["linkId"].isalnum()
    assert link["domain"] == "https://sms.example.com" and link["shortUrl"] == f"https://sms.example.com/{link['linkId']}"
    assert link["clickTrackerUrl"].startswith("http://ct.localhost:8001/c/")
    tracker = link["clickTrackerUrl"].rsplit("/", 1)[1]
    uuid.UUID(tracker)
    assert link["destinationUrl"] == offer["destination_url"] and link["offerId"] == offer["id"]
    short = orjson.loads(await redis.get(short_key("sms.example.com", link["linkId"])))
    assert short == {"u": link["clickTrackerUrl"], "o": offer["id"], "m": None}
    entry = orjson.loads(await redis.get(tracker_key(tracker)))
    assert entry == {"h": "ct.localhost", "l": link["linkId"], "o": offer["id"], "a": tenant.account_id, "li": tenant.list_id}
    assert orjson.loads(await redis.get(offer_key(offer["id"])))["s"] == "active"


async def test_external_offer_id_and_phone_number(api, tenant):
    offer = await make_offer(api, tenant, external_id="12345")
    resp = await api.post("/api/v2/links", headers=tenant.headers, json={"externalOfferId": "12345", "phoneNumber": tenant.list_phone})
    assert resp.status_code == 201 and resp.json()["offerId"] == offer["id"]
    # offerId also accepts the external id; offerId wins over externalOfferId.
    resp = await api.post("/api/v2/links", headers=tenant.headers,
                          json={"offerId": "12345", "externalOfferId": "nope", "listId": tenant.list_id})
    assert resp.status_code == 201 and resp.json()["offerId"] == offer["id"]


async def test_each_call_makes_a_new_link(api, tenant):
    offer = await make_offer(api, tenant)
    body = {"offerId": offer["id"], "listId": tenant.list_id}
    a = (await api.post("/api/v2/links", headers=tenant.headers, json=body)).json()
    b = (await api.post("/api/v2/links", headers=tenant.headers, json=body)).json()
    assert a["linkId"] != b["linkId"] and a["clickTrackerUrl"] != b["clickTrackerUrl"]


async def test_list_tracker_domain_is_used(api, db, tenant):
    lst = await add_list(db, tenant, short_domain="https://go.brand.com", tracker_domain="https://ct.brand.click")
    offer = await make_offer(api, tenant)
    link = (await api.post("/api/v2/links", headers=tenant.headers, json={"offerId": offer["id"], "listId": lst["list_id"]})).json()
    assert link["shortUrl"].startswith("https://go.brand.com/") and link["clickTrackerUrl"].startswith("https://ct.brand.click/c/")


async def test_error_codes(api, db, tenant):
    offer = await make_offer(api, tenant)
    post = lambda body: api.post("/api/v2/links", headers=tenant.headers, json=body)  # noqa: E731
    assert_error(await post({"listId": tenant.list_id}), 400, "missing_offer_id")
    assert_error(await post({"offerId": offer["id"]}), 400, "missing_list_identifier")
    assert_error(await post({"offerId": offer["id"], "phoneNumber": "+1invalid"}), 400, "invalid_phone")
    assert_error(await post({"offerId": "f" * 24, "listId": tenant.list_id}), 404, "offer_not_found")
    assert_error(await post({"offerId": offer["id"], "listId": 999_999_999}), 404, "list_not_found")
    assert_error(await post({"offerId": offer["id"], "listId": True}), 400, "validation_error")
    assert_error(await post({"offerId": True, "externalOfferId": offer["id"], "listId": tenant.list_id}), 400,
                 "validation_error")
    assert_error(await post({"offerId": offer["id"], "listId": 4.5}), 400, "validation_error")
    assert_error(await post({"offerId": offer["id"], "phoneNumber": "+18885550000"}), 404, "list_not_found")
    paused = await make_offer(api, tenant, status="paused")
    assert_error(await post({"offerId": paused["id"], "listId": tenant.list_id}), 404, "offer_not_found")
    inactive = await add_list(db, tenant, active=False, short_domain="https://sms.example.com")
    assert_error(await post({"offerId": offer["id"], "listId": inactive["list_id"]}), 404, "list_not_found")
    bare = await add_list(db, tenant, short_domain=None)
    assert_error(await post({"offerId": offer["id"], "listId": bare["list_id"]}), 409, "no_domain_configured")


async def test_blank_identifiers_count_as_absent(api, tenant):
    """listId and phoneNumber are each "required if the other is not provided": a blank one is
    not provided, so the other picks the list, and two blanks are no list identifier at all."""
    offer = await make_offer(api, tenant)
    post = lambda body: api.post("/api/v2/links", headers=tenant.headers, json={"offerId": offer["id"], **body})  # noqa: E731
    by_phone = await post({"listId": "", "phoneNumber": tenant.list_phone})
    assert by_phone.status_code == 201, by_phone.text
    by_list = await post({"listId": tenant.list_id, "phoneNumber": "  "})
    assert by_list.status_code == 201, by_list.text
    assert_error(await post({"listId": " ", "phoneNumber": ""}), 400, "missing_list_identifier")
    assert_error(await post({"listId": None, "phoneNumber": None}), 400, "missing_list_identifier")


async def test_product_not_enabled(api, db):
    tenant = await make_tenant(db, offer_management=False)
    offer = await make_offer(api, tenant)
    resp = await api.post("/api/v2/links", headers=tenant.headers, json={"offerId": offer["id"], "listId": tenant.list_id})
    assert_error(resp, 403, "product_not_enabled")


async def test_id_collision_after_retries(api, tenant, gateway_app):
    offer = await make_offer(api, tenant)
    first = (await api.post("/api/v2/links", headers=tenant.headers, json={"offerId": offer["id"], "listId": tenant.list_id})).json()
    gateway_app.state.link_id_factory = lambda: first["linkId"]
    try:
        resp = await api.post("/api/v2/links", headers=tenant.headers, json={"offerId": offer["id"], "listId": tenant.list_id})
    finally:
        del gateway_app.state.link_id_factory
    assert_error(resp, 500, "id_collision")


async def test_one_collision_is_retried(api, tenant, gateway_app):
    offer = await make_offer(api, tenant)
    first = (await api.post("/api/v2/links", headers=tenant.headers, json={"offerId": offer["id"], "listId": tenant.list_id})).json()
    candidates = iter([first["linkId"], "Zz9Yy8"])
    gateway_app.state.link_id_factory = lambda: next(candidates)
    try:
        resp = await api.post("/api/v2/links", headers=tenant.headers, json={"offerId": offer["id"], "listId": tenant.list_id})
    finally:
        del gateway_app.state.link_id_factory
    assert resp.status_code == 201 and resp.json()["linkId"] == "Zz9Yy8"


@pytest.mark.parametrize("change", ["delete", "pause", "edit"])
async def test_an_offer_change_while_a_link_is_made_is_what_the_edge_keeps(api, tenant, redis, monkeypatch, change):
    """A link is made from the offer as it read it; if the offer was deleted, paused or edited
    (and published) after that read, the link must not publish the old offer over the new one:
    the deleted offer's links would have stayed live at the edge (found by code review). The
    read is held open here so that the change falls between it and the link's publish."""
    import services.gateway.routes.links as links_module

    offer = await make_offer(api, tenant, destination_url="https://lp.example/old")
    read, go_on = asyncio.Event(), asyncio.Event()
    real = links_module.find_offer

    async def held(*args, **kwargs):
        row = await real(*args, **kwargs)
        read.set()
        await go_on.wait()
        return row

    monkeypatch.setattr(links_module, "find_offer", held)
    making = asyncio.create_task(
        api.post("/api/v2/links", headers=tenant.headers, json={"offerId": offer["id"], "listId": tenant.list_id})
    )
    await read.wait()
    if change == "delete":
        changed = await api.delete(f"/api/v2/offers/{offer['id']}", headers=tenant.headers)
    else:
        patch = {"status": "paused"} if change == "pause" else {"destination_url": "https://lp.example/new"}
        changed = await api.patch(f"/api/v2/offers/{offer['id']}", headers=tenant.headers, json=patch)
    assert changed.status_code == 200, changed.text
    go_on.set()
    made = await making
    edge_offer = orjson.loads(await redis.get(offer_key(offer["id"])))
    if change == "edit":
        assert made.status_code == 201 and made.json()["destinationUrl"] == "https://lp.example/new"
        assert (edge_offer["s"], edge_offer["d"]) == ("active", "https://lp.example/new")
    else:
        assert_error(made, 404, "offer_not_found")
        assert edge_offer["s"] == ("deleted" if change == "delete" else "paused")


async def test_a_patch_that_changes_nothing_publishes_the_offer_as_it_is(api, tenant, redis):
    offer = await make_offer(api, tenant)
    await redis.delete(offer_key(offer["id"]))  # (lost: a Redis restored from an old snapshot)
    resp = await api.patch(f"/api/v2/offers/{offer['id']}", headers=tenant.headers, json={})
    assert resp.status_code == 200 and resp.json()["offer"]["status"] == "active"
    assert orjson.loads(await redis.get(offer_key(offer["id"])))["s"] == "active"
