"""Postbacks that change a conversion: negative reversals, corrections back, retries."""
from datetime import timedelta
from decimal import Decimal

from tests.helpers import make_offer
from tests.worker.test_attribution import T0, clicked_message, conversion, ledger, postback


async def test_negative_payout_on_a_reversal_reverses(api, db, tenant, run_worker):
    _, mid, click_id = await clicked_message(api, db, tenant)
    common = {"click_id": click_id, "txid": "neg", "timestamp": (T0 + timedelta(hours=1)).isoformat()}
    await postback(api, tenant, status="approved", payout="12.50", **common)
    await postback(api, tenant, status="reversed", payout="-12.50", **common)
    await run_worker()
    conv = await conversion(db, tenant, "neg")
    assert conv["status"] == "reversed"
    assert sum(amount for *_, amount in await ledger(db, conv["id"])) == Decimal(0)
    detail = (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()
    assert (detail["conversions"], detail["revenue"]) == (0, 0)


async def test_negative_payout_on_an_approval_is_kept_but_not_counted(api, db, tenant, run_worker):
    _, mid, click_id = await clicked_message(api, db, tenant)
    assert await postback(api, tenant, status="approved", payout="-3", click_id=click_id, txid="bad") == "accepted"
    await run_worker()
    assert await conversion(db, tenant, "bad") is None
    stored = await db.fetchrow("SELECT parse_error, params FROM postbacks WHERE account_id = $1", tenant.account_id)
    assert "payout" in stored["parse_error"] and stored["params"]["payout"] == "-3"


async def test_correction_back_to_approved_is_applied_and_retries_stay_duplicates(api, db, tenant, run_worker):
    _, mid, click_id = await clicked_message(api, db, tenant)
    common = {"click_id": click_id, "txid": "fix", "payout": "5", "timestamp": (T0 + timedelta(hours=1)).isoformat()}
    assert await postback(api, tenant, status="approved", **common) == "accepted"
    assert await postback(api, tenant, status="approved", **common) == "duplicate"  # a retry
    assert await postback(api, tenant, status="rejected", **common) == "accepted"
    assert await postback(api, tenant, status="rejected", **common) == "duplicate"
    assert await postback(api, tenant, status="approved", **common) == "accepted"  # the network's correction
    assert await postback(api, tenant, status="approved", payout="5.00", **{k: v for k, v in common.items() if k != "payout"}) == "duplicate"
    await run_worker()
    conv = await conversion(db, tenant, "fix")
    assert conv["status"] == "approved"
    assert [a for *_, a in await ledger(db, conv["id"])] == [Decimal(5), Decimal(-5), Decimal(5)]
    detail = (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()
    assert (detail["conversions"], detail["revenue"]) == (1, 5)


async def test_the_postback_log_shows_what_each_postback_became(api, db, tenant, run_worker):
    """GET /api/v2/postbacks: every postback as sent, newest first, with its state; the only place
    a postback we could not use shows (networks always get 200)."""
    offer, _, click_id = await clicked_message(api, db, tenant)
    at = (T0 + timedelta(hours=1)).isoformat()
    assert await postback(api, tenant, click_id=click_id, txid="ok", payout="7.25", network="tune", timestamp=at) == "accepted"
    assert await postback(api, tenant, click_id=click_id, txid="ok", payout="7.25", network="tune", timestamp=at) == "duplicate"
    assert await postback(api, tenant, click_id=click_id, txid="bad", payout="seven") == "accepted"
    pending = (await api.get("/api/v2/postbacks", params={"state": "pending"}, headers=tenant.headers)).json()
    assert [p["conversion_id"] for p in pending["postbacks"]] == ["ok"]
    await run_worker()

    log = (await api.get("/api/v2/postbacks", headers=tenant.headers)).json()
    assert log["pagination"]["total"] == 3
    bad, dup, ok = log["postbacks"]  # newest first
    assert (ok["state"], ok["error"], ok["network"], ok["click_id"]) == ("processed", None, "tune", click_id)
    assert ok["payout"] == 7.25 and ok["params"]["payout"] == "7.25" and ok["processed_at"] is not None
    assert (ok["offer_id"], ok["attributed"], ok["unattributed_reason"]) == (offer["id"], True, None)
    assert dup["state"] == "duplicate"
    assert bad["state"] == "failed" and "payout" in bad["error"] and bad["params"]["payout"] == "seven"
    # What could not be read is not shown as if it had been (defaults such as "approved").
    assert (bad["status"], bad["payout"], bad["converted_at"], bad["offer_id"]) == (None, None, None, None)

    failed = (await api.get("/api/v2/postbacks", params={"state": "failed", "per_page": 1}, headers=tenant.headers)).json()
    assert [p["id"] for p in failed["postbacks"]] == [bad["id"]] and failed["pagination"]["total"] == 1
    # A postback too big to list (stored whole) is listed as a note of its size.
    huge = {"click_id": "big", "note": "x" * 200_000}
    assert (await api.post(f"/postback/{tenant.postback_token}", json=huge)).json()["status"] == "accepted"
    [big] = (await api.get("/api/v2/postbacks", params={"per_page": 1}, headers=tenant.headers)).json()["postbacks"]
    assert big["click_id"] == "big" and list(big["params"]) == ["_omitted"] and "too long to list" in big["params"]["_omitted"]
    assert len(await db.fetchval("SELECT params->>'note' FROM postbacks WHERE id = $1", big["id"])) == 200_000
    bad_state = await api.get("/api/v2/postbacks", params={"state": "lost"}, headers=tenant.headers)
    assert bad_state.status_code == 400 and bad_state.json()["code"] == "validation_error"
    assert (await api.get("/api/v2/postbacks")).status_code == 401


async def test_the_postback_log_is_the_accounts_own(api, db, tenant, run_worker):
    from tests.helpers import make_tenant

    _, _, click_id = await clicked_message(api, db, tenant)
    await postback(api, tenant, click_id=click_id, txid="mine")
    other = await make_tenant(db)
    theirs = (await api.get("/api/v2/postbacks", headers=other.headers)).json()
    assert theirs["postbacks"] == [] and theirs["pagination"]["total"] == 0


async def test_postbacks_that_carry_nothing_usable_are_kept_and_never_count(api, db, tenant, run_worker):
    """An empty postback, a JSON body that is not an object, a payout of true, one that names no
    conversion and gives no money: each is stored (as sent) and answered 200 like any postback,
    shows failed in the log, and is no conversion."""
    token = f"/postback/{tenant.postback_token}"
    assert (await api.get(token)).json()["status"] == "accepted"
    garbled = await api.post(token + "?click_id=c9", content=b'{"payout": 5', headers={"content-type": "application/json"})
    assert garbled.json()["status"] == "accepted"
    as_bool = await api.post(token, json={"click_id": "c8", "conversion_id": "b1", "payout": True})
    assert as_bool.json()["status"] == "accepted"
    # Nothing that names a conversion or gives its money: a ping, a blank or unfilled template.
    for params in ({"ping": "1"}, {"status": "approved", "network": "tune", "timestamp": "2026-01-01T00:00:00Z"},
                   {"click_id": "", "txid": "{txid}", "offer_id": "{offer_id}", "currency": "USD"}):
        assert (await api.get(token, params=params)).json()["status"] == "accepted"
    await run_worker()
    log = (await api.get("/api/v2/postbacks", headers=tenant.headers)).json()["postbacks"]
    assert [p["state"] for p in log] == ["failed"] * 6
    *nameless, by_bool, by_body, empty = log
    assert all("nothing to record as a conversion" in p["error"] for p in nameless)
    assert [p["params"] for p in nameless][::-1][0] == {"ping": "1"}
    assert "payout" in by_bool["error"] and by_bool["params"]["payout"] is True
    assert "not a JSON object" in by_body["error"] and by_body["params"]["_body"] == '{"payout": 5'
    assert "no fields" in empty["error"] and empty["params"] == {}
    assert await db.fetchval("SELECT count(*) FROM conversions WHERE account_id = $1", tenant.account_id) == 0


async def test_a_move_that_names_a_currency_moves_the_currency_with_the_payout(api, db, tenant, run_worker):
    """pending 10 EUR, then approved 12 USD: the conversion is 12 USD, not 12 EUR (found by code
    review). A later move that names no currency keeps it."""
    _, _, click_id = await clicked_message(api, db, tenant)
    common = {"click_id": click_id, "txid": "fx", "timestamp": (T0 + timedelta(hours=1)).isoformat()}
    await postback(api, tenant, status="pending", payout="10", currency="EUR", **common)
    await run_worker()
    assert ((await conversion(db, tenant, "fx"))["currency"]) == "EUR"
    await postback(api, tenant, status="approved", payout="12", currency="usd", **common)
    await run_worker()
    conv = await conversion(db, tenant, "fx")
    assert (conv["status"], conv["payout"], conv["currency"], conv["currency_given"]) == ("approved", Decimal(12), "USD", True)
    await postback(api, tenant, status="approved", payout="13", **common)
    await run_worker()
    conv = await conversion(db, tenant, "fx")
    assert (conv["payout"], conv["currency"]) == (Decimal(13), "USD")


async def test_a_currency_that_is_no_code_is_kept_for_the_operator_not_summed(api, db, tenant, run_worker):
    _, mid, click_id = await clicked_message(api, db, tenant)
    assert await postback(api, tenant, status="approved", payout="5", currency="usd dollars", click_id=click_id,
                          txid="junk") == "accepted"
    await run_worker()
    assert await conversion(db, tenant, "junk") is None
    stored = await db.fetchrow("SELECT parse_error, params FROM postbacks WHERE account_id = $1", tenant.account_id)
    assert "currency" in stored["parse_error"] and stored["params"]["currency"] == "usd dollars"
    detail = (await api.get(f"/api/v2/messages/{mid}", headers=tenant.headers)).json()
    assert (detail["conversions"], detail["revenue"]) == (0, 0)


async def test_a_postback_that_only_corrects_the_currency_is_applied(api, db, tenant, run_worker):
    """Same status and payout, another currency: news, not a duplicate (found by review)."""
    _, _, click_id = await clicked_message(api, db, tenant)
    common = {"click_id": click_id, "txid": "fx-only", "payout": "10", "timestamp": (T0 + timedelta(hours=1)).isoformat()}
    assert await postback(api, tenant, status="pending", currency="EUR", **common) == "accepted"
    assert await postback(api, tenant, status="pending", currency="USD", **common) == "accepted"
    assert await postback(api, tenant, status="pending", currency="usd", **common) == "duplicate"
    assert await postback(api, tenant, status="pending", **common) == "duplicate"  # no currency: repeats any
    await run_worker()
    conv = await conversion(db, tenant, "fx-only")
    assert (conv["status"], conv["payout"], conv["currency"]) == ("pending", Decimal(10), "USD")


async def test_conversions_sent_with_an_unfilled_conversion_id_are_not_merged(api, db, tenant, run_worker):
    """A network whose template's ``{txid}`` it could not fill sends ``txid={txid}`` with every
    conversion: each is keyed by its own click, not all by one literal id (which made every
    conversion after the first a duplicate, its money lost)."""
    offer = await make_offer(api, tenant, payout=5)
    firsts = [await clicked_message(api, db, tenant, offer=offer) for _ in range(2)]
    at = (T0 + timedelta(hours=1)).isoformat()
    for (_, _, click_id), payout in zip(firsts, ("10", "20.50")):
        assert await postback(api, tenant, click_id=click_id, txid="{txid}", payout=payout, timestamp=at) == "accepted"
    await run_worker()
    rows = await db.fetch(
        "SELECT conversion_key, message_id, payout, attributed FROM conversions WHERE account_id = $1 ORDER BY payout",
        tenant.account_id,
    )
    assert [(r["conversion_key"], r["message_id"], r["payout"], r["attributed"]) for r in rows] == [
        (f"click:{click_id}", mid, Decimal(p), True) for (_, mid, click_id), p in zip(firsts, ("10", "20.50"))
    ]


async def test_a_reversal_or_rejection_with_its_money_and_time_macros_unfilled_is_applied(api, db, tenant, run_worker):
    """One template for every status, its {payout}, {currency} and {timestamp} empty on a
    reversal: the reversal was failed as unreadable, and the conversion stayed approved, its
    revenue counted. A rejection or a reversal is worth 0 whatever it says of money or time."""
    _, mid, click_id = await clicked_message(api, db, tenant)
    at = (T0 + timedelta(hours=1)).isoformat()
    assert await postback(api, tenant, status="approved", payout="9.75", click_id=click_id, txid="rev", timestamp=at) == "accepted"
    _, other_mid, other_click = await clicked_message(api, db, tenant)
    assert await postback(api, tenant, status="approved", payout="4", click_id=other_click, txid="rej", timestamp=at) == "accepted"
    unfilled = {"payout": "{payout}", "currency": "${currency}", "timestamp": "%timestamp%"}
    assert await postback(api, tenant, status="reversed", click_id=click_id, txid="rev", **unfilled) == "accepted"
    assert await postback(api, tenant, status="rejected", click_id=other_click, txid="rej", **unfilled) == "accepted"
    await run_worker()
    for txid, message_id, payout in (("rev", mid, Decimal("9.75")), ("rej", other_mid, Decimal(4))):
        conv = await conversion(db, tenant, txid)
        assert (conv["status"], conv["payout"], conv["currency"]) == ({"rev": "reversed", "rej": "rejected"}[txid], payout, "USD")
        assert sum(amount for *_, amount in await ledger(db, conv["id"])) == Decimal(0)
        detail = (await api.get(f"/api/v2/messages/{message_id}", headers=tenant.headers)).json()
        assert (detail["conversions"], detail["revenue"]) == (0, 0)
    assert await db.fetchval("SELECT count(*) FROM postbacks WHERE account_id = $1 AND parse_error IS NOT NULL",
                             tenant.account_id) == 0
    # An approval (or a pending) with them unfilled still fails: its money would be made up.
    assert await postback(api, tenant, status="approved", click_id=click_id, txid="new", **unfilled) == "accepted"
    await run_worker()
    assert await conversion(db, tenant, "new") is None


async def test_the_postback_log_shows_only_conversion_ids_the_network_sent(api, tenant):
    """A postback naming no conversion id is keyed by its click (or, naming neither, on its own):
    the log listed that key (``click:<id>``, ``postback:<hex>``) as if the network had sent it."""
    assert await postback(api, tenant, click_id="clk-log-1", payout="1") == "accepted"
    assert await postback(api, tenant, offer_id="no-ids", payout="2") == "accepted"
    assert await postback(api, tenant, click_id="clk-log-3", conversion_id="sent-3", payout="3") == "accepted"
    # One the network did send, whatever it looks like.
    assert await postback(api, tenant, click_id="clk-log-4", conversion_id="click:other", payout="4") == "accepted"
    log = (await api.get("/api/v2/postbacks", headers=tenant.headers)).json()["postbacks"]
    assert [p["conversion_id"] for p in reversed(log)] == [None, None, "sent-3", "click:other"]
