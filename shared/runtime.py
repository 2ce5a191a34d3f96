"""Resolve where PostgreSQL and Redis are: the configured servers, or embedded ones."""
from __future__ import annotations

import signal
from dataclasses import replace
from types import FrameType

from shared.embedded import Embedded
from shared.settings import Settings


def one_line(exc: BaseException) -> str:
    """An error as the CLI prints it: its type and the first line of its message."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def with_backends(settings: Settings, *, redis: bool = True, db: bool = True) -> tuple[Settings, Embedded | None]:
    """Settings with the URLs filled in; starts embedded servers for whichever is unset.

    ``redis=False`` is for commands that only need PostgreSQL (migrate, admin): they must not
    start a second embedded Redis on the socket of one that ``trackly run`` already serves.
    ``db=False`` is for the redirect, which never touches PostgreSQL.
    PostgreSQL is safe to "start" twice: pgserver attaches to a running server of the same
    data directory and only the last process using it stops it.
    The caller owns the returned ``Embedded`` (if any) and must ``stop()`` it.
    """
    need_db = db and settings.database_url is None
    need_redis = redis and settings.redis_url is None
    if not (need_db or need_redis):
        return settings, None
    embedded = None
    try:
        embedded = Embedded(settings.data_dir)
        db_url, redis_url = embedded.start(need_db=need_db, need_redis=need_redis)
    except BaseException as exc:  # e.g. SystemExit from exit_on_sigterm: stop what did start
        if embedded is not None:
            embedded.stop()
        if isinstance(exc, Exception):
            # A TRACKLY_DATA_DIR that cannot hold them is a configuration error: one line naming
            # the variable, as settings gives, and a non-zero exit.
            raise SystemExit(
                f"the embedded servers cannot start under TRACKLY_DATA_DIR ({settings.data_dir}): {one_line(exc)}"
            ) from None
        raise
    return replace(
        settings,
        database_url=settings.database_url or db_url,
        redis_url=settings.redis_url or redis_url,
    ), embedded


def _exit(signum: int, frame: FrameType | None) -> None:
    # Only once: a second signal raised again in the finally that the first one runs (or in
    # pgserver's clean-up at exit), and the embedded PostgreSQL it was stopping ran on.
    signal.signal(signal.SIGTERM, _stopping)
    signal.signal(signal.SIGHUP, _stopping)
    raise SystemExit(128 + signum)


def _stopping(signum: int, frame: FrameType | None) -> None:
    """Already on its way out (``_exit``)."""


def exit_on_sigterm() -> None:
    """Let SIGTERM (and SIGHUP: the terminal closed) end a process through ``SystemExit``, so that
    its ``finally`` runs.

    uvicorn shuts down gracefully on SIGTERM, then restores the handler it found and raises the
    signal again. With the default handler the process dies right there, before the ``finally``
    that stops its embedded PostgreSQL and Redis: they were left running (the embedded PostgreSQL
    is a daemon: nothing else stops it). The same for ``trackly migrate`` and ``trackly admin``.
    Call first, before ``with_backends`` starts them (a signal while they start stops them too);
    exits with 128 + the signal's number, as a process killed by it reports."""
    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGHUP, _exit)
