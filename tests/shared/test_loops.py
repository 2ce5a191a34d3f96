"""Background loops end when cancelled, even when what they await turns the cancellation into an
error or swallows it (redis-py can: redis/redis-py#2028). Before ``shared.loops`` the worker's
click drainer did exactly that and the worker's shutdown waited for it forever."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from shared.loops import repeat, until_done

log = logging.getLogger("test.loops")


async def _stops(task: asyncio.Task[None]) -> bool:
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=2)
    return bool(done) and task.cancelled()


def swallowing_step(swallow: str, entered: asyncio.Event) -> Callable[[], Awaitable[str]]:
    """A step that turns a cancel into an error, or swallows it and returns as if the reply had
    come, as redis-py can."""

    async def step() -> str:
        entered.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if swallow == "into_error":
                raise ConnectionError("Connection closed by server.") from None
        return "reply"

    return step


@pytest.mark.parametrize("swallow", ["into_error", "silently"])
async def test_a_step_that_swallows_the_cancellation_still_stops_the_loop(swallow: str) -> None:
    entered = asyncio.Event()
    step = swallowing_step(swallow, entered)
    task = asyncio.create_task(repeat(step, log=log, failure="step failed", pause_after_failure=0.01))
    await entered.wait()
    assert await _stops(task)


async def test_failures_are_logged_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise RuntimeError("boom")
        await asyncio.sleep(10)

    task = asyncio.create_task(repeat(step, log=log, failure="step failed", pause_after_failure=0.01))
    while calls < 3:
        await asyncio.sleep(0.01)
    assert await _stops(task)
    records = [r for r in caplog.records if r.name == "test.loops"]
    assert [r.message for r in records] == ["step failed", "step failed again (RuntimeError: boom) (1 times since the last report)"]
    assert records[0].exc_info is not None and records[1].exc_info is None


async def test_an_outage_logs_its_first_failure_in_full_and_then_a_line_in_a_while(caplog: pytest.LogCaptureFixture) -> None:
    # 40 failures in a row (Redis down), a success, then a failure again: the second run of
    # failures starts with its traceback again.
    calls = 0

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls <= 40 or calls == 42:
            raise ConnectionError("Connection refused")
        if calls > 42:
            await asyncio.sleep(10)

    task = asyncio.create_task(repeat(step, log=log, failure="step failed", pause_after_failure=0.001))
    while calls < 43:
        await asyncio.sleep(0.01)
    assert await _stops(task)
    records = [r for r in caplog.records if r.name == "test.loops"]
    assert [(r.message, r.exc_info is not None) for r in records] == [
        ("step failed", True),
        ("step failed again (ConnectionError: Connection refused) (1 times since the last report)", False),
        ("step failed", True),
    ]


async def test_interval_waits_between_turns() -> None:
    times: list[float] = []

    async def step() -> None:
        times.append(asyncio.get_running_loop().time())

    task = asyncio.create_task(repeat(step, log=log, failure="x", pause_after_failure=0, interval=0.05))
    while len(times) < 3:
        await asyncio.sleep(0.01)
    assert await _stops(task)
    assert all(b - a >= 0.045 for a, b in zip(times, times[1:]))


@pytest.mark.parametrize("swallow", ["into_error", "silently"])
async def test_until_done_stops_even_when_its_step_swallows_the_cancellation(swallow: str) -> None:
    """A step that swallows the cancel and returns (as if the reply had come) must not let
    ``until_done`` return: its caller would go on as if never cancelled (the click drainer's first
    heartbeat did, and the worker's stop waited for it)."""
    entered = asyncio.Event()
    step = swallowing_step(swallow, entered)
    task = asyncio.create_task(until_done(step, log=log, failure="step failed", pause_after_failure=0.01))
    await entered.wait()
    assert await _stops(task)


async def test_until_done_retries_and_returns_what_the_step_returned(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    async def step() -> int:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise RuntimeError("boom")
        return calls

    assert await until_done(step, log=log, failure="step failed", pause_after_failure=0.001) == 3
    assert [r.message for r in caplog.records if r.name == "test.loops"] == [
        "step failed", "step failed again (RuntimeError: boom) (1 times since the last report)"]
