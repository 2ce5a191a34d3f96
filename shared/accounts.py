"""Accounts and lists as the operator CLI creates them; API keys are stored as sha256 digests."""
from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg

from shared import ids
from shared.phone import parse_e164


def hash_api_key(key: str) -> bytes:
    # Keys carry 128 random bits, so a fast digest is enough: there is nothing to brute-force.
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    offer_management: bool


async def create_account(conn: asyncpg.Connection, name: str, *, offer_management: bool = True) -> dict:
    if not name.strip():
        raise ValueError("--name must not be empty")
    key = ids.api_key()
    token = ids.postback_token()
    account_id = await conn.fetchval(
        "INSERT INTO accounts (name, api_key_hash, postback_token, offer_management)"
        " VALUES ($1, $2, $3, $4) RETURNING id",
        name.strip(), hash_api_key(key), token, offer_management,
    )
    return {"account_id": account_id, "api_key": key, "postback_token": token}


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


async def create_list(
    conn: asyncpg.Connection,
    *,
    account_id: int,
    name: str,
    phone: str,
    short_domain: str | None = None,
    tracker_domain: str | None = None,
    active: bool = True,
) -> dict:
    if not name.strip():
        raise ValueError("--name must not be empty")
    phone_number = parse_e164(phone)
    short = normalise_domain(short_domain, "--short-domain")
    tracker = normalise_domain(tracker_domain, "--tracker-domain")
    if not 0 < account_id < 2**63 or not await conn.fetchval("SELECT 1 FROM accounts WHERE id = $1", account_id):
        raise ValueError(f"account {account_id} does not exist")
    try:
        list_id = await conn.fetchval(
            "INSERT INTO lists (account_id, name, phone_number, status, short_domain, tracker_domain)"
            " VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            account_id, name.strip(), phone_number, "active" if active else "inactive", short, tracker,
        )
    except asyncpg.UniqueViolationError:
        raise ValueError(f"account {account_id} already has a list for {phone_number}") from None
    return {"list_id": list_id, "phone_number": phone_number, "short_domain": short, "tracker_domain": tracker}
