"""Job names and payloads: the contract between the gateway (enqueuer) and the worker (arq)."""
from __future__ import annotations

from datetime import UTC, datetime

# process_postback(ctx, postback_id: int) — attribute stored raw postbacks: this one (if it is
# still waiting) and every other waiting one, a batch at a time, until none is left.
PROCESS_POSTBACK = "process_postback"

# The gateway enqueues one job per window of this many seconds, not one per postback: every
# postback stored in a window shares that window's job (arq keeps one job per id), which runs
# when the window has closed, so it finds all of them stored. A postback storm costs the queue
# ten jobs a second, not one per postback.
ATTRIBUTION_WINDOW = 0.1


def window_job(now: float) -> tuple[str, datetime]:
    """(arq job id, when it runs) of the window that holds ``now`` (unix seconds)."""
    window = int(now / ATTRIBUTION_WINDOW)
    return f"attribute:{window}", datetime.fromtimestamp((window + 1) * ATTRIBUTION_WINDOW, UTC)


def postback_job_id(postback_id: int) -> str:
    """arq job id of one postback's own job (the sweeper's): enqueuing it twice runs it once."""
    return f"postback:{postback_id}"
