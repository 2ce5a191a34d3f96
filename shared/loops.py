"""Background loops that stop when they are cancelled, whatever the libraries under them do.

redis-py (5.x, asyncio) can turn a task's cancellation into another error, or swallow it, when
the cancel lands while a command waits inside its socket timeout (redis/redis-py#2028, #2551).
A loop that logs errors and goes again would then never end, and whoever awaits it (a worker's
shutdown) would wait forever. ``Task.cancelling()`` still says a cancel was asked for, so the
loop checks it on every turn and after every failure.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

from shared.logs import Throttled

T = TypeVar("T")


def cancel_requested() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class _Failures:
    """The first failure of a run of them is logged with its traceback; the ones after it (an
    outage: the same error again and again) one line at a time, at most one every ten seconds,
    each counting the failures it stands for."""

    def __init__(self, log: logging.Logger, failure: str) -> None:
        self._log = log
        self._failure = failure
        self._again = Throttled(log, logging.ERROR, failure + " again (%s)")
        self.failing = False

    def __call__(self, exc: Exception) -> None:
        if cancel_requested():
            raise asyncio.CancelledError from None
        if self.failing:
            self._again(f"{type(exc).__name__}: {exc}")
        else:
            self._log.exception(self._failure)
            self.failing = True


async def repeat(
    step: Callable[[], Awaitable[object]],
    *,
    log: logging.Logger,
    failure: str,
    pause_after_failure: float,
    interval: float = 0.0,
) -> NoReturn:
    """Await ``step()`` forever (after ``interval`` seconds each time, if given); a failure is
    logged as ``failure`` (see ``_Failures``) and only delays the next turn. Ends only by
    cancellation."""
    failures = _Failures(log, failure)
    while True:
        if cancel_requested():
            raise asyncio.CancelledError
        if interval:
            await asyncio.sleep(interval)
        try:
            await step()
            failures.failing = False
        except Exception as exc:
            failures(exc)
            await asyncio.sleep(pause_after_failure)


async def until_done(
    step: Callable[[], Awaitable[T]], *, log: logging.Logger, failure: str, pause_after_failure: float
) -> T:
    """Await ``step()`` until it succeeds once and return what it returned; a failure is logged
    as ``repeat`` logs it. Ends early only by cancellation."""
    failures = _Failures(log, failure)
    while True:
        if cancel_requested():
            raise asyncio.CancelledError
        try:
            result = await step()
        except Exception as exc:
            failures(exc)
            await asyncio.sleep(pause_after_failure)
            continue
        if cancel_requested():  # a cancel the step swallowed (redis-py can) still ends it
            raise asyncio.CancelledError
        return result
