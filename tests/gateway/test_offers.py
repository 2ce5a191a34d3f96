"""Offers CRUD, validation, external ids, pagination, and what the edge sees."""
from decimal import Decimal

import httpx
import orjson
import pytest

from shared.edge import offer_key
from tests.gateway.test_api_basics import assert_error
from tests.helpers import make_offer


async def test_create_offer_returns_every_field(api, tenant):
    resp = await api.post("/api/v2/offers", headers=tenant.headers, json={
        "name": "Summer", "destination_url": "https://example.com/lp?c={click_id}", "external_id": "12345",
        "payout": "24.99", "currency": "eur", "click_window_days": 14, "affiliate_id": "aff9"})
    assert resp.status_code == 201
    offer = resp.json()["offer"]
    assert len(offer["id"]) == 24 and all(c in "0123456789abcdef" for c in offer["id"])
    assert offer["payout"] == 24.99 and b'"payout":24.99' in resp.content
    assert (offer["status"], offer["currency"], offer["click_window_days"], offer["affiliate_id"]) == ("active", "EUR", 14, "aff9")


async def test_payout_is_kept_exactly(api, tenant):
    resp = await api.post("/api/v2/offers", headers=tenant.headers, content=(
        b'{"name": "Exact", "destination_url": "https://example.com/", "payout": 1.123456789012345678901234567891}'))
    assert resp.status_code == 201, resp.text
    offer_id = resp.json()["offer"]["id"]
    fetched = await api.get(f"/api/v2/offers/{offer_id}", headers=tenant.headers)
    assert b'"payout":1.123456789012345678901234567891' in fetched.content


async def test_defaults(api, tenant):
    offer = await make_offer(api, tenant)
    assert (offer["status"], offer["currency"], offer["click_window_days"], offer["payout"]) == ("active", "USD", 90, None)


async def test_null_optional_fields_take_their_defaults(api, tenant):
    resp = await api.post("/api/v2/offers", headers=tenant.headers, json={
        "name": "n", "destination_url": "https://example.com", "status": None, "currency": None,
        "click_window_days": None, "payout": None, "external_id": None, "affiliate_id": None})
    assert resp.status_code == 201, resp.text
    offer = resp.json()["offer"]
    assert (offer["status"], offer["currency"], offer["click_window_days"], offer["payout"]) == ("active", "USD", 90, None)
    # An update that names a field with null does not reset it: status and window have no "unset".
    for patch in ({"status": None}, {"click_window_days": None}, {"currency": None}, {"currency": ""}):
        assert_error(await api.patch(f"/api/v2/offers/{offer['id']}", headers=tenant.headers, json=patch), 400, "validation_error")


@pytest.mark.parametrize("patch", [
    {"name": ""}, {"destination_url": "ftp://x"}, {"destination_url": None}, {"destination_url": "https://"},
    {"destination_url": "https:///path"}, {"destination_url": "http://e.com:port/"}, {"status": "live"},
    {"payout": -1}, {"payout": "abc"}, {"payout": True}, {"click_window_days": 0}, {"click_window_days": 91},
    {"click_window_days": "7"}, {"currency": "dollars"},
    # A macro in the host would let a visitor choose where the tracker sends them.
    {"destination_url": "https://{sub1}"}, {"destination_url": "https://shop.example.com{sub1}/landing"},
    {"destination_url": "http://{user_agent}/x"}, {"destination_url": "https://{sub1}@shop.example.com/"},
])
async def test_invalid_fields_are_validation_errors(api, tenant, patch):
    body = {"name": "x", "destination_url": "https://example.com", **patch}
    assert_error(await api.post("/api/v2/offers", headers=tenant.headers, json=body), 400, "validation_error")


async def test_macros_in_path_query_and_fragment_are_accepted(api, tenant):
    for url in ("https://shop.example.com/{sub1}/x?c={click_id}&m={{sendId}}#{sub2}", "https://shop.example.com?c={click_id}"):
        assert (await make_offer(api, tenant, destination_url=url))["destination_url"] == url


async def test_a_destination_with_more_macros_than_any_template_needs_is_refused(api, tenant, settings):
    """Each macro is filled per click with up to 1000 characters of the visitor's (9000 once
    percent-encoded): a template of 4000 characters holds ~500 ``{sub1}``, and one request to its
    link cost the shared edge ~40 ms of CPU and answered a 4.5 MB Location. Every known macro
    used once is 18; a template may hold MAX_MACROS, on create and on update."""
    from services.gateway.routes.offers import MAX_MACROS
    from services.redirect.app import location_template
    from shared import macros

    def url(n: int) -> str:
        return "https://shop.example.com/?" + "&".join(f"s{i}={{sub1}}" for i in range(n)) + "&m={{sendId}}"

    fine = await make_offer(api, tenant, destination_url=url(MAX_MACROS - 1))
    many = url(MAX_MACROS)
    assert len(many) <= 4000
    assert_error(await api.post("/api/v2/offers", headers=tenant.headers, json={"name": "x", "destination_url": many}),
                 400, "validation_error")
    assert_error(await api.patch(f"/api/v2/offers/{fine['id']}", headers=tenant.headers, json={"destination_url": many}),
                 400, "validation_error")
    # What the edge fills for the largest template allowed stays bounded.
    template = macros.parse(location_template(url(MAX_MACROS - 1)))
    facts = ("c" * 32, None, "o" * 24, "1", "198.51.100.7", "u" * 1000, "2026-01-01T00:00:00Z", None, "Msg00001")
    assert len(macros.fill_facts(template, facts, {"sub1": "\u20ac" * 1000})) < 300_000


async def test_payout_is_exact(api, tenant, db):
    offer = await make_offer(api, tenant, payout=0.1)
    assert await db.fetchval("SELECT payout FROM offers WHERE id = $1", offer["id"]) == Decimal("0.1")


async def test_get_patch_delete(api, tenant, redis):
    offer = await make_offer(api, tenant, external_id="ext-1")
    got = (await api.get(f"/api/v2/offers/{offer['id']}", headers=tenant.headers)).json()["offer"]
    assert got["external_id"] == "ext-1"
    resp = await api.patch(f"/api/v2/offers/{offer['id']}", headers=tenant.headers, json={"status": "paused", "payout": "3.50"})
    assert resp.status_code == 200 and resp.json()["offer"]["status"] == "paused" and resp.json()["offer"]["payout"] == 3.5
    assert orjson.loads(await redis.get(offer_key(offer["id"])))["s"] == "paused"
    assert_error(await api.patch(f"/api/v2/offers/{offer['id']}", headers=tenant.headers, json={"status": "deleted"}), 400, "validation_error")
    assert (await api.delete(f"/api/v2/offers/{offer['id']}", headers=tenant.headers)).status_code == 200
    assert orjson.loads(await redis.get(offer_key(offer["id"])))["s"] == "deleted"
    assert_error(await api.get(f"/api/v2/offers/{offer['id']}", headers=tenant.headers), 404, "offer_not_found")
    assert_error(await api.delete(f"/api/v2/offers/{offer['id']}", headers=tenant.headers), 404, "offer_not_found")
    # The external id is free again once its offer is deleted.
    again = await make_offer(api, tenant, external_id="ext-1")
    # A deleted offer is listed only when asked for (reports and old conversions still name it).
    listed = (await api.get("/api/v2/offers", headers=tenant.headers)).json()
    assert [o["id"] for o in listed["offers"]] == [again["id"]] and listed["pagination"]["total"] == 1
    deleted = (await api.get("/api/v2/offers", params={"status": "deleted"}, headers=tenant.headers)).json()
    assert [(o["id"], o["status"], o["external_id"]) for o in deleted["offers"]] == [(offer["id"], "deleted", "ext-1")]
    assert deleted["pagination"]["total"] == 1
    assert_error(await api.get("/api/v2/offers", params={"status": "gone"}, headers=tenant.headers), 400, "validation_error")


async def test_duplicate_external_id_conflicts(api, tenant):
    await make_offer(api, tenant, external_id="dup")
    resp = await api.post("/api/v2/offers", headers=tenant.headers,
                          json={"name": "b", "destination_url": "https://e.com", "external_id": "dup"})
    assert_error(resp, 409, "duplicate_external_id")


async def test_pagination(api, tenant):
    made = [await make_offer(api, tenant, name=f"o{i}") for i in range(5)]
    page = (await api.get("/api/v2/offers?page=2&per_page=2", headers=tenant.headers)).json()
    assert page["pagination"] == {"page": 2, "per_page": 2, "total": 5, "total_pages": 3}
    assert [o["id"] for o in page["offers"]] == [o["id"] for o in made[2:4]]
    for bad in ("per_page=0", "per_page=-1", "page=x", "page=-1"):
        assert_error(await api.get(f"/api/v2/offers?{bad}", headers=tenant.headers), 400, "validation_error")
    capped = (await api.get("/api/v2/offers?per_page=1000", headers=tenant.headers)).json()  # above the maximum
    assert capped["pagination"] == {"page": 1, "per_page": 100, "total": 5, "total_pages": 1} and len(capped["offers"]) == 5


async def test_a_change_whose_commit_fails_leaves_the_edge_as_postgresql_is(api, gateway_app, tenant, db, redis):
    """A change is published to the edge just before its commit; if the commit then fails, the
    edge must not stay ahead of PostgreSQL (found by the redirect review): the committed row is
    published again. The commit is made to fail by a deferred constraint trigger on this offer."""
    import secrets

    marker = f"fail-at-commit-{secrets.token_hex(4)}"
    offer = await make_offer(api, tenant, external_id=marker)
    await db.execute(f"""
        CREATE FUNCTION {marker.replace('-', '_')}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.external_id = '{marker}' AND NEW.status <> 'active' THEN
                RAISE EXCEPTION 'refused at commit';
            END IF;
            RETURN NEW;
        END $$;
        CREATE CONSTRAINT TRIGGER {marker.replace('-', '_')} AFTER UPDATE ON offers
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {marker.replace('-', '_')}();
    """)
    transport = httpx.ASGITransport(app=gateway_app, raise_app_exceptions=False)  # a 500, as a client sees it
    client = httpx.AsyncClient(transport=transport, base_url="http://gateway.test")
    try:
        for change in ("pause", "delete"):
            if change == "pause":
                resp = await client.patch(f"/api/v2/offers/{offer['id']}", headers=tenant.headers, json={"status": "paused"})
            else:
                resp = await client.delete(f"/api/v2/offers/{offer['id']}", headers=tenant.headers)
            assert resp.status_code == 500, resp.text
            assert await db.fetchval("SELECT status FROM offers WHERE id = $1", offer["id"]) == "active"
            assert orjson.loads(await redis.get(offer_key(offer["id"])))["s"] == "active", change
    finally:
        await client.aclose()
        await db.execute(f"DROP TRIGGER {marker.replace('-', '_')} ON offers; DROP FUNCTION {marker.replace('-', '_')}()")
