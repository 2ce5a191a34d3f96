"""GET|POST /postback/{postback_token}: affiliate networks report conversions here.

The raw postback is stored before anything else, then handed to the worker. Networks retry on
any non-2xx, so once a postback is stored the answer is 200 whatever happens next: if the job
cannot be enqueued, the worker's sweeper finds the stored row and enqueues it later.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.routing import Route

from services.gateway.http import JSONResponse, read_body
from shared import jsonio
from shared.accounts import hash_secret
from shared.errors import ApiError
from shared.jobs import PROCESS_POSTBACK, window_job
from shared.logs import Throttled
from shared.postback_fields import normalise
from shared.timeutil import utcnow

log = logging.getLogger("trackly.gateway.postbacks")
# Redis down under a storm of postbacks: one line every 10 s, not one per postback.
_report_enqueue_failure = Throttled(log, logging.WARNING, "could not enqueue postback %s (the latest); the sweeper will")

# Where a JSON body that is not a JSON object is kept, as text, among the params.
BODY_PARAM = "_body"
_BODY_ERROR = "body: not a JSON object"
_NO_FIELDS = "body: neither a form nor a JSON object, and no fields in the query: nothing to record as a conversion"
# The current token, or the one it replaced while its grace period lasts (accounts.rotate_postback_token),
# by their digests (only those are stored).
_ACCOUNT_OF_TOKEN = """
SELECT id FROM accounts WHERE postback_token_hash = $1
UNION ALL
SELECT id FROM accounts WHERE previous_postback_token_hash = $1 AND previous_postback_token_until > now()
LIMIT 1
"""
TOKEN_TTL = 30.0  # seconds a token -> account mapping is trusted without asking PostgreSQL
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,200}")  # what ids.postback_token mints (url-safe base64)
# Deeper JSON bodies are kept as text: the params are walked recursively, and stored as jsonb.
MAX_BODY_DEPTH = 32
# Fields of a form body, as the multipart parser allows (a network sends a few dozen at most).
MAX_FORM_FIELDS = 1000
ENQUEUE_TIMEOUT = 2.0

_INSERT = """
INSERT INTO postbacks (account_id, received_at, method, params, network, conversion_key, click_id, status,
                       payout, currency, offer_ref, converted_at, parse_error, dedupe_key, is_duplicate, processed_at,
                       process_error)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
ON CONFLICT (account_id, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
RETURNING id
"""

# The latest accepted postback of a conversion: a repeat of it is a duplicate.
_LATEST = """
SELECT id, status, payout, click_id, currency FROM postbacks
WHERE account_id = $1 AND network = $2 AND conversion_key = $3 AND dedupe_key IS NOT NULL
ORDER BY id DESC LIMIT 1
"""


async def _account_for(request: Request, token: str) -> int:
    if not _TOKEN_RE.fullmatch(token):  # not one we mint (a NUL would not even reach the query)
        raise ApiError(401, "unauthorized", "Unknown postback token")
    cache: dict[str, tuple[int, float]] | None = getattr(request.app.state, "postback_tokens", None)
    if cache is None:
        cache = request.app.state.postback_tokens = {}
    now = time.monotonic()
    hit = cache.get(token)
    if hit is not None and hit[1] > now:
        return hit[0]
    account_id = await request.app.state.db.fetchval(_ACCOUNT_OF_TOKEN, hash_secret(token))
    if account_id is None:
        raise ApiError(401, "unauthorized", "Unknown postback token")
    if len(cache) > 10_000:
        cache.clear()
    cache[token] = (account_id, now + TOKEN_TTL)
    return account_id


def _multi(items: list[tuple[str, str]], into: dict[str, Any]) -> None:
    """Keep every value as sent: a repeated field becomes a list, in order (appended to in place:
    copying it for each repeat took time quadratic in the repeats)."""
    for key, value in items:
        current = into.get(key)
        if current is None:
            into[key] = value
        elif isinstance(current, list):
            current.append(value)
        else:
            into[key] = [current, value]


async def _params(request: Request) -> tuple[dict[str, Any], str | None]:
    """The fields sent (query, then a form or JSON object body, whatever its declared type), and
    what was wrong with the body, if anything."""
    params: dict[str, Any] = {}
    _multi(list(request.query_params.multi_items()), params)
    if request.method != "POST":
        return params, None
    raw = await read_body(request)  # whatever the type, within the 5 MB limit
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("application/x-www-form-urlencoded") and not _json_object(raw):
        # Parsed here, not by Starlette's form parser: that one has no overall limit (a thousand
        # 1 MB fields), and refuses with a 400 a body it cannot read, which would lose the
        # postback's query fields too.
        try:
            fields = parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True, errors="replace",
                               max_num_fields=MAX_FORM_FIELDS)
        except ValueError:  # more fields than that
            return _kept_as_sent(params, raw, f"body: more than {MAX_FORM_FIELDS} form fields")
        _multi(fields, params)
    elif content_type.startswith("multipart/form-data"):
        try:
            form = await MultiPartParser(request.headers, _chunks(raw)).parse()
        except MultiPartException as exc:  # no boundary, a part over 1 MB, over 1000 fields, ...
            return _kept_as_sent(params, raw, f"body: not a readable multipart form ({exc.message})")
        # A part sent as a file is a field all the same (its text): dropped, its payout was lost.
        _multi([(k, v if isinstance(v, str) else (await v.read()).decode("utf-8", "replace"))
                for k, v in form.multi_items()], params)
        await form.close()
    else:
        # JSON, and any other body: networks mislabel JSON (text/plain, no type at all), and what
        # cannot be read as fields is still kept as sent (an error only where JSON was declared:
        # a network that sends its fields in the query may send anything as the body).
        try:
            data = jsonio.loads(raw)
        except jsonio.JsonError:
            data = None
        if isinstance(data, dict) and _depth(data) > MAX_BODY_DEPTH:
            return _kept_as_sent(params, raw, f"body: nested more than {MAX_BODY_DEPTH} levels deep")
        if isinstance(data, dict):
            # As for a form: a field also in the query keeps both values, the query's first (it
            # is the one read); the body's was dropped from the postback as stored.
            _multi([(str(key), value) for key, value in data.items()], params)
        elif raw.strip():
            error = _BODY_ERROR if content_type.startswith("application/json") else None
            if error is None and not params:  # kept under _body, which is ours: nothing was sent to record
                error = _NO_FIELDS
            return _kept_as_sent(params, raw, error)
    return params, None


def _kept_as_sent(params: dict[str, Any], raw: bytes, error: str | None) -> tuple[dict[str, Any], str | None]:
    """A body that could not be read as fields, kept among them as text (nothing a network sent
    is lost), and what was wrong with it."""
    params[BODY_PARAM] = raw.decode("utf-8", "replace")
    return params, error


def _json_object(raw: bytes) -> bool:
    """A JSON object sent with a form's type (`curl -d '{...}'`, PHP's curl given a string): read
    as JSON, as a JSON body of any other type is. (Read as a form it was one field named by the
    whole text, and the postback's fields were lost.)"""
    if raw.lstrip()[:1] != b"{":
        return False
    try:
        return isinstance(jsonio.loads(raw), dict)
    except jsonio.JsonError:
        return False


async def _chunks(raw: bytes) -> AsyncIterator[bytes]:
    yield raw


def _depth(value: Any) -> int:
    """How deeply a decoded JSON value nests (without recursion: it may nest a thousand deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


async def receive(request: Request) -> JSONResponse:
    account_id = await _account_for(request, request.path_params["postback_token"])
    if request.method == "HEAD":  # a link checker, not a network: nothing to store
        return JSONResponse({"success": True, "status": "accepted"})
    params, body_error = await _params(request)
    params = jsonio.storable(params)  # a network sending what PostgreSQL cannot hold still gets its 200
    received_at = utcnow()
    pb = normalise(params, received_at, body_error)
    unparseable = pb.parse_error is not None
    db = request.app.state.db
    values = [
        # Numbers in a JSON body are Decimals: stored as the exact JSON numbers that were sent.
        account_id, received_at, request.method, orjson.Fragment(jsonio.dumps(params)), pb.network, pb.conversion_key, pb.click_id, pb.status,
        pb.payout, pb.currency, pb.offer_ref, pb.converted_at, pb.parse_error,
    ]
    # An unparseable postback is kept for the operator and never processed.
    closed = [received_at, "unparseable"] if unparseable else [None, None]
    postback_id = None
    if unparseable:
        postback_id = await db.fetchval(_INSERT, *values, None, False, *closed)
    else:
        latest = await db.fetchrow(_LATEST, account_id, pb.network, pb.conversion_key)
        if latest is None or not pb.repeats(latest["status"], latest["payout"], latest["click_id"], latest["currency"]):
            postback_id = await db.fetchval(_INSERT, *values, pb.dedupe_key(latest["id"] if latest else 0), False, *closed)
    if postback_id is None:
        await db.execute(_INSERT, *values, None, True, received_at, None)
        return JSONResponse({"success": True, "status": "duplicate"})
    if not unparseable:
        job_id, run_at = window_job(time.time())  # after the commit: the window's job will see it
        state = request.app.state
        # Once this process has enqueued the window's job, the window's other postbacks are that
        # job's too (it runs when the window closes and takes every waiting postback): asking arq
        # again (three round trips to find the job exists) is what a storm of postbacks spent its
        # time on.
        if state.window_job != job_id:
            try:
                await asyncio.wait_for(
                    state.arq.enqueue_job(PROCESS_POSTBACK, postback_id, _job_id=job_id, _defer_until=run_at),
                    ENQUEUE_TIMEOUT,
                )
                state.window_job = job_id
            except Exception:  # stored is what counts; the worker's sweeper enqueues it later
                _report_enqueue_failure(postback_id, exc_info=True)
            except asyncio.CancelledError:
                # The gateway is stopping and its graceful shutdown ran out (uvicorn cancels what
                # still runs, and would answer 500): stored all the same, so answered as stored.
                _report_enqueue_failure(postback_id)
    return JSONResponse({"success": True, "status": "accepted"})


ROUTES = [Route("/postback/{postback_token}", receive, methods=["GET", "POST"])]
