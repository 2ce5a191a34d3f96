"""``trackly redirect``: serve the edge with uvicorn (uvloop + httptools, no access log)."""
from __future__ import annotations

import uvicorn

from services.redirect.app import create_app
from shared.http_limits import BoundedHttpToolsProtocol
from shared.runtime import exit_on_sigterm, with_backends
from shared.settings import Settings


def serve(settings: Settings) -> int:
    # The redirect never touches PostgreSQL: only an embedded Redis is started, when none is configured.
    exit_on_sigterm()
    settings, embedded = with_backends(settings, db=False)
    try:
        uvicorn.run(
            create_app(settings),
            host=settings.redirect_host,
            port=settings.redirect_port,
            loop="uvloop",
            http=BoundedHttpToolsProtocol,  # httptools, with the request head bounded (http_limits.py)
            lifespan="on",
            log_level=settings.log_level,
            access_log=False,
            server_header=False,  # no "server: uvicorn": what runs here is nobody's business (and one header less per answer)
            # X-Forwarded-For is read by the app, and only from settings.trusted_proxies.
            proxy_headers=False,
            timeout_keep_alive=settings.keepalive_seconds,
            timeout_graceful_shutdown=6,  # then its last click batches: within supervisor.CHILD_STOP_TIMEOUT
        )
    finally:
        if embedded is not None:
            embedded.stop()
    return 0
