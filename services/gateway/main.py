"""``trackly gateway``: serve the API with uvicorn."""
from __future__ import annotations

import asyncio

import uvicorn

from services.gateway.app import create_app
from shared.http_limits import BoundedHttpToolsProtocol
from shared.migrate import migrate
from shared.runtime import exit_on_sigterm, with_backends
from shared.settings import Settings


def serve(settings: Settings) -> int:
    exit_on_sigterm()
    settings, embedded = with_backends(settings)
    try:
        if embedded is not None:
            # A private database is ours to migrate; shared ones are migrated by `trackly migrate`.
            asyncio.run(migrate(settings.database_url))
        uvicorn.run(
            create_app(settings),
            host=settings.gateway_host,
            port=settings.gateway_port,
            http=BoundedHttpToolsProtocol,  # httptools, with the request head bounded (http_limits.py)
            log_level=settings.log_level,
            access_log=False,
            server_header=False,  # no "server: uvicorn": what runs here is nobody's business (and one header less per answer)
            timeout_keep_alive=settings.keepalive_seconds,
            timeout_graceful_shutdown=6,  # then closing pools (db.CLOSE_TIMEOUT): within supervisor.CHILD_STOP_TIMEOUT
        )
    finally:
        if embedded is not None:
            embedded.stop()
    return 0
