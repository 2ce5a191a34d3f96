"""Recording messages: validation, short-URL rewriting and set-based inserts.

One path serves ``/send`` (a batch of one), ``/send/bulk`` and ``/history/sends``: records are
validated on their own, then every lookup and insert is done for the whole batch at once.
"""
from __future__ import annotations

import asyncio
import re
import string
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import asyncpg

from services.gateway.http import refuse_unstorable
from services.gateway.lookups import find_lists, find_offers
from services.gateway.publish import publish_message_codes
from shared import ids
from shared.edge import MessageCodeEntry, host_of, message_code_entry
from shared.errors import ApiError, bad_request, not_found, validation
from shared.phone import PhoneError, parse_e164
from shared.timeutil import utcnow

# A short URL as it appears in a body: an optional scheme (SMS copy often drops it to save
# characters), host[:port], a 6-character link id, then a boundary. Without a scheme the host must
# start a word, or follow an ellipsis ("tonight...sms.example.com/Ab3kX9": a host starts with a
# letter or digit and holds no "..", as no hostname does). Only a host that is the link's own short
# domain is rewritten, so a look-alike in other text never is. Every class is ASCII (no
# IGNORECASE, which lets [a-z] take "ſ" or the Kelvin sign, and no \d, which takes any script's
# digits).
#
# This pattern is the definition; ``short_urls`` finds exactly its matches several times faster
# (the test suite checks the two against each other on random text).
SHORT_URL_RE = re.compile(
    r"(?:([hH][tT][tT][pP][sS]?://)|(?<![A-Za-z0-9.\-/@])|(?<=\.\.))"
    r"([A-Za-z0-9][A-Za-z0-9-]*(?:\.[A-Za-z0-9-]+)*\.?(?::[0-9]+)?)/([A-Za-z0-9]{6,7})(?![A-Za-z0-9])"
)
# What could be a link id (6 characters) or a per-message code (7: a message's URL pasted into
# another body is that link's too) in a body: cheap to find (anchored on "/"), a superset of
# SHORT_URL_RE's.
LINK_ID_CANDIDATE_RE = re.compile(r"/([A-Za-z0-9]{6,7})(?![A-Za-z0-9])")
_HOST_CHARS = string.ascii_letters + string.digits + ".-"
# Above this many "/" in a body, short_urls lets SHORT_URL_RE scan it (an SMS with a link or two
# has up to about six).
MANY_SLASHES = 16
FEW_LINKS = 8  # a batch's links, at most, looked for in each body one by one


def _run_start(body: str, end: int, chars: str) -> int:
    """Where the run of ``chars`` that ends at ``end`` starts. Measured by what ``str.rstrip``
    leaves of a window before ``end`` (in C, not a loop per character), widened only while the
    window is all run: a body's runs are disjoint, so a whole body costs linear time."""
    width = 64
    while True:
        low = max(0, end - width)
        kept = len(body[low:end].rstrip(chars))
        if kept or low == 0:
            return low + kept
        width *= 4


def _scheme_start(body: str, host_start: int) -> int:
    """Where an ``http://`` or ``https://`` (any case) that ends at ``host_start`` starts, or -1."""
    if host_start >= 7 and body.startswith("://", host_start - 3):
        if body[host_start - 7 : host_start - 3].lower() == "http":
            return host_start - 7
        if host_start >= 8 and body[host_start - 8 : host_start - 3].lower() == "https":
            return host_start - 8
    return -1


def _url_start(body: str, run: int, end: int, after: int) -> tuple[int, int]:
    """(where a short URL whose host ends at ``end`` starts, where its host starts), given the run
    of host characters ``body[run:end]``; (-1, -1) when none can, or when it would start before
    ``after`` (text an earlier match took). A host starts with a letter or digit and holds no "..":
    in a run with one, it starts right after the last (after an ellipsis, with no scheme);
    otherwise at the run, where the URL starts at its scheme, or at the host when it begins a word."""
    dots = body.rfind("..", run, end)
    host = run if dots < 0 else dots + 2
    if host == end or body[host] in ".-":
        return -1, -1
    start = host
    if dots < 0:
        start = _scheme_start(body, host)
        if start < 0 and (host == 0 or body[host - 1] not in "/@"):  # (it is no host character)
            start = host
    return (start, host) if start >= after else (-1, -1)


def _link_growth(body: str) -> int:
    """How many characters rewriting could add to ``body`` at most: one per 6-character id."""
    return sum(len(m.group(1)) == 6 for m in LINK_ID_CANDIDATE_RE.finditer(body))


def short_urls(body: str, wanted: Collection[str]) -> Iterator[tuple[int, int, str, str]]:
    """(start, position of the "/" before the link id, host[:port], link id) of each match of
    SHORT_URL_RE in ``body`` whose link id is in ``wanted``, in order.

    Found from the link id back: a match ends at a "/" and six letters or digits (a candidate),
    and what precedes that "/" decides where it starts: the run of host characters before it (or
    before a ":port"), preceded by a scheme or by no "/" or "@". As in the pattern's left-to-right
    scan, a match may not start in text an earlier match took (a link id can be the start of a
    scheme glued to it: ``/Ab3kX9https://...``)."""
    if len(wanted) <= FEW_LINKS:
        if not any(link_id in body for link_id in wanted):
            return  # (most bodies name one link of a few)
    elif not any(m.group(1) in wanted for m in LINK_ID_CANDIDATE_RE.finditer(body)):
        # A batch naming many links (a link per recipient): a look per link in every body would
        # cost links x length (a second for 1000 bodies of 4800 characters).
        return
    if body.count("/") > MANY_SLASHES:
        # Many candidates (each costs a few microseconds here): the pattern's own scan is cheaper.
        for match in SHORT_URL_RE.finditer(body):
            if match.group(3) in wanted:
                yield match.start(), match.start(3) - 1, match.group(2), match.group(3)
        return
    taken = 0  # where the last match, of any link id, ended
    for candidate in LINK_ID_CANDIDATE_RE.finditer(body):
        slash = candidate.start()
        digits = _run_start(body, slash, string.digits)
        if 0 < digits < slash and body[digits - 1] == ":":
            # host:port/ - the host is in the run of host characters before the colon
            start, host_start = _url_start(body, _run_start(body, digits - 1, _HOST_CHARS), digits - 1, taken)
            if start < 0 and digits >= taken:
                # No URL starts before the colon: the port's digits are the host (a ":" before a
                # host is no obstacle).
                host_start = start = digits
        else:
            start, host_start = _url_start(body, _run_start(body, slash, _HOST_CHARS), slash, taken)
        if start >= 0:
            taken = candidate.end()
            if candidate.group(1) in wanted:
                yield start, slash, body[host_start:slash], candidate.group(1)


# ``{{sendId}}`` in a body, as the destination's macros are read (shared.macros): any case, blanks inside the braces
# (any Unicode blank, as ``\s`` in shared.macros.MACRO_RE), the letters ASCII only (no IGNORECASE, which takes "ı").
SEND_ID_RE = re.compile(r"\{\{\s*[sS][eE][nN][dD][iI][dD]\s*\}\}")
MAX_BODY_CHARS = 10_000
INSERT_ATTEMPTS = 3
_T = TypeVar("_T")


@dataclass
class SendRecord:
    index: int
    to: str
    list_id: int | None
    list_number: str | None
    body: str
    offer_ref: str | None
    creative_id: str | None
    schedule_id: str | None
    sent_at: datetime | None = None
    message_id: str | None = None
    # Filled in by the batch:
    generated_id: bool = False
    list_row: Any = None
    offer_id: str | None = None
    final_body: str = ""
    codes: list[tuple[str, str, str]] = field(default_factory=list)  # (host, code, link_id)


def _text(record: dict[str, Any], name: str, max_len: int | None = 200) -> str | None:
    """``max_len=None``: a reference looked up, never stored (an offer_id longer than any offer's
    id is an unknown offer: offer_not_found)."""
    value = record.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise validation(f"{name} must be a string")
    text = str(value).strip()
    if max_len is not None and len(text) > max_len:
        raise validation(f"{name} is too long")
    return text or None


def parse_send(index: int, record: Any, *, body_required: bool = True) -> SendRecord:
    """Check one record on its own (no database). Raises ApiError with the spec's code."""
    refuse_unstorable(record)
    if not isinstance(record, dict):
        raise validation("each message must be a JSON object")
    to_raw = record.get("to")
    if to_raw is None or to_raw == "":
        raise bad_request("invalid_phone", "Recipient phone number 'to' is required")
    try:
        to = parse_e164(to_raw)
    except PhoneError:
        raise bad_request("invalid_phone", "Invalid recipient phone number format") from None
    list_id: int | None = None
    list_number: str | None = None
    # A blank value is no value, as for /links: {"list_id": "", "list_number": "+1..."} picks by number.
    raw_list_id, raw_number = (
        None if isinstance(raw, str) and not raw.strip() else raw for raw in (record.get("list_id"), record.get("list_number"))
    )
    if raw_list_id is not None:
        list_id = ids.given_list_id(raw_list_id, "list_id")
        if list_id is None:
            raise not_found("list_not_found", "The sending list was not found")
    elif raw_number is not None:
        try:
            list_number = parse_e164(raw_number)
        except PhoneError:
            raise bad_request("invalid_phone", "list_number must be an E.164 phone number") from None
    else:
        raise bad_request("missing_list_identifier", "Provide list_number or list_id")
    body = record.get("body")
    if body is None and not body_required:
        body = ""
    if not isinstance(body, str) or (body_required and not body.strip()):
        raise validation("body is required and must be a non-empty string")
    if len(body) > MAX_BODY_CHARS:
        raise validation(f"body may be at most {MAX_BODY_CHARS} characters")
    if len(body) + body.count("/") > MAX_BODY_CHARS and len(body) + _link_growth(body) > MAX_BODY_CHARS:
        # The body as sent, once rewritten: each short link's 6-character id becomes a 7-character
        # code. (At most: a path of six letters that is no link of the account counts too.)
        raise validation(f"body may be at most {MAX_BODY_CHARS} characters once its short links are rewritten"
                         " (each takes one more character)")
    return SendRecord(
        index=index,
        to=to,
        list_id=list_id,
        list_number=list_number,
        body=body,
        offer_ref=_text(record, "offer_id", max_len=None),
        creative_id=_text(record, "creative_id"),
        schedule_id=_text(record, "schedule_id"),
    )


@dataclass
class Resolved:
    good: list[SendRecord]
    failed: list[tuple[SendRecord, ApiError]]
    links: dict[str, asyncpg.Record]  # the account's short links named in the bodies, by id (and by per-message code)


async def resolve(
    conn: asyncpg.Connection, account_id: int, records: list[SendRecord], *, past: bool = False
) -> Resolved:
    """Look up lists, offers and short links for the whole batch; split into good and failed.
    ``past``: the records say what happened before (/history/sends), so a list inactive now and an
    offer deleted since are theirs all the same, as for the clicks and revenue of history imports."""
    by_id, by_phone = await find_lists(
        conn, account_id,
        ids=[r.list_id for r in records if r.list_id is not None],
        phones=[r.list_number for r in records if r.list_number],
    )
    offers = await find_offers(conn, account_id, [r.offer_ref for r in records if r.offer_ref], include_deleted=past)
    candidates = {m.group(1) for r in records for m in LINK_ID_CANDIDATE_RE.finditer(r.body)}
    links: dict[str, asyncpg.Record] = {}
    link_ids = sorted(c for c in candidates if len(c) == 6)
    if link_ids:
        rows = await conn.fetch(
            "SELECT id, domain_host, offer_id FROM links WHERE account_id = $1 AND id = ANY($2::text[])",
            account_id, link_ids,
        )
        links = {r["id"]: r for r in rows}
    codes = sorted(c for c in candidates if len(c) == 7)
    if codes:
        # A message's own URL pasted into this body (a test sent to oneself, a body read back):
        # it stands for its link, and gets this message's code like the link's URL would.
        for r in await conn.fetch(
            "SELECT ml.code, l.id, l.domain_host, l.offer_id FROM message_links ml JOIN links l ON l.id = ml.link_id"
            " WHERE ml.code = ANY($2::text[]) AND l.account_id = $1",
            account_id, codes,
        ):
            links[r["code"]] = r
            links.setdefault(r["id"], r)
    good: list[SendRecord] = []
    failed: list[tuple[SendRecord, ApiError]] = []
    for record in records:
        lst = by_id.get(record.list_id) if record.list_id is not None else by_phone.get(record.list_number or "")
        if lst is None or (lst["status"] != "active" and not past):
            failed.append((record, not_found("list_not_found", "The sending list was not found or is not active")))
            continue
        if record.offer_ref is not None:
            offer = offers.get(record.offer_ref)
            if offer is None:
                failed.append((record, not_found("offer_not_found", "No offer matches offer_id")))
                continue
            record.offer_id = offer["id"]
        record.list_row = lst
        good.append(record)
    return Resolved(good, failed, links)


@dataclass(frozen=True)
class _Cut:
    """A body cut where its short links go: ``pieces`` are literal text, or ``k`` for the code of
    ``links[k]`` (the account's short links in order of first appearance; a link that occurs
    twice gets one code per message)."""

    pieces: tuple[str | int, ...]
    links: tuple[str, ...]
    first_offer: str | None


def _cut(body: str, links: dict[str, asyncpg.Record]) -> _Cut:
    order: dict[str, int] = {}
    first_offer: str | None = None
    pieces: list[str | int] = []
    pos = 0
    for _, slash, host, found in short_urls(body, links):
        link = links[found]  # (a per-message code's row is its link's)
        if link["domain_host"] != host_of(host):
            continue
        first_offer = first_offer or link["offer_id"]
        pieces += [body[pos : slash + 1], order.setdefault(link["id"], len(order))]
        pos = slash + 1 + len(found)
    pieces.append(body[pos:])
    return _Cut(tuple(pieces), tuple(order), first_offer)


def cut_bodies(bodies: Iterable[str], links: dict[str, asyncpg.Record]) -> dict[str, _Cut]:
    """The cut of each distinct body, by body: a bulk send often repeats one body (a promotion
    sent to a whole list), cut once and then only filled; a retry refills the same cuts."""
    return {body: _cut(body, links) for body in dict.fromkeys(bodies)}


def _fill(record: SendRecord, links: dict[str, asyncpg.Record], cut: _Cut, codes: list[str]) -> None:
    """Give each short link of the account in the body its own per-message code (``codes``, one
    per link of ``cut``), and put the message id in place of ``{{sendId}}``."""
    record.codes = [(links[link_id]["domain_host"], codes[k], link_id) for k, link_id in enumerate(cut.links)]
    body = record.body
    if codes:
        body = "".join([piece if type(piece) is str else codes[piece] for piece in cut.pieces])  # type: ignore[index]
    record.final_body = SEND_ID_RE.sub(record.message_id or "", body) if "{{" in body else body
    if record.offer_id is None:
        record.offer_id = cut.first_offer


async def insert_messages(
    conn: asyncpg.Connection,
    redis: Any,
    account_id: int,
    records: list[SendRecord],
    links: dict[str, asyncpg.Record],
    *,
    source: str = "api",
    code_days: int = 0,
    also: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
) -> None:
    """Insert the batch in one transaction (retrying fresh ids on the rare collision); ``also``,
    if given, runs in that transaction once the rows are in (their ids final), before the codes
    are published.

    Per-message short codes are published to Redis after the rows are in and before the commit:
    a message whose send was acknowledged has working links, and a code (or message id) that
    collides with a stored one fails on its primary key before anything is published, so it can
    never overwrite another message's code at the edge.

    The contacts statement goes first and runs in PostgreSQL while this process cuts and fills
    the bodies (see ``_overlapped``): the two took about as long each, one after the other.
    """
    now = utcnow()
    cuts: dict[str, _Cut] | None = None
    contacts_raced = False
    for attempt in range(INSERT_ATTEMPTS):

        def prepare() -> list[tuple[str, str, MessageCodeEntry, datetime]]:
            nonlocal cuts
            if cuts is None:
                cuts = cut_bodies([r.body for r in records], links)
            return fill_batch(records, links, cuts, now, redraw=attempt > 0)

        try:
            async with conn.transaction():
                entries = await _overlapped(_insert_contacts(conn, account_id, records, raced=contacts_raced), prepare)
                await _insert(conn, account_id, records, now, source)
                if also is not None:
                    await also(conn)
                await publish_message_codes(redis, entries, days=code_days)
            return
        except asyncpg.UniqueViolationError as exc:
            if attempt == INSERT_ATTEMPTS - 1 or exc.constraint_name not in (
                "messages_pkey", "message_links_pkey", "contacts_pkey"
            ):
                raise
            # A concurrent send added one of these contacts first: again, skipping known contacts.
            contacts_raced = contacts_raced or exc.constraint_name == "contacts_pkey"
    raise AssertionError("unreachable")


def fill_batch(
    records: list[SendRecord], links: dict[str, asyncpg.Record], cuts: dict[str, _Cut], now: datetime, *, redraw: bool
) -> list[tuple[str, str, MessageCodeEntry, datetime]]:
    """Give each record its id (a fresh one where it has none, or ``redraw``n where the last was
    drawn here) and its body filled with codes of its own, and return the edge entries of those
    codes: (host, code, entry, send time)."""
    fresh = iter(ids.message_ids(len(records)))
    codes = ids.message_link_codes(sum(len(cuts[r.body].links) for r in records))
    used = 0
    for record in records:
        if record.message_id is None or (redraw and record.generated_id):
            record.message_id = next(fresh)
            record.generated_id = True
        cut = cuts[record.body]
        _fill(record, links, cut, codes[used : used + len(cut.links)])
        used += len(cut.links)
    return [
        (host, code, message_code_entry(link_id, r.message_id or "", r.creative_id), r.sent_at or now)
        for r in records
        for host, code, link_id in r.codes
    ]


async def _overlapped(statement: Awaitable[Any], work: Callable[[], _T]) -> _T:
    """Run ``work()`` (CPU in this process) while PostgreSQL runs ``statement`` on its own core,
    and return what ``work`` returned once both are done. The statement is given one turn of the
    event loop first, in which asyncpg puts it on the wire (a cached prepared statement is sent at
    once; a first use waits for its Parse there, and overlaps nothing). If ``work`` fails, its
    error is raised once the statement has finished: the connection is never handed back (or
    rolled back) with a statement in flight."""
    task = asyncio.ensure_future(statement)
    try:
        await asyncio.sleep(0)
        result = work()
    except BaseException:
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # (retrieved: the error raised is work's)
        raise
    await task
    return result


async def _insert_contacts(
    conn: asyncpg.Connection, account_id: int, records: list[SendRecord], *, raced: bool
) -> None:
    # The contacts a send reaches for the first time (a list's contact_count counts them). What a
    # contact received is read from messages, so a repeat contact costs an index probe, no write.
    # The probe is a LATERAL subquery with a LIMIT (never flattened into a join): as a NOT EXISTS
    # anti-join, the planner hashed every contact of every account for each send until the table
    # held a few hundred thousand. Without ON CONFLICT (its speculative insertion costs a third
    # more per new contact): a contact that a concurrent send inserted after this statement's
    # snapshot fails the transaction on contacts_pkey, and insert_messages goes again with ON
    # CONFLICT DO NOTHING (``raced``).
    await conn.execute(_contacts_sql(raced), account_id, [r.list_row["id"] for r in records], [r.to for r in records])


def _contacts_sql(raced: bool, returning: str = "") -> str:
    return (
        "INSERT INTO contacts (account_id, list_id, phone_number)"
        " SELECT DISTINCT $1::bigint, t.list_id, t.phone FROM unnest($2::bigint[], $3::text[]) AS t(list_id, phone)"
        " LEFT JOIN LATERAL (SELECT true AS known FROM contacts c"
        "                    WHERE c.list_id = t.list_id AND c.phone_number = t.phone LIMIT 1) k ON true"
        " WHERE k.known IS NULL"
        " ORDER BY 2, 3"
        + (" ON CONFLICT (list_id, phone_number) DO NOTHING" if raced else "")
        + returning
    )


async def insert_new_contacts(
    conn: asyncpg.Connection, account_id: int, records: list[SendRecord]
) -> set[tuple[int, str]]:
    """The records' contacts that are new, all in one statement (in key order, as a batch inserts
    them), known ones and ones a concurrent send added skipped: the (list id, number) inserted."""
    rows = await conn.fetch(_contacts_sql(True, " RETURNING list_id, phone_number"),
                            account_id, [r.list_row["id"] for r in records], [r.to for r in records])
    return {(r["list_id"], r["phone_number"]) for r in rows}


async def delete_contacts(conn: asyncpg.Connection, contacts: set[tuple[int, str]]) -> None:
    """Delete these contacts (ones this transaction inserted and no message of it reached)."""
    if contacts:
        await conn.execute(
            "DELETE FROM contacts c USING unnest($1::bigint[], $2::text[]) AS t(list_id, phone)"
            " WHERE c.list_id = t.list_id AND c.phone_number = t.phone",
            [list_id for list_id, _ in contacts], [phone for _, phone in contacts],
        )


async def _insert(
    conn: asyncpg.Connection, account_id: int, records: list[SendRecord], now: datetime, source: str
) -> None:
    # COPY for the plain inserts (fresh ids; a collision aborts the transaction and is retried).
    await conn.copy_records_to_table(
        "messages",
        columns=("id", "account_id", "list_id", "to_phone", "body", "offer_id", "creative_id", "schedule_id", "sent_at", "source"),
        records=[
            (r.message_id, account_id, r.list_row["id"], r.to, r.final_body, r.offer_id, r.creative_id, r.schedule_id,
             r.sent_at or now, source)
            for r in records
        ],
    )
    codes = [(code, r.message_id, link_id) for r in records for _, code, link_id in r.codes]
    if codes:
        await conn.copy_records_to_table("message_links", columns=("code", "message_id", "link_id"), records=codes)
