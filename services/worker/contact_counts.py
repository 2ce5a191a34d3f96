"""Folds each list's contact count deltas into one row (see migration 0010_list_contact_counts).

Every statement that adds contacts to a list appends a row to ``list_contact_counts``; a list's
count is the sum of its rows. Left alone, a busy list gathers a row per send and per click batch
that reached a new contact, and its count costs a scan of them all. Every ``COMPACT_INTERVAL``
seconds the worker replaces a list's rows with their sum, in one statement: rows written after
the statement's snapshot are neither deleted nor summed, and two workers folding at once each
sum only the rows they deleted, so no contact is lost or counted twice.
"""
from __future__ import annotations

import logging
from typing import Any

import asyncpg

from shared import loops

log = logging.getLogger("trackly.worker.contact_counts")

COMPACT_INTERVAL = 60.0

_COMPACT = """
WITH folded AS (
    DELETE FROM list_contact_counts
    WHERE list_id IN (SELECT list_id FROM list_contact_counts GROUP BY list_id HAVING count(*) > 1)
    RETURNING list_id, contacts
)
INSERT INTO list_contact_counts (list_id, contacts)
SELECT list_id, sum(contacts) FROM folded GROUP BY list_id
"""


async def compact(db: asyncpg.Pool) -> int:
    """Fold every list with more than one row; returns the number of lists folded."""
    status = await db.execute(_COMPACT)
    return int(status.rsplit(" ", 1)[1])


async def run_compactor(ctx: dict[str, Any]) -> None:
    """Started by the worker: ``compact`` every ``COMPACT_INTERVAL`` seconds until cancelled."""
    await loops.repeat(
        lambda: compact(ctx["db"]), log=log, failure="folding list contact counts failed",
        pause_after_failure=COMPACT_INTERVAL, interval=COMPACT_INTERVAL,
    )
