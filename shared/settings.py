"""Configuration, read once from the environment into one typed object.

Nothing else in the code base reads ``os.environ``.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from shared.domains import normalise_domain


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    redis_url: str | None = None
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8000
    redirect_host: str = "127.0.0.1"
    redirect_port: int = 8001
    data_dir: Path = Path(".trackly")
    geoip_db: Path | None = None
    default_tracker_domain: str = "http://ct.localhost:8001"
    # Networks whose X-Forwarded-For the redirect believes (load balancers in front of it).
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(default_factory=tuple)
    # How long the redirect trusts a cached link / offer before asking Redis again.
    link_cache_ttl: float = 5.0
    link_cache_size: int = 100_000
    # Days a message's per-message short URLs keep working at the edge, from its send (0: as long
    # as Redis keeps them; at most 36,500). Each costs Redis memory (shared/edge.py); an operator
    # bounds it here.
    message_code_days: int = 0
    # Seconds the gateway and the redirect keep an idle client connection open (uvicorn's own
    # default, 5). Behind a load balancer that reuses its connections to them, it must be longer
    # than the balancer's idle timeout (see README).
    keepalive_seconds: int = 5
    log_level: str = "info"

    @property
    def embedded(self) -> bool:
        return self.database_url is None or self.redis_url is None


DEFAULT_TRUSTED_PROXIES = "127.0.0.0/8,::1/128"


def _network(name: str, raw: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(raw, strict=False)
    except ValueError:
        raise SystemExit(f"{name} must be a comma-separated list of CIDRs, got {raw!r}") from None


# CONTRACT.md §4: a paused or deleted offer answers 404 within 15 s; the edge's cache must not
# outlive that (services/redirect/cache.py also stops serving stale entries in time).
MAX_LINK_CACHE_TTL = 10.0


def _seconds(env: dict[str, str], name: str, default: float, *, high: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a number of seconds, got {raw!r}") from None
    if not 0 <= value <= high:  # (NaN is neither)
        raise SystemExit(f"{name} must be from 0 to {high:g} seconds, got {raw}")
    return value


def _int(env: dict[str, str], name: str, default: int, *, low: int | None = None, high: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from None
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"at most {high}" if low is None else f"from {low} to {high}"
        raise SystemExit(f"{name} must be {bounds}, got {value}")
    return value


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def _log_level(env: dict[str, str]) -> str:
    raw = env.get("TRACKLY_LOG_LEVEL") or "info"
    if raw.lower() not in LOG_LEVELS:  # (uvicorn would fail later, with a traceback)
        raise SystemExit(f"TRACKLY_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return raw.lower()


def _origin(env: dict[str, str], name: str, default: str) -> str:
    """An http(s) origin, as the operator CLI takes a list's domains (``ct.example.com`` is
    ``https://ct.example.com``): with a path, a query or no scheme, the tracker URLs of every list
    without a tracker domain of its own would not be URLs the redirect serves."""
    try:
        return normalise_domain(env.get(name) or default, name) or default
    except ValueError as exc:
        raise SystemExit(f"{exc}, got {env.get(name)!r}") from None


def _url(env: dict[str, str], name: str, schemes: tuple[str, ...]) -> str | None:
    """A server's URL of a scheme its client takes (asyncpg's, redis-py's and arq's own check),
    or None (unset: the embedded server). Not echoed: it may hold a password."""
    raw = env.get(name) or None
    if raw is not None and urlsplit(raw).scheme.lower() not in schemes:
        raise SystemExit(f"{name} must be a URL of scheme {', '.join(s + '://' for s in schemes)}")
    return raw


def load(env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ if env is None else env)
    # Unset: a proxy on the same host (loopback) is believed, as uvicorn's own default does; set
    # it empty to believe nobody.
    raw_proxies = env.get("TRACKLY_TRUSTED_PROXIES")
    proxies = tuple(
        _network("TRACKLY_TRUSTED_PROXIES", p.strip())
        for p in (DEFAULT_TRUSTED_PROXIES if raw_proxies is None else raw_proxies).split(",")
        if p.strip()
    )
    geoip = env.get("TRACKLY_GEOIP_DB") or None
    return Settings(
        database_url=_url(env, "TRACKLY_DATABASE_URL", ("postgresql", "postgres")),
        redis_url=_url(env, "TRACKLY_REDIS_URL", ("redis", "rediss", "unix")),
        gateway_host=env.get("TRACKLY_GATEWAY_HOST", "127.0.0.1"),
        gateway_port=_int(env, "TRACKLY_GATEWAY_PORT", 8000, low=1, high=65535),
        redirect_host=env.get("TRACKLY_REDIRECT_HOST", "127.0.0.1"),
        redirect_port=_int(env, "TRACKLY_REDIRECT_PORT", 8001, low=1, high=65535),
        data_dir=Path(env.get("TRACKLY_DATA_DIR") or ".trackly"),
        geoip_db=Path(geoip) if geoip else None,
        default_tracker_domain=_origin(env, "TRACKLY_DEFAULT_TRACKER_DOMAIN", "http://ct.localhost:8001"),
        trusted_proxies=proxies,
        link_cache_ttl=_seconds(env, "TRACKLY_LINK_CACHE_TTL", 5.0, high=MAX_LINK_CACHE_TTL),
        link_cache_size=_int(env, "TRACKLY_LINK_CACHE_SIZE", 100_000, low=1),
        message_code_days=_int(env, "TRACKLY_MESSAGE_CODE_DAYS", 0, low=0, high=36_500),
        keepalive_seconds=_int(env, "TRACKLY_KEEPALIVE_SECONDS", 5, low=1, high=3600),
        log_level=_log_level(env),
    )
