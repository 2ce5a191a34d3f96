"""X-Api-Key authentication; every handler gets the caller's account and nothing else."""
from __future__ import annotations

from starlette.requests import Request

from shared.accounts import Account, hash_secret
from shared.errors import ApiError


async def authenticate(request: Request) -> Account:
    key = request.headers.get("x-api-key", "").strip()
    if not key:
        raise ApiError(401, "unauthorized", "Missing X-Api-Key header")
    row = await request.app.state.db.fetchrow(
        "SELECT id, name, offer_management FROM accounts WHERE api_key_hash = $1", hash_secret(key)
    )
    if row is None:
        raise ApiError(401, "unauthorized", "Invalid API key")
    return Account(row["id"], row["name"], row["offer_management"])
