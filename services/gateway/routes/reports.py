"""GET /reports/performance: sends, clicks, conversions and revenue by one dimension.

Every grouping sums the same events (``attribution_sql.EVENTS``), so totals agree across them.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, time, timedelta
from decimal import Context, Decimal
from typing import Any

import asyncpg
from starlette.requests import Request
from starlette.routing import Route

from services.gateway.attribution_sql import GROUP_KEYS, ROLLUP_VERSION, STRAYS_VERSION, report_page
from services.gateway.auth import authenticate
from services.gateway.http import JSONResponse, page_params
from shared.errors import ApiError, validation
from shared.timeutil import TimeError, parse_date

# A ratio to 28 significant digits, not rounded to a number of places: a client that parses it
# gets the double nearest the exact quotient. For ctr and conversion_rate (counts over counts)
# that is what its own ``clicks / sends`` computes (1/3 is 0.3333333333333333333333333333, read
# back as 1/3; ten places read back as another number); epc and revenue_per_send are the exact
# quotient of exact money, which a client dividing a binary float can miss by its last bit.
# Division to a precision has no upper bound to overflow (quantizing to ten places needed more
# than 28 digits once revenue per send passed 10^18: a 500).
_RATIO_CONTEXT = Context(prec=28)


def ratio(numerator: Decimal | int, divisor: Decimal | int) -> Decimal:
    """A plain fraction, 0 where the divisor is 0."""
    if not divisor:
        return Decimal(0)
    return _RATIO_CONTEXT.divide(Decimal(numerator), Decimal(divisor))


def metrics(row: Any) -> dict[str, Any]:
    sends, clicks, conversions, revenue = row["sends"] or 0, row["clicks"] or 0, row["conversions"] or 0, row["revenue"]
    return {
        "sends": sends,
        "clicks": clicks,
        "conversions": conversions,
        "revenue": revenue,
        "revenue_per_send": ratio(revenue, sends),
        "epc": ratio(revenue, clicks),
        "ctr": ratio(clicks, sends),
        "conversion_rate": ratio(conversions, clicks),
    }


REPORT_SLOTS = 3  # of the gateway's 10 pooled connections (app.state.report_slots)
REPORT_SLOTS_PER_ACCOUNT = 2  # so that one account's burst of reports leaves a slot to the others
REPORT_SLOT_WAIT = 10.0  # seconds a report waits for a slot, then 503 reports_busy
REPORT_TIMEOUT_MS = 30_000  # a report's statement_timeout, then 503 report_timeout


class ReportSlots:
    """At most ``total`` reports query at once in this process, at most ``per_account`` of them
    one account's; a report that gets no slot within ``wait`` seconds is refused (503 with
    Retry-After) rather than left waiting, holding its client, for as long as others run."""

    def __init__(self, total: int = REPORT_SLOTS, per_account: int = REPORT_SLOTS_PER_ACCOUNT,
                 wait: float = REPORT_SLOT_WAIT) -> None:
        self.all = asyncio.Semaphore(total)
        self._per_account = per_account
        self._wait = wait
        self._accounts: dict[int, tuple[asyncio.Semaphore, int]] = {}  # semaphore, reports holding or waiting

    @contextlib.asynccontextmanager
    async def hold(self, account_id: int) -> AsyncIterator[None]:
        own, users = self._accounts.get(account_id) or (asyncio.Semaphore(self._per_account), 0)
        self._accounts[account_id] = (own, users + 1)
        try:
            try:
                async with asyncio.timeout(self._wait):
                    await own.acquire()
                    try:
                        await self.all.acquire()
                    except BaseException:
                        own.release()
                        raise
            except TimeoutError:
                raise ApiError(503, "reports_busy", "Too many reports are running; retry shortly",
                               retry_after=5) from None
            try:
                yield
            finally:
                self.all.release()
                own.release()
        finally:
            own, users = self._accounts[account_id]
            if users == 1:
                del self._accounts[account_id]
            else:
                self._accounts[account_id] = (own, users - 1)


async def _rollup_ready(request: Request, conn: Any) -> bool:
    """Whether the report rollup is whole: its migration records itself only once its backfill has
    committed (shared/migrate.py). Until then a report sums the events; once seen, it stays."""
    state = request.app.state
    if not getattr(state, "rollup_ready", False):
        state.rollup_ready = bool(
            await conn.fetchval("SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = $1)", ROLLUP_VERSION)
        )
    return bool(state.rollup_ready)


async def _strays_ready(request: Request, conn: Any) -> bool:
    """Whether report_strays is whole (its migration, 0029, is recorded with its backfill, as the
    rollup's): until then a report by message over a range finds its strays from the events."""
    state = request.app.state
    if not getattr(state, "strays_ready", False):
        state.strays_ready = bool(
            await conn.fetchval("SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = $1)", STRAYS_VERSION)
        )
    return bool(state.strays_ready)


def _day(request: Request, name: str) -> datetime | None:
    raw = request.query_params.get(name)
    if not raw:
        return None
    try:
        return datetime.combine(parse_date(raw), time(0), UTC)
    except TimeError:
        raise validation(f"{name} must be a date, YYYY-MM-DD") from None


async def performance(request: Request) -> JSONResponse:
    account = await authenticate(request)
    group_by = request.query_params.get("group_by", "")
    if group_by not in GROUP_KEYS:
        raise validation(f"group_by must be one of: {', '.join(GROUP_KEYS)}")
    start = _day(request, "start")
    end = _day(request, "end")
    if start and end and end < start:
        raise validation("end must not be before start")
    # The last representable day has no day after it: up to then is all time.
    end_exclusive = end + timedelta(days=1) if end and end.date() < date.max else None
    page = page_params(request)
    # At most REPORT_SLOTS reports query at once: a burst of heavy reports must not take every
    # pooled connection from sends, links and postbacks (a fuzzing run saw 20 of them do it).
    async with request.app.state.report_slots.hold(account.id), request.app.state.db.acquire() as conn, \
            conn.transaction():
        # A report statement that cannot finish in REPORT_TIMEOUT_MS (a range too wide for an
        # account's size, a table locked) is cancelled in PostgreSQL and says so, rather than
        # holding its slot for the pool's 60 s and answering as if the database were down.
        # Planned for this account and range every time. asyncpg prepares each query once per
        # connection, and PostgreSQL plans a prepared statement for no values in particular (a
        # "generic" plan) from its sixth run on: for an account and a range it cannot see, the plan
        # of a report by message sorted every message of the account on disk to find one page, and
        # read all its clicks, conversions and revenue (2.4 s against 0.4 s for an account of 3M
        # messages); the rollup groupings took 2-3 times as long. A few ms of planning per report.
        # Not compiled (JIT): a report reads a page's rows and a rollup, and a plan costed above
        # jit_above_cost (a branch it never runs counts; estimates without statistics are any
        # size) spent 50-200 ms compiling: a month of a report by message at 3M messages took
        # 276 ms against 197 ms without (the rollup groupings: the same either way).
        # (The settings in one round trip.)
        await conn.execute(
            f"SET LOCAL statement_timeout = {REPORT_TIMEOUT_MS}; SET LOCAL plan_cache_mode = force_custom_plan;"
            " SET LOCAL jit = off"
        )
        query = report_page(group_by, from_events=not await _rollup_ready(request, conn),
                            all_time=start is None and end_exclusive is None,
                            strays_kept=group_by != "message" or await _strays_ready(request, conn))
        try:
            rows = await conn.fetch(query, account.id, start, end_exclusive, page.per_page, page.offset)
            # Every row carries the group count and the totals; a page past the last group has none,
            # so the first group is asked for them (no group at all: nothing happened in the range).
            carrier = rows[0] if rows else None
            if carrier is None and page.offset:
                carrier = await conn.fetchrow(query, account.id, start, end_exclusive, 1, 0)
        except asyncpg.QueryCanceledError:
            raise ApiError(503, "report_timeout", f"The report took longer than {REPORT_TIMEOUT_MS // 1000} s and was"
                           " stopped; ask for a shorter range (start, end), or retry later") from None
    totals: dict[str, Any] = {"sends": 0, "clicks": 0, "conversions": 0, "revenue": Decimal(0)}
    if carrier is not None:
        totals = {name: carrier[f"total_{name}"] for name in totals}
    total_groups = carrier["total_groups"] if carrier is not None else 0

    def key(value: str | None) -> Any:
        return int(value) if group_by == "list" and value is not None else value

    return JSONResponse(
        {
            "success": True,
            "group_by": group_by,
            "start": start.date().isoformat() if start else None,
            "end": end.date().isoformat() if end else None,
            "rows": [{"key": key(r["key"]), **metrics(r)} for r in rows],
            "totals": metrics(totals),
            "pagination": page.envelope(total_groups),
        }
    )


ROUTES = [Route("/api/v2/reports/performance", performance, methods=["GET"])]
