"""Postback processing and first-click attribution.

``process_postback`` is the arq job the gateway enqueues once per ``shared.jobs.ATTRIBUTION_WINDOW``
(every postback stored in a window shares it). It takes its postback plus other unprocessed ones
(``FOR UPDATE SKIP LOCKED``, so concurrent jobs never share a row), a batch per transaction,
attributes each batch set-based, and goes on until a batch comes back short.

Conversions are unique per (account, network, conversion key). A batch inserts the ones it
creates with ``ON CONFLICT DO NOTHING`` and locks the ones that exist with ``SELECT ... FOR UPDATE``
(both in key order, so two batches never deadlock), then moves each through the status machine of
``shared.postback_fields``. Every move writes its revenue delta to ``conversion_adjustments``:
the ledger whose sum is a conversion's revenue; nothing is ever deleted.

Attribution: the click named by ``click_id`` (same account, human) wins if the conversion time is
within ``[clicked_at, clicked_at + click_window_days]`` of the click's offer (default 90 days),
the start taken to the click's whole second (see ``judge``).
The credit goes to the named click's message (CONTRACT.md §5, "the click named by ``click_id``"),
even when the same contact clicked another message on the same offer before: a network hands
back the click id of the click it saw, and that click's message is the one that earned it. (The
spec's "Multi-Touch" example, Monday's A over Wednesday's B, reads the other way when the network
names B's click; where spec and contract disagree, the contract fixes behaviour.)
A later click on a message is a raw click, not a new engagement; a conversion that names it is
judged by that click (its time, its offer's window) and credits the same message.
A ``click_id`` that is one of the account's message ids names that message's first human click:
what a network sends back when the offer's destination passed it ``{{sendId}}`` (``aff_sub``, as in
spec/links.txt's example) instead of ``{click_id}``.
A conversion whose click has not been stored yet waits as ``click_not_found``; the click drainer
calls ``rematch_for_clicks`` with every new click and every message that got its first click (it
also fills a payout or currency the postbacks left to the offer, and a bot's click makes
``bot_click``), and the sweeper catches the rare race where both committed without seeing each other.
A first click that /history/clicks stores for a message a waiting conversion names leaves a
request (``rematch_requests``) that the sweeper re-matches (``rematch_requested``); so does a batch
whose verdict a click being drained meanwhile may change (``_may_change``), and the sweeper waits
for such a drain to commit before it re-matches.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

import asyncpg

from shared import loops
from shared.ids import MESSAGE_ID_RE
from shared.jobs import PROCESS_POSTBACK, postback_job_id
from shared.money import MONEY
from shared.postback_fields import accepts_move, status_value

log = logging.getLogger("trackly.worker.attribution")

BATCH_SIZE = 1000
DEFAULT_WINDOW_DAYS = 90
SWEEP_INTERVAL = 2.0
SWEEP_AGE = timedelta(seconds=5)
SWEEP_LIMIT = 5000
REMATCH_PAGE = 1000
DEADLOCK_RETRIES = 5
# A batch leaves a conversion's postbacks behind an older one that another batch holds: they are
# taken again after this pause (that batch is committing), this many times.
DEFERRED_PAUSE = 0.05
DEFERRED_RETRIES = 20
# A job takes no further batch after this long: well within arq's job_timeout (60 s, main.py),
# which cancelled every job working off a backlog of hundreds of thousands mid-batch. What is left
# waits for the next job (the gateway's, the sweeper's).
JOB_SECONDS = 30.0

# What judging a click needs: the click (k), its message (m) and its offer's window (o). Each
# click and its message is one primary key probe (LATERAL with LIMIT, never flattened into a
# join): "k.id = ANY" and a join let the planner read the whole clicks and messages tables per
# batch until they held a few hundred thousand rows. A probe holds the key alone, other conditions
# (the message's account) outside it: nothing is pushed into a subquery with a LIMIT, and inside
# the planner may read an account that statistics call small through its own index, all of it
# per probe (the gateway's lookups did: 0.8 s per 1000).
_CLICKS = """
SELECT k.id, k.account_id, k.clicked_at, k.is_bot, k.link_id, m.id AS message_id,
       coalesce(k.offer_id, m.offer_id) AS offer_id, coalesce(m.list_id, k.list_id) AS list_id,
       m.creative_id, m.schedule_id, m.to_phone,
       coalesce(o.click_window_days, $2::int) AS window_days
FROM (SELECT DISTINCT id FROM unnest($1::text[]) AS r(id)) r
CROSS JOIN LATERAL (
    SELECT id, account_id, clicked_at, is_bot, link_id, offer_id, list_id, message_id FROM clicks
    WHERE id = r.id LIMIT 1
) k
LEFT JOIN LATERAL (
    SELECT id, offer_id, list_id, creative_id, schedule_id, to_phone, account_id FROM messages
    WHERE id = k.message_id LIMIT 1
) m ON m.account_id = k.account_id
LEFT JOIN offers o ON o.id = coalesce(k.offer_id, m.offer_id)
"""

# The job's own postback is waited for if another batch holds it (that batch may roll back, and
# then nobody else would take it); the rest are only those nobody holds. Their rows are read by
# primary key probes (LATERAL with LIMIT): "id IN (...)" let the planner hash the whole table.
_TAKE = """
WITH own AS (
    SELECT id FROM postbacks WHERE id = $1 AND processed_at IS NULL AND NOT is_duplicate
    FOR UPDATE
), rest AS (
    SELECT id FROM postbacks WHERE processed_at IS NULL AND NOT is_duplicate AND id IS DISTINCT FROM $1
    ORDER BY received_at LIMIT $2
    FOR UPDATE SKIP LOCKED
)
SELECT p.id, p.account_id, p.network, p.conversion_key, p.click_id, p.status, p.payout, p.currency, p.offer_ref,
       p.converted_at
FROM (SELECT id FROM own UNION ALL SELECT id FROM rest) t
CROSS JOIN LATERAL (
    SELECT id, account_id, network, conversion_key, click_id, status, payout, currency, offer_ref, converted_at
    FROM postbacks WHERE id = t.id LIMIT 1
) p
ORDER BY p.id
"""

# Each ref as an internal id, else as a live offer's external id, else a deleted one's: the one
# deleted last (the last to hold it; a deleted offer is never written again), as the gateway's
# find_offers takes. Two joins that each use an index (the primary key; offers_account_external_id),
# not one join on "id = ref OR external_id = ref", which could use neither.
_OFFERS = """
WITH refs AS (SELECT * FROM unnest($1::bigint[], $2::text[]) AS t(account_id, ref))
SELECT DISTINCT ON (account_id, ref) account_id, ref, id, payout, currency FROM (
    SELECT r.account_id, r.ref, o.id, o.payout, o.currency, o.updated_at, 0 AS rank
    FROM refs r JOIN offers o ON o.id = r.ref AND o.account_id = r.account_id
    UNION ALL
    SELECT r.account_id, r.ref, o.id, o.payout, o.currency, o.updated_at,
           CASE WHEN o.status = 'deleted' THEN 2 ELSE 1 END
    FROM refs r JOIN offers o ON o.account_id = r.account_id AND o.external_id = r.ref
) found
ORDER BY account_id, ref, rank, updated_at DESC, id DESC
"""

_CONVERSION_COLUMNS = (
    "id, account_id, network, conversion_key, status, payout, payout_given, currency, currency_given, click_id,"
    " converted_at, offer_id"
)

# The keys of a batch's conversions with a postback waiting outside the batch that is older than
# the batch's last one of that conversion (another batch holds it, or it was not taken): before
# the batch's first, or between two of them. Theirs wait for it, so postbacks move a conversion in
# the order they were received whichever batch commits first. (Waiting, non-duplicate postbacks
# all have a dedupe key: the index the gateway's dedupe uses finds them, one probe per conversion:
# LATERAL with LIMIT, as EXISTS let the planner read every waiting postback per batch.)
_BEHIND = """
SELECT t.account_id, t.network, t.conversion_key
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[]) AS t(account_id, network, conversion_key, last_id)
CROSS JOIN LATERAL (
    SELECT 1 FROM postbacks p
    WHERE p.account_id = t.account_id AND p.network = t.network AND p.conversion_key = t.conversion_key
      AND p.dedupe_key IS NOT NULL AND p.id < t.last_id AND p.processed_at IS NULL AND NOT p.is_duplicate
      AND p.id <> ALL($5::bigint[])
    LIMIT 1
) p
"""

# One probe of the unique key per conversion (LATERAL with LIMIT: "IN (unnest)" let the planner
# read the whole table per batch), each locking its row as it is read: the keys are sorted first,
# so the rows are locked in key order all the same (a nested loop keeps its outer side's order).
_LOCK = f"""
SELECT c.* FROM (
    SELECT DISTINCT * FROM unnest($1::bigint[], $2::text[], $3::text[]) AS u(account_id, network, conversion_key)
    ORDER BY account_id, network, conversion_key
) t
CROSS JOIN LATERAL (
    SELECT {_CONVERSION_COLUMNS} FROM conversions
    WHERE account_id = t.account_id AND network = t.network AND conversion_key = t.conversion_key
    LIMIT 1
    FOR UPDATE
) c
ORDER BY t.account_id, t.network, t.conversion_key
"""

_CREATE = f"""
INSERT INTO conversions (account_id, network, conversion_key, click_id, status, payout, currency, converted_at,
                         offer_id, attributed, unattributed_reason, message_id, link_id, list_id, creative_id,
                         schedule_id, contact_phone, clicked_at, payout_given, currency_given)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::numeric[], $7::text[],
                     $8::timestamptz[], $9::text[], $10::boolean[], $11::text[], $12::text[], $13::text[],
                     $14::bigint[], $15::text[], $16::text[], $17::text[], $18::timestamptz[], $19::boolean[],
                     $20::boolean[])
ORDER BY 1, 2, 3
ON CONFLICT (account_id, network, conversion_key) DO NOTHING
RETURNING {_CONVERSION_COLUMNS}
"""

# "col = {_each_of(...)}": a batch's keys as an array the planner cannot see into, so that it reads
# the table's index for them whatever the size of the table. With a join on unnest alone it read
# the whole table per batch until it held a few hundred thousand rows, and with "col = ANY($1)"
# it still did (it hashes a constant array, which makes a seq scan's check cheap); an array from a
# subquery it counts as a few keys. The UPDATEs of a batch's rows by id say it besides the join.
def _each_of(param: str, sql_type: str) -> str:
    return f"ANY(ARRAY(SELECT unnest({param}::{sql_type}[])))"


_IDS = _each_of("$1", "bigint")

_MOVE = f"""
UPDATE conversions c SET status = t.status, payout = t.payout, payout_given = t.payout_given, currency = t.currency,
    currency_given = t.currency_given, updated_at = now()
FROM unnest($1::bigint[], $2::text[], $3::numeric[], $4::boolean[], $5::text[], $6::boolean[])
    AS t(id, status, payout, payout_given, currency, currency_given)
WHERE c.id = t.id AND c.id = {_IDS}
"""

_LEDGER = """
INSERT INTO conversion_adjustments (conversion_id, postback_id, from_status, to_status, amount)
SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::numeric[])
"""

_DONE = f"""
UPDATE postbacks p SET processed_at = now(), process_error = t.error
FROM unnest($1::bigint[], $2::text[]) AS t(id, error)
WHERE p.id = t.id AND p.id = {_IDS}
"""

_ATTRIBUTE = f"""
UPDATE conversions c SET
    attributed = t.attributed, unattributed_reason = t.reason, message_id = t.message_id, link_id = t.link_id,
    list_id = t.list_id, creative_id = t.creative_id, schedule_id = t.schedule_id, contact_phone = t.contact_phone,
    clicked_at = t.clicked_at, offer_id = coalesce(t.offer_id, c.offer_id), updated_at = now()
FROM unnest($1::bigint[], $2::boolean[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[], $8::text[],
            $9::text[], $10::timestamptz[], $11::text[])
    AS t(id, attributed, reason, message_id, link_id, list_id, creative_id, schedule_id, contact_phone, clicked_at,
         offer_id)
WHERE c.id = t.id AND c.id = {_IDS}
"""


@dataclass
class Attribution:
    attributed: bool
    reason: str | None
    click: Any = None  # the clicks row (joined with its message) when attributed

    def columns(self) -> tuple[Any, ...]:
        """message_id, link_id, list_id, creative_id, schedule_id, contact_phone, clicked_at, offer_id."""
        c = self.click if self.attributed else None
        if c is None:
            return (None,) * 8
        return (c["message_id"], c["link_id"], c["list_id"], c["creative_id"], c["schedule_id"], c["to_phone"],
                c["clicked_at"], c["offer_id"])


def judge(account_id: int, click_id: str | None, converted_at: datetime, click: Any) -> Attribution:
    """First-click attribution rules, in one place for postbacks and late clicks alike."""
    if click_id is None:
        return Attribution(False, "no_click_id")
    if click is None or click["account_id"] != account_id:
        return Attribution(False, "click_not_found")
    if click["is_bot"]:
        return Attribution(False, "bot_click")
    # Networks report conversion times to the second, and the {datetime} macro hands them the
    # click's own second, truncated: a conversion stamped with the click's second is not before it.
    # The window ends exactly window_days after the click, so the click's second plus the window
    # is inside, and one second more (or anything past the exact end) is outside.
    clicked_at = click["clicked_at"]
    if converted_at < clicked_at.replace(microsecond=0):
        return Attribution(False, "before_click")
    if converted_at > clicked_at + timedelta(days=click["window_days"]):
        return Attribution(False, "expired")
    return Attribution(True, None, click)


@dataclass
class Clicks:
    """The clicks postbacks name, by the name (a click id, or a message id)."""

    named: dict[str, Any] = field(default_factory=dict)

    def credit(self, account_id: int, click_id: str | None, converted_at: datetime) -> Attribution:
        """The named click's verdict: it wins if it qualifies (same account, human, window)."""
        return judge(account_id, click_id, converted_at, self.named.get(click_id) if click_id else None)


async def fetch_clicks(conn: asyncpg.Connection, click_ids: set[str]) -> Clicks:
    """The clicks ``click_ids`` name, by the name: a click id, or a message id for its message's
    first human click (``judge`` checks the account either way)."""
    if not click_ids:
        return Clicks()
    firsts: dict[str, str] = {}  # message id -> its first click's id
    message_refs = sorted(ref for ref in click_ids if MESSAGE_ID_RE.match(ref))
    if message_refs:
        firsts = {r["message_id"]: r["click_id"] for r in await conn.fetch(
            # (A constant array had the planner read all of message_clicks.)
            f"SELECT message_id, click_id FROM message_clicks WHERE message_id = {_each_of('$1', 'text')}",
            message_refs)}
    rows = await conn.fetch(_CLICKS, sorted({*click_ids, *firsts.values()}), DEFAULT_WINDOW_DAYS)
    by_id = {r["id"]: r for r in rows}
    named = {ref: by_id[ref] for ref in click_ids if ref in by_id}
    named.update((message, by_id[click]) for message, click in firsts.items() if click in by_id)
    return Clicks(named)


@dataclass
class _State:
    """A conversion while a batch moves it: where it started and where it ends."""

    id: int
    status: str
    payout: Decimal
    payout_given: bool  # by a postback applied (else the offer's, or 0 while no offer is known)
    currency: str
    currency_given: bool  # likewise (else the offer's, or USD)
    click_id: str | None
    converted_at: datetime
    offer_id: str | None = None  # as it was read or created (the payout and currency defaults came from it)
    moved: bool = False
    ledger: list[tuple[int, str | None, str, Decimal]] = field(default_factory=list)  # postback, from, to, amount

    def apply(self, postback_id: int, status: str, payout: Decimal | None, currency: str | None) -> None:
        """A postback's move, if the status machine takes it. Its currency, if it names one,
        is the conversion's from then on (the payout it gives is in that currency)."""
        new_payout = self.payout if payout is None else payout
        if not accepts_move(self.status, self.payout, status, new_payout):
            if status == self.status and new_payout == self.payout:
                # No amount moves, but what the postback states is the network's word from now on,
                # not a default a click stored later may replace (its offer's payout or currency).
                if payout is not None and not self.payout_given:
                    self.payout_given = self.moved = True
                if currency is not None and (currency != self.currency or not self.currency_given):
                    self.currency, self.currency_given, self.moved = currency, True, True
            return
        delta = MONEY.subtract(status_value(status, new_payout), status_value(self.status, self.payout))  # exact
        self.ledger.append((postback_id, self.status, status, delta))
        self.status, self.payout, self.moved = status, new_payout, True
        self.payout_given = self.payout_given or payout is not None
        if currency is not None:
            self.currency, self.currency_given = currency, True


def _state(row: Any) -> _State:
    return _State(row["id"], row["status"], row["payout"], row["payout_given"], row["currency"], row["currency_given"],
                  row["click_id"], row["converted_at"], row["offer_id"])


class Taken(NamedTuple):
    processed: int
    deferred: int  # left waiting for an older postback of their conversion

    @property
    def total(self) -> int:
        return self.processed + self.deferred


async def process_batch(conn: asyncpg.Connection, first_id: int | None = None, limit: int = BATCH_SIZE) -> Taken:
    """Process up to ``limit`` unprocessed postbacks (``first_id`` among them if it is still waiting)
    in the caller's transaction: all but those of a conversion with a postback waiting outside the
    batch that is older than the batch's last one of it, which are left for later (``_BEHIND``)."""
    rows = await conn.fetch(_TAKE, first_id, limit)
    if not rows:
        return Taken(0, 0)
    groups: dict[tuple[int, str, str], list[Any]] = {}  # each conversion's postbacks, in id order
    for r in rows:
        groups.setdefault((r["account_id"], r["network"], r["conversion_key"]), []).append(r)
    behind = await conn.fetch(
        _BEHIND, *map(list, zip(*((*key, group[-1]["id"]) for key, group in groups.items()))), [r["id"] for r in rows]
    )
    deferred = sum(len(groups.pop((b["account_id"], b["network"], b["conversion_key"]))) for b in behind)
    if not groups:
        return Taken(0, deferred)
    rows = [r for group in groups.values() for r in group]
    clicks = await fetch_clicks(conn, {r["click_id"] for r in rows if r["click_id"]})
    offer_refs = sorted({(r["account_id"], r["offer_ref"]) for r in rows if r["offer_ref"]})
    offers: dict[tuple[int, str], Any] = {}
    if offer_refs:
        found = await conn.fetch(_OFFERS, [a for a, _ in offer_refs], [ref for _, ref in offer_refs])
        offers = {(r["account_id"], r["ref"]): r for r in found}
    # Offers of the clicks, for a postback that names no payout.
    click_offer_ids = sorted({c["offer_id"] for c in clicks.named.values() if c["offer_id"]})
    click_offers = {}
    if click_offer_ids:
        click_offers = {r["id"]: r for r in await conn.fetch(
            "SELECT id, payout, currency FROM offers WHERE id = ANY($1::text[])", click_offer_ids)}

    keys = sorted(groups)

    states: dict[tuple[int, str, str], _State] = {}

    async def lock(wanted: list[tuple[int, str, str]]) -> None:
        if wanted:
            for c in await conn.fetch(_LOCK, *map(list, zip(*wanted))):
                states[(c["account_id"], c["network"], c["conversion_key"])] = _state(c)

    await lock(keys)
    fresh = [k for k in keys if k not in states]
    created: set[tuple[int, str, str]] = set()
    # Conversions judged by a click that may change in a transaction that cannot see them (see
    # the end): (account, click id).
    recheck: set[tuple[int, str]] = set()
    if fresh:
        cols: list[list[Any]] = [[] for _ in range(20)]
        for key in fresh:
            first = groups[key][0]
            verdict = clicks.credit(first["account_id"], first["click_id"], first["converted_at"])
            if _may_change(first["click_id"], verdict):
                recheck.add((first["account_id"], first["click_id"]))
            named = offers.get((first["account_id"], first["offer_ref"])) if first["offer_ref"] else None
            offer_id = verdict.columns()[7] or (named["id"] if named else None)
            offer = (click_offers.get(offer_id) if verdict.attributed else None) or named
            payout = first["payout"]
            if payout is None:
                payout = (offer["payout"] if offer is not None else None) or Decimal(0)
            currency = first["currency"] or (offer["currency"] if offer is not None else None) or "USD"
            message_id, link_id, list_id, creative_id, schedule_id, phone, clicked_at, _ = verdict.columns()
            for col, value in zip(cols, (
                key[0], key[1], key[2], first["click_id"], first["status"], payout, currency, first["converted_at"],
                offer_id, verdict.attributed, verdict.reason, message_id, link_id, list_id, creative_id, schedule_id,
                phone, clicked_at, first["payout"] is not None, first["currency"] is not None,
            )):
                col.append(value)
        for c in await conn.fetch(_CREATE, *cols):
            key = (c["account_id"], c["network"], c["conversion_key"])
            state = _state(c)
            state.ledger.append((groups[key][0]["id"], None, c["status"], status_value(c["status"], c["payout"])))
            states[key] = state
            created.add(key)
        # Created by a concurrent batch between our lock and our insert: lock theirs.
        await lock([k for k in fresh if k not in states])

    ledger: list[tuple[int, int, str | None, str, Decimal]] = []
    moves: list[tuple[int, str, Decimal, bool, str, bool]] = []
    for key in keys:
        state = states[key]
        for r in groups[key][1:] if key in created else groups[key]:
            state.apply(r["id"], r["status"], r["payout"], r["currency"])
        ledger += [(state.id, *entry) for entry in state.ledger]
        if state.moved:
            moves.append((state.id, state.status, state.payout, state.payout_given, state.currency, state.currency_given))
    if moves:
        await conn.execute(_MOVE, *map(list, zip(*moves)))
    if ledger:
        await conn.execute(_LEDGER, *map(list, zip(*ledger)))
    # A conversion whose postbacks named no click takes the first click a later one names, and is
    # judged by it (a network that learned the click id late, as with a manual approval).
    late: list[tuple[int, str, Attribution, int]] = []  # conversion, click id, verdict, account
    offers_before: dict[int, str | None] = {}
    for key in keys:
        state = states[key]
        if state.click_id is None:
            named = next((r["click_id"] for r in groups[key] if r["click_id"]), None)
            if named is not None:
                late.append((state.id, named, clicks.credit(key[0], named, state.converted_at), key[0]))
                offers_before[state.id] = state.offer_id
    if late:
        await conn.execute(
            "UPDATE conversions c SET click_id = t.click_id, waiting_since = now(), updated_at = now()"
            f" FROM unnest($1::bigint[], $2::text[]) AS t(id, click_id) WHERE c.id = t.id AND c.id = {_IDS}",
            [i for i, _, _, _ in late], [named for _, named, _, _ in late],
        )
        await _attribute(conn, [(i, verdict) for i, _, verdict, _ in late])
        await _default_from_click_offers(conn, {i: offers_before[i] for i, _, verdict, _ in late if verdict.attributed})
        # A late click id's click may not be stored yet: waiting_since is when the sweeper's
        # re-match starts its window (a day) for it, as the creation is for a conversion that
        # named its click at once. (Such a conversion is often older than that window.)
        recheck.update((account, named) for _, named, verdict, account in late if _may_change(named, verdict))
    # A click not stored yet (or, for a message, an earlier first click) may be being stored right
    # now, by a drainer whose re-match cannot see these conversions: leave the sweeper a request
    # (as /history/clicks does).
    if recheck:
        waiting = sorted(recheck)
        await conn.execute(
            "INSERT INTO rematch_requests (account_id, click_id) SELECT * FROM unnest($1::bigint[], $2::text[])",
            [a for a, _ in waiting], [c for _, c in waiting],
        )
    await conn.execute(_DONE, [r["id"] for r in rows], [None] * len(rows))
    return Taken(len(rows), deferred)


def _may_change(click_id: str | None, verdict: Attribution) -> bool:
    """Whether a verdict may change once a click being stored meanwhile commits: a message's first
    click can be replaced by an earlier one (a click's own time never changes), which makes a
    before_click conversion credited, and moves a credited one to the earlier click (its time, its
    offer, its payout default; or expired), and credits an expired one when the earlier click's offer
    has a longer window. The drainer's re-match cannot see a conversion this batch has not
    committed, so all three leave the sweeper a request.
    (click_not_found at creation is the sweeper's re-match's, which looks for exactly that.)"""
    if click_id is None:
        return False
    changeable = verdict.attributed or verdict.reason in ("before_click", "expired")
    return changeable and MESSAGE_ID_RE.match(click_id) is not None


async def _attribute(conn: asyncpg.Connection, updates: list[tuple[int, Attribution]]) -> None:
    if not updates:
        return
    cols: list[list[Any]] = [[] for _ in range(11)]
    for conversion_id, verdict in updates:
        for col, value in zip(cols, (conversion_id, verdict.attributed, verdict.reason, *verdict.columns())):
            col.append(value)
    await conn.execute(_ATTRIBUTE, *cols)


# For conversions a late click attributes (after ``_ATTRIBUTE``, so their offer is the click's):
# the payout and currency their postbacks left to the offer.
_DEFAULTS = f"""
SELECT c.id, c.offer_id, c.status, c.payout, c.currency, c.payout_given, c.currency_given,
       o.payout AS offer_payout, o.currency AS offer_currency
FROM conversions c
LEFT JOIN offers o ON o.id = c.offer_id
WHERE c.id = {_IDS} AND NOT (c.payout_given AND c.currency_given)
ORDER BY c.id
"""


async def _default_from_click_offers(conn: asyncpg.Connection, offers_before: dict[int, str | None]) -> None:
    """A conversion made before its click was stored had no offer to take a payout or currency
    no postback gave from (0 and USD), unless the postback named one; once the click is in, it
    gets what it would have had if the click had come first: the click's offer's, else the named
    one's. A payout change is written to the ledger. ``offers_before``: each conversion's offer
    before the click credited it. One credited on the offer it already had (the one its postback
    named, or its message's earlier first click on the same offer) keeps what it took from it,
    as if the click had come first: the offer's payout may have been edited since."""
    if not offers_before:
        return
    changes: list[tuple[int, Decimal, str]] = []
    ledger: list[tuple[int, None, str, str, Decimal]] = []
    for r in await conn.fetch(_DEFAULTS, list(offers_before)):
        if r["offer_id"] is not None and r["offer_id"] == offers_before[r["id"]]:
            continue
        payout = r["payout"] if r["payout_given"] else (r["offer_payout"] or Decimal(0))
        currency = r["currency"] if r["currency_given"] else (r["offer_currency"] or "USD")
        if (payout, currency) == (r["payout"], r["currency"]):
            continue
        changes.append((r["id"], payout, currency))
        delta = MONEY.subtract(status_value(r["status"], payout), status_value(r["status"], r["payout"]))  # exact
        if delta:
            ledger.append((r["id"], None, r["status"], r["status"], delta))
    if changes:
        await conn.execute(
            "UPDATE conversions c SET payout = t.payout, currency = t.currency, updated_at = now()"
            " FROM unnest($1::bigint[], $2::numeric[], $3::text[]) AS t(id, payout, currency)"
            f" WHERE c.id = t.id AND c.id = {_IDS}",
            *map(list, zip(*changes)),
        )
    if ledger:
        await conn.execute(_LEDGER, *map(list, zip(*ledger)))


# A click_id shaped like a message id (shared.ids.MESSAGE_ID_RE), as a PostgreSQL pattern.
_NAMES_A_MESSAGE = "'^[A-Za-z0-9]{8}$'"


async def rematch_for_clicks(conn: asyncpg.Connection, click_ids: list[str]) -> int:
    """Attribute conversions that arrived before their click was drained (or, for a bot's click,
    say so). Called by the click drainer inside its transaction with the ids of clicks it just
    stored and of the messages whose first click it stored (a conversion may name a message).
    Returns how many conversions were attributed."""
    if not click_ids:
        return 0
    # A conversion that names a message is judged again too, whatever its verdict was (before the
    # click, credited by a click, or expired: the earlier click's offer may have a longer window):
    # the first click it was judged by may just have been replaced by an earlier one. (A constant
    # array had the planner read all the conversions per drained batch.)
    # Two probes (the waiting ones by click id, the credited ones by message: an attributed
    # conversion that names a message is that message's), then one lock of them all in
    # process_batch's order (no deadlock); one OR of the two had the planner scan every conversion.
    waiting = await conn.fetch(
        "SELECT id, account_id, click_id, converted_at, attributed, unattributed_reason, clicked_at, offer_id"
        " FROM conversions"
        " WHERE id = ANY(ARRAY("
        f"  SELECT id FROM conversions WHERE click_id = {_each_of('$1', 'text')}"
        "   AND NOT attributed AND (unattributed_reason = 'click_not_found'"
        f"   OR (unattributed_reason IN ('before_click', 'expired') AND click_id ~ {_NAMES_A_MESSAGE}))"
        f"  UNION ALL SELECT id FROM conversions WHERE message_id = {_each_of('$2', 'text')}"
        "   AND click_id = message_id AND attributed))"
        " ORDER BY account_id, network, conversion_key FOR UPDATE",
        list(click_ids), [c for c in click_ids if MESSAGE_ID_RE.match(c)],
    )
    if not waiting:
        return 0
    clicks = await fetch_clicks(conn, {w["click_id"] for w in waiting})
    # What stays as it was is left alone; any other verdict (attributed, expired, ...) is final
    # (for a message, until its first click changes).
    updates = []
    for w in waiting:
        verdict = clicks.credit(w["account_id"], w["click_id"], w["converted_at"])
        if w["attributed"]:
            # Credited by the message's first click: final while that click is still its first,
            # whatever the offer's window says now (one that names its click is never judged again).
            click = clicks.named.get(w["click_id"])
            unchanged = click is not None and click["clicked_at"] == w["clicked_at"]
        else:
            unchanged = verdict.reason == w["unattributed_reason"]
        if not unchanged:
            updates.append((w["id"], verdict))
    await _attribute(conn, updates)
    attributed = [cid for cid, v in updates if v.attributed]
    before = {w["id"]: w["offer_id"] for w in waiting}
    await _default_from_click_offers(conn, {cid: before[cid] for cid in attributed})
    return len(attributed)


# How far back the sweeper's re-match looks, by when the conversion was judged click_not_found:
# its creation, or when a later postback named the click it waits for (``waiting_since``, 0027).
# A click stored after that is re-matched by the drainer itself; only a conversion and its click
# committed at the same moment need the sweeper, which runs every few seconds. A day bounds the
# cost of click ids that never arrive (they pile up for good); a worker that starts looks back
# without limit once, for an outage longer than that.
REMATCH_WINDOW = "1 day"  # a literal in the SQL: the planner estimates it (a parameter it cannot)


def waiting_for_a_click(window: str | None) -> str:
    """The WHERE clause, on conversions ``c``, of those waiting for a click (judged so within
    ``window``, None: ever): partial index conversions_waiting_click_since."""
    recent = f" AND coalesce(c.waiting_since, c.created_at) > now() - interval '{window}'" if window else ""
    return f"WHERE NOT c.attributed AND c.unattributed_reason = 'click_not_found' AND c.click_id IS NOT NULL{recent}"


async def rematch_stored(conn: asyncpg.Connection, limit: int = 1000, *, window: str | None = REMATCH_WINDOW) -> int:
    """Conversions still waiting for a click that is stored by now (the postback and the click
    committed at the same moment, each missing the other), judged so within ``window`` (None: ever).
    Returns how many such clicks it took (each one's conversions are judged again, so a next call
    moves on): fewer than ``limit`` means none is left."""
    waiting = waiting_for_a_click(window)
    # Two lookups rather than one with OR: each uses its own index (an OR had the planner hash all
    # of message_clicks once many conversions waited). The second only for ids shaped like a message's.
    # Each is one probe per waiting conversion (LATERAL with LIMIT): with EXISTS the planner hashed
    # all of clicks and message_clicks once a few thousand conversions waited. The account is
    # compared outside the probe, which holds the key alone (see _CLICKS).
    click_ids = await conn.fetch(
        "SELECT c.click_id FROM conversions c CROSS JOIN LATERAL"
        " (SELECT account_id FROM clicks k WHERE k.id = c.click_id LIMIT 1) k"
        f" {waiting} AND k.account_id = c.account_id"
        " UNION SELECT c.click_id FROM conversions c CROSS JOIN LATERAL"
        " (SELECT account_id FROM message_clicks mc WHERE mc.message_id = c.click_id LIMIT 1) mc"
        f" {waiting} AND mc.account_id = c.account_id AND c.click_id ~ {_NAMES_A_MESSAGE}"
        " LIMIT $1",
        limit,
    )
    await rematch_for_clicks(conn, [r["click_id"] for r in click_ids])
    return len(click_ids)


async def rematch_requested(conn: asyncpg.Connection, limit: int = REMATCH_PAGE) -> int:
    """Re-match the conversions of up to ``limit`` requests that /history/clicks left (it stored
    the first click of a message that a waiting conversion names; migration 0017) or a batch left
    (``process_batch``: a click being stored meanwhile may change its verdict), deleting them
    in the caller's transaction: a worker that dies mid-way leaves them for the next sweep.
    Returns how many requests it took: fewer than ``limit`` means none is left."""
    rows = await conn.fetch(
        "DELETE FROM rematch_requests WHERE id IN"
        " (SELECT id FROM rematch_requests ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING click_id",
        limit,
    )
    names = sorted({r["click_id"] for r in rows})
    # A batch's request can commit while a drain that stored an earlier first click of its message
    # is still open, that drain's re-match done before the batch committed: read now, the message's
    # first click would still be the old one, and nothing would judge the conversion again. The drain
    # holds the message's message_clicks row (updated, or locked by its ON CONFLICT) until it
    # commits: wait for it. A drain that locks the row after this needs no wait (the batch has
    # committed: its own re-match sees the conversion). Locked in message id order, the drainer's:
    # the two never wait for each other crosswise.
    messages = [n for n in names if MESSAGE_ID_RE.match(n)]
    if messages:
        await conn.execute(
            f"SELECT 1 FROM message_clicks WHERE message_id = {_each_of('$1', 'text')} ORDER BY message_id FOR SHARE",
            messages,
        )
    await rematch_for_clicks(conn, names)
    return len(rows)


async def rematch_all(db: asyncpg.Pool, limit: int = 1000) -> None:
    """``rematch_stored`` without a window, a page per transaction until none is left: what a
    worker does once when it starts (the sweeper may have been down for longer than the window)."""
    while True:
        async with db.acquire() as conn, conn.transaction():
            if await rematch_stored(conn, limit, window=None) < limit:
                return


# Errors a postback's own data causes: retrying cannot help, so the postback is closed with the
# error recorded for the operator instead of blocking every batch it lands in.
POISON_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, asyncpg.ProgramLimitExceededError)


async def _run_batch(db: asyncpg.Pool, postback_id: int | None, limit: int) -> Taken:
    for attempt in range(DEADLOCK_RETRIES):
        try:
            async with db.acquire() as conn, conn.transaction():
                return await process_batch(conn, postback_id, limit)
        except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
            # Two batches met on the same conversions in different orders: one of them yields.
            if attempt == DEADLOCK_RETRIES - 1:
                raise
            await asyncio.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


async def process_postback(ctx: dict[str, Any], postback_id: int) -> int:
    """arq job: attribute this postback and whatever else is waiting, a batch at a time, until a
    batch comes back short. The gateway enqueues one such job per ``ATTRIBUTION_WINDOW``; the
    sweeper enqueues one per postback that waited too long. Returns how many it processed.

    Postbacks a batch left behind an older one of their conversion (another job's batch holds it)
    are taken again after a pause, a few times; after that the sweeper sees them waiting. So does
    what is left after ``JOB_SECONDS``."""
    db: asyncpg.Pool = ctx["db"]
    own: int | None = postback_id
    done = pauses = 0
    until = time.monotonic() + JOB_SECONDS
    while True:
        try:
            taken = await _run_batch(db, own, BATCH_SIZE)
        except POISON_ERRORS:
            # One bad postback must not sink the batch it lands in: alone, it sinks only itself.
            log.warning("a postback batch failed; processing it one postback at a time", exc_info=True)
            taken = await _one_at_a_time(db, own)
        done += taken.processed
        own = None
        if time.monotonic() > until:
            return done
        if taken.total >= BATCH_SIZE and taken.processed:
            continue  # a full batch: more may be waiting (one that only left postbacks behind pauses)
        if not taken.deferred or pauses == DEFERRED_RETRIES:
            return done
        pauses += 1
        await asyncio.sleep(DEFERRED_PAUSE)


async def _one_at_a_time(db: asyncpg.Pool, own: int | None) -> Taken:
    """Process the waiting postbacks (a batch's worth) each in its own transaction, closing those
    whose own data fails with the error recorded."""
    rows = await db.fetch(
        "SELECT id FROM postbacks WHERE processed_at IS NULL AND NOT is_duplicate ORDER BY received_at LIMIT $1",
        BATCH_SIZE,
    )
    ids = list(dict.fromkeys([*([own] if own is not None else []), *(r["id"] for r in rows)]))[:BATCH_SIZE]
    processed = deferred = 0
    for pid in sorted(ids):  # in the order received: a conversion's older postbacks first
        try:
            taken = await _run_batch(db, pid, 0)
            processed, deferred = processed + taken.processed, deferred + taken.deferred
        except POISON_ERRORS as exc:
            processed += 1
            await db.execute(
                "UPDATE postbacks SET processed_at = now(), process_error = $2 WHERE id = $1 AND processed_at IS NULL",
                pid, f"{type(exc).__name__}: {exc}"[:1000],
            )
            log.error("postback %s cannot be processed: %s", pid, exc)
    return Taken(processed, deferred)


async def sweep_once(db: asyncpg.Pool, arq_redis: Any) -> int:
    """Enqueue stored postbacks that have waited too long (their job was never enqueued, or failed);
    arq's job id keeps a postback whose job is still queued from running twice."""
    ids = await db.fetch(
        "SELECT id FROM postbacks WHERE processed_at IS NULL AND NOT is_duplicate AND received_at < now() - $1::interval"
        " ORDER BY received_at LIMIT $2",
        SWEEP_AGE, SWEEP_LIMIT,
    )
    try:
        for row in ids:
            await arq_redis.enqueue_job(PROCESS_POSTBACK, row["id"], _job_id=postback_job_id(row["id"]))
    finally:  # Redis down must not stop the re-match (PostgreSQL only) for longer than its window
        async with db.acquire() as conn, conn.transaction():
            await rematch_stored(conn)
        while True:  # a page per transaction
            async with db.acquire() as conn, conn.transaction():
                if await rematch_requested(conn) < REMATCH_PAGE:
                    break
    return len(ids)


# How long a failed start-up re-match (a deadlock, a statement timeout) waits before it goes again.
REMATCH_ALL_RETRY = 30.0


async def run_sweeper(ctx: dict[str, Any]) -> None:
    """Started by the worker: a re-match without a window until it succeeds once (beside the
    sweeps, which it must not hold up), and a sweep every few seconds; a failure only delays the
    next sweep or attempt."""
    once = asyncio.ensure_future(loops.until_done(
        lambda: rematch_all(ctx["db"]), log=log, failure="the start-up re-match failed; trying again",
        pause_after_failure=REMATCH_ALL_RETRY,
    ))
    try:
        await loops.repeat(
            lambda: sweep_once(ctx["db"], ctx["redis"]),
            log=log, failure="postback sweep failed; retrying", pause_after_failure=0.0, interval=SWEEP_INTERVAL,
        )
    finally:
        once.cancel()
        await asyncio.gather(once, return_exceptions=True)


FUNCTIONS: list[Any] = [process_postback]
