"""Read-only lists with contact counts."""
from tests.gateway.test_api_basics import assert_error
from tests.helpers import add_list


async def test_lists_and_contact_count(api, db, tenant):
    extra = await add_list(db, tenant, name="second", short_domain=None)
    for to in ("+14155550001", "+14155550002", "+14155550001"):
        resp = await api.post("/api/v2/send", headers=tenant.headers, json={"to": to, "list_id": tenant.list_id, "body": "hi"})
        assert resp.status_code == 201
    page = (await api.get("/api/v2/lists", headers=tenant.headers)).json()
    assert page["pagination"]["total"] == 2
    first = next(lst for lst in page["lists"] if lst["id"] == tenant.list_id)
    assert first == {"id": tenant.list_id, "name": "main", "phone_number": tenant.list_phone, "status": "active",
                     "short_domain": "https://sms.example.com", "tracker_domain": None, "contact_count": 2}
    detail = (await api.get(f"/api/v2/lists/{extra['list_id']}", headers=tenant.headers)).json()
    one = detail["list"]
    assert one["name"] == "second" and one["short_domain"] is None and one["contact_count"] == 0
    # The contract's answer is the list's fields themselves.
    assert {k: detail[k] for k in one} == one
    assert_error(await api.get("/api/v2/lists/abc", headers=tenant.headers), 404, "list_not_found")


async def test_contact_count_follows_bulk_sends_to_several_lists(api, db, tenant):
    extra = await add_list(db, tenant, name="second", short_domain=None)
    phones = [f"+1415555{i:04d}" for i in range(6)]
    messages = [{"to": p, "list_id": tenant.list_id, "body": "hi"} for p in phones + phones[:2]]  # repeats in one request
    messages += [{"to": p, "list_id": extra["list_id"], "body": "hi"} for p in phones[:3]]
    assert (await api.post("/api/v2/send/bulk", headers=tenant.headers, json={"messages": messages})).json()["queued_count"] == 11
    messages = [{"to": p, "list_id": extra["list_id"], "body": "again"} for p in phones[2:5]]  # one known, two new
    assert (await api.post("/api/v2/send/bulk", headers=tenant.headers, json={"messages": messages})).json()["queued_count"] == 3
    counts = {lst["id"]: lst["contact_count"] for lst in (await api.get("/api/v2/lists", headers=tenant.headers)).json()["lists"]}
    assert counts == {tenant.list_id: 6, extra["list_id"]: 5}
