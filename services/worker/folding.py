"""Folds the rows that triggers append to the counting tables into one per key.

Two tables are kept by statement-level triggers that append a row per statement (and key), and
read as the sum of their rows:

* ``list_contact_counts`` (migration 0010): a list's contact count;
* ``report_rollup`` (migration 0016): the reports' sums per account, UTC day and keys.

Left alone, a busy list or day gathers a row per send and per click batch, and reading it costs
a scan of them all. Every ``FOLD_INTERVAL`` seconds the worker replaces them with their sums, each
table in one statement: rows written after the statement's snapshot are neither deleted nor
summed, and two workers folding at once each sum only the rows they deleted, so nothing is lost
or counted twice. Report keys whose events all came to nothing (a conversion attributed
elsewhere) disappear.
"""
from __future__ import annotations

import logging
from typing import Any

import asyncpg

from shared import loops

log = logging.getLogger("trackly.worker.folding")

FOLD_INTERVAL = 60.0

_CONTACT_COUNTS = """
WITH folded AS (
    DELETE FROM list_contact_counts
    WHERE list_id IN (SELECT list_id FROM list_contact_counts GROUP BY list_id HAVING count(*) > 1)
    RETURNING list_id, contacts
)
INSERT INTO list_contact_counts (list_id, contacts)
SELECT list_id, sum(contacts) FROM folded GROUP BY list_id
"""

# The days with rows the triggers wrote (not folded): all their rows, summed per key.
_REPORT_ROLLUP = """
WITH days AS (
    SELECT DISTINCT account_id, day FROM report_rollup WHERE NOT folded
),
gone AS (
    DELETE FROM report_rollup r USING days d
    WHERE r.account_id = d.account_id AND r.day = d.day
    RETURNING r.account_id, r.day, r.offer, r.creative, r.campaign, r.list, r.events, r.sends, r.clicks,
              r.conversions, r.revenue
)
INSERT INTO report_rollup (account_id, day, offer, creative, campaign, list, events, sends, clicks, conversions,
                           revenue, folded)
SELECT account_id, day, offer, creative, campaign, list, sum(events), sum(sends), sum(clicks), sum(conversions),
       sum(revenue), true
FROM gone
GROUP BY 1, 2, 3, 4, 5, 6
HAVING sum(events) <> 0 OR sum(sends) <> 0 OR sum(clicks) <> 0 OR sum(conversions) <> 0 OR sum(revenue) <> 0
"""


async def _rows_written(db: asyncpg.Pool | asyncpg.Connection, statement: str) -> int:
    status = await db.execute(statement)
    return int(status.rsplit(" ", 1)[1])


async def fold_contact_counts(db: asyncpg.Pool | asyncpg.Connection) -> int:
    """Fold every list with more than one row; returns the number of lists folded."""
    return await _rows_written(db, _CONTACT_COUNTS)


async def fold_report_rollup(db: asyncpg.Pool | asyncpg.Connection) -> int:
    """Fold every (account, day) with new rows; returns the number of rows written."""
    return await _rows_written(db, _REPORT_ROLLUP)


async def fold_all(db: asyncpg.Pool) -> None:
    await fold_contact_counts(db)
    await fold_report_rollup(db)


async def run_folder(ctx: dict[str, Any]) -> None:
    """Started by the worker: ``fold_all`` every ``FOLD_INTERVAL`` seconds until cancelled."""
    await loops.repeat(
        lambda: fold_all(ctx["db"]), log=log, failure="folding the counting tables failed",
        pause_after_failure=FOLD_INTERVAL, interval=FOLD_INTERVAL,
    )
