"""Input PostgreSQL cannot hold or count is a client error (or, for postbacks, still a 200), never a 500."""
import pytest

from tests.gateway.test_api_basics import assert_error
from tests.helpers import make_offer


def raw_json(text: str) -> dict:
    return {"content": text.encode(), "headers": {"Content-Type": "application/json"}}


@pytest.mark.parametrize("escape", ["\\u0000", "\\ud800"])
async def test_nul_and_lone_surrogates_are_400(api, tenant, escape):
    body = raw_json('{"name": "a%sb", "destination_url": "https://example.com"}' % escape)
    resp = await api.post("/api/v2/offers", headers={**tenant.headers, **body["headers"]}, content=body["content"])
    assert_error(resp, 400, "validation_error")
    body = raw_json('{"to": "+14155551234", "list_id": %d, "body": "hi %s"}' % (tenant.list_id, escape))
    resp = await api.post("/api/v2/send", headers={**tenant.headers, **body["headers"]}, content=body["content"])
    assert_error(resp, 400, "validation_error")


async def test_raw_surrogate_bytes_are_400(api, tenant):
    # A surrogate encoded as UTF-8 bytes (ED A0 80), not as an escape: json reads it as "\ud800".
    body = b'{"name": "a\xed\xa0\x80b", "destination_url": "https://example.com"}'
    resp = await api.post("/api/v2/offers", headers={**tenant.headers, "Content-Type": "application/json"}, content=body)
    assert_error(resp, 400, "validation_error")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32-le"])
async def test_nul_in_a_utf16_or_utf32_body_is_400(api, tenant, encoding):
    # JSON may come in UTF-16/32, where the \u0000 escape is not the bytes b"\\u".
    text = '{"name": "a\\u0000b", "destination_url": "https://example.com"}'
    resp = await api.post("/api/v2/offers", headers={**tenant.headers, "Content-Type": "application/json"},
                          content=text.encode(encoding))
    assert_error(resp, 400, "validation_error")


async def test_offer_path_ids_that_cannot_be_offer_ids_are_not_found(api, tenant):
    for path in ("/api/v2/offers/%00", "/api/v2/offers/not-an-id"):
        assert_error(await api.get(path, headers=tenant.headers), 404, "offer_not_found")
        assert_error(await api.patch(path, headers=tenant.headers, json={"name": "x"}), 404, "offer_not_found")
        assert_error(await api.delete(path, headers=tenant.headers), 404, "offer_not_found")


async def test_huge_page_is_a_validation_error(api, tenant):
    assert_error(await api.get("/api/v2/offers?page=99999999999999999999", headers=tenant.headers), 400, "validation_error")
    resp = await api.get("/api/v2/reports/performance?group_by=offer&page=99999999999999999999", headers=tenant.headers)
    assert_error(resp, 400, "validation_error")


async def test_report_up_to_the_last_day(api, tenant):
    resp = await api.get("/api/v2/reports/performance?group_by=date&start=0001-01-01&end=9999-12-31", headers=tenant.headers)
    assert resp.status_code == 200, resp.text


async def test_bulk_echoes_a_numeric_to(api, tenant):
    resp = await api.post("/api/v2/send/bulk", headers=tenant.headers,
                          json={"messages": [{"to": 2**70, "list_id": tenant.list_id, "body": "x"}]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["errors"] == [{"index": 0, "to": str(2**70), "code": "invalid_phone",
                                      "error": "Invalid recipient phone number format"}]


async def test_postback_with_nul_is_still_accepted(api, db, tenant):
    offer = await make_offer(api, tenant, external_id="ext-nul")
    resp = await api.get(f"/postback/{tenant.postback_token}",
                         params={"click_id": "ab\x00c", "conversion_id": "n\x00ul", "network": "\x00", "offer_id": offer["id"]})
    assert resp.status_code == 200 and resp.json() == {"success": True, "status": "accepted"}
    row = await db.fetchrow("SELECT click_id, conversion_key, network FROM postbacks WHERE account_id = $1", tenant.account_id)
    assert (row["click_id"], row["conversion_key"], row["network"]) == ("abc", "nul", "default")
    body = raw_json('{"click_id": "x\\ud800y", "conversion_id": "c2"}')
    resp = await api.post(f"/postback/{tenant.postback_token}", headers=body["headers"], content=body["content"])
    assert resp.status_code == 200 and resp.json()["status"] == "accepted"


async def test_numbers_too_big_to_handle_are_client_errors(api, tenant):
    sent = await api.post("/api/v2/send", headers=tenant.headers, json={"to": "+14155551234", "list_id": tenant.list_id, "body": "x"})
    body = raw_json('{"message_id": "%s", "revenue": 1e999999999, "attribution_type": "sale"}' % sent.json()["message_id"])
    resp = await api.post("/api/v2/revenue", headers={**tenant.headers, **body["headers"]}, content=body["content"])
    assert_error(resp, 400, "invalid_revenue")
    body = raw_json('{"name": "n", "destination_url": "https://example.com", "payout": %s}' % ("1" * 5000))
    resp = await api.post("/api/v2/offers", headers={**tenant.headers, **body["headers"]}, content=body["content"])
    assert_error(resp, 400, "invalid_json")
