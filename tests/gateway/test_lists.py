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
