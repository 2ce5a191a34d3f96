"""Logging a failure that repeats: an outage under load must not write a line per request."""
from __future__ import annotations

import logging
import time
from typing import Any


class Throttled:
    """Logs the first occurrence at once, then at most one line every ``every`` seconds, each
    saying how many occurrences it stands for (``count`` counts them all)."""

    def __init__(self, logger: logging.Logger, level: int, message: str, *, every: float = 10.0) -> None:
        self._logger = logger
        self._level = level
        self._message = message + " (%d times since the last report)"
        self._every = every
        self._last = float("-inf")
        self._unreported = 0
        self.count = 0

    def __call__(self, *args: Any, exc_info: Any = None, times: int = 1) -> None:
        """One occurrence (or ``times``); ``args`` fill the message, as for ``Logger.log``."""
        self.count += times
        self._unreported += times
        now = time.monotonic()
        if now - self._last >= self._every:
            self._logger.log(self._level, self._message, *args, self._unreported, exc_info=exc_info)
            self._last, self._unreported = now, 0
