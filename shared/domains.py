"""A list's short and tracker domains as the operator gives them (and the platform's default
tracker domain): http(s) origins. Apart from accounts.py, so that settings can use it without
asyncpg (the redirect never loads it)."""
from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


def normalise_domain(value: str | None, option: str) -> str | None:
    """``https://sms.example.com[:port]``, the scheme lower-cased. A domain is an origin:
    a path, query, fragment or user part would make short URLs the redirect cannot serve."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if "://" not in text:
        text = "https://" + text
    problem = f"{option} must be an http(s) origin such as https://sms.example.com"
    try:
        parts = urlsplit(text)
        port = parts.port  # a port that is not a number in range raises
    except ValueError:
        raise ValueError(problem) from None
    if parts.netloc.endswith(":") or port == 0:
        raise ValueError(problem)
    host = (parts.hostname or "").rstrip(".")
    scheme = parts.scheme.lower()
    if (
        scheme not in ("http", "https") or parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc
        or not (_HOSTNAME_RE.match(host) or _is_ip(host))
    ):
        raise ValueError(problem)
    return f"{scheme}://{parts.netloc}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
