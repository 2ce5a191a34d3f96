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


# Found by fuzzing every endpoint (each was a 500 before).


@pytest.mark.parametrize("digits", ["²", "٣", "1" * 5000])  # str.isdigit takes them; int() refuses or balks
async def test_digits_int_cannot_read_are_client_errors(api, tenant, digits):
    for path in ("/api/v2/offers", "/api/v2/lists", "/api/v2/postbacks"):
        for name in ("page", "per_page"):
            assert_error(await api.get(path, params={name: digits}, headers=tenant.headers), 400, "validation_error")
    assert_error(await api.get(f"/api/v2/lists/{digits}", headers=tenant.headers), 404, "list_not_found")
    send = await api.post("/api/v2/send", headers=tenant.headers, json={"to": "+14155551234", "list_id": digits, "body": "x"})
    assert_error(send, 404, "list_not_found")
    offer = await make_offer(api, tenant)
    link = await api.post("/api/v2/links", headers=tenant.headers, json={"offerId": offer["id"], "listId": digits})
    assert_error(link, 404, "list_not_found")
    postback = await api.get(f"/postback/{tenant.postback_token}", params={"timestamp": digits, "conversion_id": "d"})
    assert postback.status_code == 200 and postback.json()["status"] == "accepted"  # stored; unreadable, so failed


async def test_a_token_we_never_mint_is_401(api):
    for path in ("/postback/%00", "/postback/a%00b", "/postback/" + "x" * 300):
        assert_error(await api.get(path, params={"click_id": "c"}), 401, "unauthorized")


async def test_postback_numbers_past_what_postgresql_holds_are_kept_as_text(api, db, tenant):
    body = raw_json('{"conversion_id": "big", "x": 18446744073709551616, "y": -9223372036854775809, "z": 1e28, "w": 1e-300,'
                    ' "v": 12345678901234567890123456789012.5}')
    resp = await api.post(f"/postback/{tenant.postback_token}", headers=body["headers"], content=body["content"])
    assert resp.status_code == 200 and resp.json()["status"] == "accepted"
    row = await db.fetchrow(
        "SELECT params->>'x' AS x, params->>'y' AS y, params->>'z' AS z, params->>'w' AS w, params->>'v' AS v,"
        " jsonb_typeof(params->'x') AS x_type, jsonb_typeof(params->'z') AS z_type FROM postbacks WHERE account_id = $1",
        tenant.account_id,
    )
    assert (row["x"], row["y"], row["z"], row["w"]) == ("18446744073709551616", "-9223372036854775809", "1" + "0" * 28, "1E-300")
    assert row["v"] == "12345678901234567890123456789012.5"  # 33 digits: as a number it would be rounded to 28
    assert (row["x_type"], row["z_type"]) == ("string", "number")  # past what jsonb/orjson hold: the text sent


@pytest.mark.parametrize("depth", [40, 300, 900, 5000])
async def test_a_deeply_nested_postback_body_is_kept_as_text(api, db, tenant, depth):
    text = '{"conversion_id": "deep", "a": ' + "[" * depth + "]" * depth + "}"
    resp = await api.post(f"/postback/{tenant.postback_token}", headers={"Content-Type": "application/json"}, content=text.encode())
    assert resp.status_code == 200 and resp.json()["status"] == "accepted"
    row = await db.fetchrow("SELECT params, parse_error FROM postbacks WHERE account_id = $1", tenant.account_id)
    assert row["params"]["_body"] == text and row["parse_error"]


async def test_postback_fields_are_bounded_in_bytes(api, db, tenant):
    """450 CJK characters (1350 bytes) in network and conversion_id overflowed an index row."""
    cjk = "漢" * 450
    resp = await api.get(f"/postback/{tenant.postback_token}", params={"conversion_id": cjk, "network": cjk, "payout": "1"})
    assert resp.status_code == 200 and resp.json()["status"] == "accepted"
    row = await db.fetchrow("SELECT conversion_key, network, parse_error FROM postbacks WHERE account_id = $1", tenant.account_id)
    assert row["conversion_key"] == cjk and len(row["network"].encode()) <= 500
    assert row["parse_error"] == "network: longer than 500 bytes (UTF-8)"
    # The most each takes, together: stored, deduplicated and processed like any other.
    network, conversion = "漢" * 166, "漢" * 500  # 498 and 1500 bytes
    for expected in ("accepted", "duplicate"):
        resp = await api.get(f"/postback/{tenant.postback_token}", params={"conversion_id": conversion, "network": network, "payout": "1"})
        assert resp.status_code == 200 and resp.json()["status"] == expected
    assert await db.fetchval(
        "SELECT parse_error FROM postbacks WHERE account_id = $1 AND network = $2 AND conversion_key = $3 AND NOT is_duplicate",
        tenant.account_id, network, conversion,  # (the first postback's network was cut to this same network)
    ) is None


@pytest.mark.parametrize("url", ["https://x.example/a\u0001b", "https://x.example/a\nb", "https://x.example/a\u007f"])
async def test_a_destination_a_location_header_cannot_hold_is_refused(api, tenant, url):
    resp = await api.post("/api/v2/offers", headers=tenant.headers, json={"name": "n", "destination_url": url})
    assert_error(resp, 400, "validation_error")
    offer = await make_offer(api, tenant)
    resp = await api.patch(f"/api/v2/offers/{offer['id']}", headers=tenant.headers, json={"destination_url": url})
    assert_error(resp, 400, "validation_error")


async def test_a_destination_with_a_space_is_taken_as_given(api, tenant):
    """Pasted affiliate templates have them (aff_sub2=Spring Sale); the redirect encodes them."""
    url = "https://trk.example/aff_c?offer_id=1&aff_sub={click_id}&aff_sub2=Spring Sale\tx"
    resp = await api.post("/api/v2/offers", headers=tenant.headers, json={"name": "n", "destination_url": url})
    assert resp.status_code == 201 and resp.json()["offer"]["destination_url"] == url


async def test_history_ids_and_phones_take_ascii_only(api, tenant):
    records = [
        {"to": "+14155551234", "list_id": tenant.list_id, "timestamp": "2025-10-01T09:00:00Z", "message_id": "Nlabcdef\n"},
        {"to": "+1٤١٥٥٥٥١٢٣٤", "list_id": tenant.list_id, "timestamp": "2025-10-01T09:00:00Z"},
    ]
    resp = await api.post("/api/v2/history/sends", headers=tenant.headers, json={"records": records})
    assert [(e["index"], e["code"]) for e in resp.json()["errors"]] == [(0, "validation_error"), (1, "invalid_phone")]


def test_report_ratios_do_not_overflow_and_read_back_as_the_quotient():
    from decimal import Decimal
    from fractions import Fraction

    import orjson

    from services.gateway.routes.reports import ratio
    from shared.jsonio import dumps

    assert ratio(Decimal("999999999999000000000"), 1) == Decimal("999999999999000000000")
    assert ratio(Decimal("999999999999999999999999999.999999"), 3) == Decimal("333333333333333333333333333.3")
    # As JSON, a ratio of counts reads back as the double the client's own division gives, and
    # one of money as the double nearest the exact quotient.
    for numerator, divisor in ((1, 3), (2, 3), (7, 9), (5, 7), (3, 4), (10**15 + 1, 3)):
        assert orjson.loads(dumps(ratio(numerator, divisor))) == numerator / divisor
    for amount, divisor in ((Decimal("0.05"), 7), (Decimal("0.03"), 9), (Decimal("24.99"), 3), (Decimal("-10.01"), 7)):
        assert orjson.loads(dumps(ratio(amount, divisor))) == float(Fraction(amount) / divisor)
    assert dumps(ratio(0, 5)) == b"0" and dumps(ratio(3, 0)) == b"0" and dumps(ratio(6, 3)) == b"2"


async def test_a_client_that_hangs_up_mid_body_is_no_server_error(gateway_app, tenant):
    """An ASGI disconnect while the body is read: answered as a client error (nobody hears it),
    not raised as ClientDisconnect into a traceback."""
    sent: list[dict] = []
    messages = iter([{"type": "http.request", "body": b'{"na', "more_body": True}, {"type": "http.disconnect"}])

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/v2/offers", "raw_path": b"/api/v2/offers", "root_path": "", "query_string": b"",
             "headers": [(b"host", b"gw"), (b"content-type", b"application/json"), (b"content-length", b"100"),
                         *[(k.lower().encode(), v.encode()) for k, v in tenant.headers.items()]],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    await gateway_app(scope, receive, send)
    assert sent[0]["status"] == 400


@pytest.mark.parametrize("escape", ["\\u0000", "\\ud800"])
async def test_text_postgresql_cannot_store_fails_only_its_own_bulk_record(api, db, tenant, escape):
    """One record of a bulk request with a NUL or a lone surrogate fails alone (validation_error);
    the others are stored. Outside the records it is still the whole request's 400."""
    import json
    import secrets

    message = (await api.post("/api/v2/send", headers=tenant.headers,
                              json={"to": "+14155551234", "list_id": tenant.list_id, "body": "hi"})).json()["message_id"]
    offer = await make_offer(api, tenant)
    bad = "x%sy" % escape
    cases = {
        "/api/v2/send/bulk": ("messages", {"to": "+14155551234", "list_id": tenant.list_id, "body": "ok"},
                              {"to": "+14155551234", "list_id": tenant.list_id, "body": bad}),
        "/api/v2/revenue/bulk": ("records", {"message_id": message, "revenue": 1, "attribution_type": "sale"},
                                 {"message_id": message, "revenue": 1, "attribution_type": "sale", "offer_id": bad}),
        "/api/v2/history/sends": ("records", {"to": "+14155551234", "list_id": tenant.list_id, "body": "ok",
                                              "timestamp": "2026-01-01T00:00:00Z"},
                                  {"to": "+14155551234", "list_id": tenant.list_id, "body": bad,
                                   "timestamp": "2026-01-01T00:00:00Z"}),
        "/api/v2/history/revenue": ("records", {"message_id": message, "revenue": 1, "attribution_type": "sale",
                                                "external_id": secrets.token_hex(4)},
                                    {"message_id": message, "revenue": 1, "attribution_type": "sale", "external_id": bad}),
        "/api/v2/history/clicks": ("records", {"message_id": message, "offer_id": offer["id"], "phone_number": "+14155551234",
                                               "timestamp": "2026-01-01T00:00:00Z"},
                                   {"message_id": message, "offer_id": offer["id"], "phone_number": bad,
                                    "timestamp": "2026-01-01T00:00:00Z"}),
    }
    for url, (field, good, unstorable) in cases.items():
        text = json.dumps({field: [unstorable, good]}).replace("\\\\u", "\\u")  # the escape as JSON, not as text
        resp = await api.post(url, headers={**tenant.headers, "Content-Type": "application/json"}, content=text.encode())
        assert resp.status_code == 200, (url, resp.text)
        answer = resp.json()
        stored = answer.get("queued_count", answer.get("success_count"))
        assert stored == 1 and answer["error_count"] == 1, (url, answer)
        assert answer["errors"][0]["index"] == 0 and answer["errors"][0]["code"] == "validation_error", (url, answer)
        # Outside the records: the whole request is refused.
        text = json.dumps({field: [good], "note": bad}).replace("\\\\u", "\\u")
        resp = await api.post(url, headers={**tenant.headers, "Content-Type": "application/json"}, content=text.encode())
        assert_error(resp, 400, "validation_error")


async def test_an_offer_id_longer_than_any_offer_id_is_offer_not_found(api, tenant):
    # CONTRACT §3: "/revenue ... an unknown offer_id → 400 offer_not_found", and /send's unknown
    # offer_id is 404 offer_not_found; an id no offer can hold is unknown, as on /links and
    # /history/clicks. It answered validation_error ("offer_id is too long") past 200 characters.
    sent = await api.post("/api/v2/send", headers=tenant.headers, json={"to": "+14155551234", "list_id": tenant.list_id, "body": "x"})
    message = sent.json()["message_id"]
    long_ref = "a" * 300
    resp = await api.post("/api/v2/revenue", headers=tenant.headers,
                          json={"message_id": message, "revenue": 1, "attribution_type": "sale", "offer_id": long_ref})
    assert_error(resp, 400, "offer_not_found")
    # The spec's order holds: an unknown message first.
    resp = await api.post("/api/v2/revenue", headers=tenant.headers,
                          json={"message_id": "zzzzzzzz", "revenue": 1, "attribution_type": "sale", "offer_id": long_ref})
    assert_error(resp, 400, "message_not_found")
    resp = await api.post("/api/v2/history/revenue", headers=tenant.headers, json={"records": [
        {"message_id": message, "revenue": 1, "attribution_type": "sale", "offer_id": long_ref}]})
    assert resp.json()["errors"] == [{"index": 0, "code": "offer_not_found", "error": "No offer exists with the given offer_id"}]
    resp = await api.post("/api/v2/send", headers=tenant.headers,
                          json={"to": "+14155551234", "list_id": tenant.list_id, "body": "x", "offer_id": long_ref})
    assert_error(resp, 404, "offer_not_found")
    resp = await api.post("/api/v2/send/bulk", headers=tenant.headers, json={"messages": [
        {"to": "+14155551234", "list_id": tenant.list_id, "body": "x", "offer_id": long_ref}]})
    assert [e["code"] for e in resp.json()["errors"]] == ["offer_not_found"]
    resp = await api.post("/api/v2/history/sends", headers=tenant.headers, json={"records": [
        {"to": "+14155551234", "list_id": tenant.list_id, "timestamp": "2026-01-01T00:00:00Z", "offer_id": long_ref}]})
    assert [e["code"] for e in resp.json()["errors"]] == ["offer_not_found"]
