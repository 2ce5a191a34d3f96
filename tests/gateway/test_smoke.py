from tests.helpers import make_link, make_offer


async def test_offer_link_send_roundtrip(api, tenant):
    offer = await make_offer(api, tenant)
    link = await make_link(api, tenant, offer["id"])
    assert link["shortUrl"] == f"https://sms.example.com/{link['linkId']}"
    resp = await api.post("/api/v2/send", headers=tenant.headers, json={
        "to": "+14155551234", "list_id": tenant.list_id, "body": f"Deal {link['shortUrl']} id={{{{sendId}}}}"})
    assert resp.status_code == 201, resp.text
    mid = resp.json()["message_id"]
    msg = (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()
    assert msg["offer_id"] == offer["id"]
    assert link["linkId"] not in msg["body"] and f"id={mid}" in msg["body"]
    assert msg["clicked"] is False and msg["click_count"] == 0 and msg["revenue"] == 0
