"""GET|POST /postback/{postback_token}: affiliate networks report conversions here.

The raw postback is stored before anything else, then handed to the worker. Networks retry on
any non-2xx, so once a postback is stored the answer is 200 whatever happens next: if the job
cannot be enqueued, the worker's sweeper finds the stored row and enqueues it later. While
PostgreSQL cannot store it (down, full, read-only, or no answer within POSTBACK_DB_BUDGET), it is
stored in Redis's postback spool, answered 200 all the same, and stored by the worker later
(``shared.postback_store``). Only with both down is the answer 503.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from redis.exceptions import RedisError
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.routing import Route

from services.gateway.health import settled
from services.gateway.http import JSONResponse, read_body
from shared import jsonio
from shared.accounts import hash_secret
from shared.db import POSTGRES_UNAVAILABLE
from shared.errors import ApiError, unavailable
from shared.jobs import PROCESS_POSTBACK, window_job
from shared.logs import Throttled
from shared.postback_fields import normalise
from shared.postback_store import (
    ACCOUNT_OF_TOKEN, KNOWN_TOKEN_SECONDS, SpoolFull, known_token_key, spool, spool_entry, store,
)
from shared.timeutil import utcnow

log = logging.getLogger("trackly.gateway.postbacks")
# Redis down under a storm of postbacks: one line every 10 s, not one per postback.
_report_enqueue_failure = Throttled(log, logging.WARNING, "could not enqueue postback %s (the latest); the sweeper will")
_report_spool_full = Throttled(log, logging.ERROR, "postback refused (503): %s")
_report_spooled = Throttled(log, logging.WARNING, "postgresql unavailable (%s): postbacks spooled in redis for the worker")

# Where a JSON body that is not a JSON object is kept, as text, among the params.
BODY_PARAM = "_body"
_BODY_ERROR = "body: not a JSON object"
_NO_FIELDS = "body: neither a form nor a JSON object, and no fields in the query: nothing to record as a conversion"
TOKEN_TTL = 30.0  # seconds a token -> account mapping is trusted without asking PostgreSQL
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,200}")  # what ids.postback_token mints (url-safe base64)
# Deeper JSON bodies are kept as text: the params are walked recursively, and stored as jsonb.
MAX_BODY_DEPTH = 32
# Fields of a form body, as the multipart parser allows (a network sends a few dozen at most).
MAX_FORM_FIELDS = 1000
ENQUEUE_TIMEOUT = 2.0
# How long a postback may wait on PostgreSQL (its token's account, then its store) before it is
# spooled instead: a network gives up on an answer after 10-30 s, and a PostgreSQL that hangs (a
# partition, a failover in progress) holds statements up to the pool's 60 s command timeout.
POSTBACK_DB_BUDGET = 10.0
# After PostgreSQL failed a postback, the next ones go to the spool without asking it for this
# long; then one asks, and the rest keep spooling until it has its answer. Otherwise each one waits
# for its own failure: a refused connect is quick, but a host gone (no reset) or a frozen server
# takes the whole budget, and a server coming back would take the reconnects of all of them at once.
POSTGRES_PAUSE = 1.0
T = TypeVar("T")


class Breaker:
    """Whether a postback asks PostgreSQL (``ask``), given how the last ones fared (``fared``)."""

    def __init__(self) -> None:
        self.failed_until = 0.0  # loop time until which none asks
        self.asking = False  # one asks after a pause; the others keep spooling meanwhile

    def ask(self, now: float) -> bool:
        if not self.failed_until:
            return True
        if now < self.failed_until or self.asking:
            return False
        self.asking = True
        return True

    def fared(self, now: float, ok: bool) -> None:
        self.asking = False
        self.failed_until = 0.0 if ok else now + POSTGRES_PAUSE

    def unasked(self) -> None:
        """The one let ask did not get PostgreSQL's answer after all (cancelled while waiting: its
        client gone, the gateway stopping): the next one asks, and the pause stands."""
        self.asking = False


def _cached_account(request: Request, token: str) -> int | None:
    """The token's account as this gateway looked it up within TOKEN_TTL, else None."""
    hit = request.app.state.postback_tokens.get(token)
    return hit[0] if hit is not None and hit[1] > time.monotonic() else None


async def _account_for(request: Request, token: str) -> int:
    """The token's account, asked of PostgreSQL and remembered (401 for an unknown token);
    PostgreSQL's errors when it cannot say."""
    digest = hash_secret(token)
    account_id = await request.app.state.db.fetchval(ACCOUNT_OF_TOKEN, digest, utcnow())
    if account_id is None:
        raise ApiError(401, "unauthorized", "Unknown postback token")
    cache: dict[str, tuple[int, float]] = request.app.state.postback_tokens
    if len(cache) > 10_000:
        cache.clear()
    cache[token] = (account_id, time.monotonic() + TOKEN_TTL)
    try:  # (for the spool: a token known lately, should PostgreSQL be unavailable)
        await request.app.state.redis.set(known_token_key(digest), account_id, ex=KNOWN_TOKEN_SECONDS)
    except (RedisError, OSError):
        pass
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


async def _postgres(work: Awaitable[T], budget: float) -> T | BaseException:
    """What ``work`` returned, or the POSTGRES_UNAVAILABLE error it raised (a TimeoutError when it
    took longer than ``budget``: it is then cancelled in the background, not waited for, since
    asyncpg's cancel of a statement waits on a PostgreSQL that answers nothing). Any other error
    is raised."""
    task = await settled(work, budget)
    if task is None:
        return TimeoutError(f"no answer from PostgreSQL within {budget:.1f} s")
    exc = task.exception()
    if exc is None:
        return task.result()
    if isinstance(exc, POSTGRES_UNAVAILABLE):
        return exc
    raise exc


async def _ask(breaker: Breaker, work: Callable[[], Awaitable[T]], budget: float) -> T | BaseException | None:
    """What ``work`` answered (as ``_postgres``) if the breaker lets it ask PostgreSQL now, the
    breaker told how it fared; None, ``work`` not run, if not. The one turn after a pause is held
    for PostgreSQL's time only: held while the postback's body arrived, a client that stalled kept
    every other postback from asking a PostgreSQL that was back (all spooled, and a token no
    gateway had seen lately refused), for as long as it pleased."""
    loop = asyncio.get_running_loop()
    if not breaker.ask(loop.time()):
        return None
    answered = failed = False
    try:
        result = await _postgres(work(), budget)
        answered, failed = True, isinstance(result, BaseException)
        return result
    except Exception:  # PostgreSQL's answer all the same (a 401, say)
        answered = True
        raise
    finally:
        if answered:
            breaker.fared(loop.time(), ok=not failed)
        else:  # cancelled before its answer
            breaker.unasked()


async def receive(request: Request) -> JSONResponse:
    token = request.path_params["postback_token"]
    if not _TOKEN_RE.fullmatch(token):  # not one we mint (a NUL would not even reach the query)
        raise ApiError(401, "unauthorized", "Unknown postback token")
    breaker: Breaker = request.app.state.postgres_for_postbacks
    loop = asyncio.get_running_loop()
    started = loop.time()
    failure: BaseException | None = None
    # Its account (401 for an unknown token); when PostgreSQL cannot say, or is not asked, the
    # postback is spooled below (by its token's digest, if its account is not known here), and
    # the worker looks the account up.
    account = _cached_account(request, token)
    if account is None:
        found = await _ask(breaker, lambda: _account_for(request, token), POSTBACK_DB_BUDGET)
        if isinstance(found, BaseException):
            failure = found
        else:
            account = found
    budget = POSTBACK_DB_BUDGET - (loop.time() - started)  # (reading the body, below, is not PostgreSQL's time)
    if request.method == "HEAD":  # a link checker, not a network: nothing to store
        return JSONResponse({"success": True, "status": "accepted"})
    params, body_error = await _params(request)
    params = jsonio.storable(params)  # a network sending what PostgreSQL cannot hold still gets its 200
    received_at = utcnow()
    pb = normalise(params, received_at, body_error)
    stored = None
    if failure is None and account is not None:
        db, method, account_id = request.app.state.db, request.method, account
        result = await _ask(breaker, lambda: store(db, account_id, received_at, method, params, pb), budget)
        if isinstance(result, BaseException):
            failure = result
        else:
            stored = result
    if stored is None:
        # Stored in Redis instead, for the worker to store once PostgreSQL is back (Redis down
        # too: 503, and the network retries). A store left running in the background that
        # commits after all makes the spooled copy a repeat of it: the same conversion key.
        redis = request.app.state.redis
        digest = hash_secret(token)
        if account is None and not await redis.exists(known_token_key(digest)):
            raise unavailable()
        entry = spool_entry(account_id=account, token_digest=digest if account is None else None,
                            received_at=received_at, method=request.method, params=params, body_error=body_error,
                            conversion_key=pb.conversion_key)
        try:
            await spool(redis, entry)
        except SpoolFull as exc:
            _report_spool_full(str(exc))
            raise unavailable() from None
        _report_spooled("not asked: it failed a moment ago" if failure is None else f"{type(failure).__name__}: {failure}")
        return JSONResponse({"success": True, "status": "accepted"})
    if stored.duplicate:
        return JSONResponse({"success": True, "status": "duplicate"})
    if stored.processable:
        postback_id = stored.postback_id
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
