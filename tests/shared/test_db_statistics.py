"""The worker says so at start when PostgreSQL keeps no fresh statistics (autovacuum off)."""
from __future__ import annotations

import logging

import pytest

from shared import db


@pytest.mark.parametrize(("settings", "named"), [
    ({"autovacuum": "on", "track_counts": "on"}, None),
    ({"autovacuum": "off", "track_counts": "on"}, "autovacuum is off"),
    ({"autovacuum": "on", "track_counts": "off"}, "track_counts is off"),
    ({"autovacuum": "off", "track_counts": "off"}, "autovacuum and track_counts are off"),
    ({}, "autovacuum and track_counts are off"),  # settings a role cannot read: not known to be on
])
def test_statistics_problem_names_what_is_off(settings, named):
    problem = db.statistics_problem(settings)
    assert (problem is None) if named is None else (problem is not None and problem.startswith(named) and "ANALYZE" in problem)


async def _server_settings(conn) -> dict[str, str]:
    return {name: await conn.fetchval(f"SHOW {name}") for name in ("autovacuum", "track_counts")}


async def test_the_warning_follows_the_servers_own_settings(settings, caplog):
    conn = await db.connect(settings.database_url)
    try:
        on = await _server_settings(conn)
        with caplog.at_level(logging.WARNING, logger="trackly.db"):
            problem = await db.warn_if_statistics_stale(conn)
    finally:
        await conn.close()
    assert problem == db.statistics_problem(on)
    assert (problem in caplog.text) if problem else ("postgresql:" not in caplog.text)


async def test_a_worker_start_reports_it(settings, caplog):
    from services.worker import main as worker_main

    ctx: dict = {"settings": settings}
    with caplog.at_level(logging.WARNING, logger="trackly.db"):
        await worker_main.startup(ctx)
    try:
        conn = await db.connect(settings.database_url)
        try:
            on = await _server_settings(conn)
        finally:
            await conn.close()
        assert ctx["postgres_problem"] == db.statistics_problem(on)
        assert (ctx["postgres_problem"] in caplog.text) if ctx["postgres_problem"] else "postgresql:" not in caplog.text
    finally:
        await worker_main.shutdown(ctx)
