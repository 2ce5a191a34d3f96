"""Auth, account scoping, the uniform error body, limits and health endpoints."""
import pytest

from tests.helpers import make_offer, make_tenant


def assert_error(resp, status, code):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["success"] is False and body["code"] == code and body["error"]


@pytest.mark.parametrize("headers", [{}, {"X-Api-Key": "trk_" + "0" * 32}, {"X-Api-Key": ""}])
async def test_missing_or_unknown_key_is_401(api, headers):
    assert_error(await api.get("/api/v2/offers", headers=headers), 401, "unauthorized")
    assert_error(await api.post("/api/v2/send", headers=headers, json={}), 401, "unauthorized")


async def test_other_accounts_resources_answer_404(api, db, tenant):
    other = await make_tenant(db)
    offer = await make_offer(api, other)
    assert_error(await api.get(f"/api/v2/offers/{offer['id']}", headers=tenant.headers), 404, "offer_not_found")
    assert_error(await api.patch(f"/api/v2/offers/{offer['id']}", headers=tenant.headers, json={"name": "x"}), 404, "offer_not_found")
    assert_error(await api.delete(f"/api/v2/offers/{offer['id']}", headers=tenant.headers), 404, "offer_not_found")
    assert_error(await api.get(f"/api/v2/lists/{other.list_id}", headers=tenant.headers), 404, "list_not_found")
    listed = (await api.get("/api/v2/offers", headers=tenant.headers)).json()
    assert all(o["id"] != offer["id"] for o in listed["offers"])
    resp = await api.post("/api/v2/links", headers=tenant.headers, json={"offerId": offer["id"], "listId": tenant.list_id})
    assert_error(resp, 404, "offer_not_found")
    resp = await api.post("/api/v2/send", headers=tenant.headers,
                          json={"to": "+14155551234", "list_id": other.list_id, "body": "hi"})
    assert_error(resp, 404, "list_not_found")
    sent = await api.post("/api/v2/send", headers=other.headers,
                          json={"to": "+14155551234", "list_id": other.list_id, "body": "hi"})
    assert_error(await api.get(f"/api/v2/messages/{sent.json()['message_id']}", headers=tenant.headers), 404, "message_not_found")


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"", b'"text"', b"{\"a\": NaN}"])
async def test_invalid_json_is_400(api, tenant, body):
    resp = await api.post("/api/v2/offers", headers={**tenant.headers, "Content-Type": "application/json"}, content=body)
    assert_error(resp, 400, "invalid_json")


async def test_body_over_5mb_is_413(api, tenant):
    big = b'{"name": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    assert_error(await api.post("/api/v2/offers", headers=tenant.headers, content=big), 413, "payload_too_large")


async def test_unknown_route_is_uniform_404(api, tenant):
    assert_error(await api.get("/api/v2/nothing-here", headers=tenant.headers), 404, "not_found")


async def test_health_endpoints(api):
    assert (await api.get("/healthz")).json()["status"] == "ok"
    ready = await api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["postgres"] == "ok" and ready.json()["redis"] == "ok"
    metrics = await api.get("/metrics")
    assert metrics.status_code == 200 and "python_info" in metrics.text
