"""Regressions found by property-based differential testing of the macros and the redirect's
Location (hypothesis counterexamples turned into plain cases; no hypothesis needed)."""
from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest

from services.redirect.app import _host_takes_a_macro
from shared import edge as edge_keys
from shared.settings import Settings
from tests.helpers import Tenant
from tests.redirect.conftest import offer_and_link, running_edge


# Browsers (WHATWG URL, "special authority ignore slashes state") skip every "/" and "\" after
# "https:", so "https:///{sub1}/" is https://<sub1>/ : the host is the visitor's value.
@pytest.mark.parametrize("url", [
    "https:///{sub1}/x",
    "https://\\{sub1}/x",
    "https:////{sub1}",
    "https://\\/\\{sub1}.example/",
    "HTTPS:///{{ sendId }}/",
])
def test_extra_slashes_after_the_scheme_do_not_hide_a_macro_in_the_host(url: str) -> None:
    assert _host_takes_a_macro(url) is True


@pytest.mark.parametrize("url", [
    "https://lp.example/{sub1}",
    "https://lp.example//{sub1}",
    "https://lp.example\\{sub1}",
    "https:///lp.example/{sub1}",
])
def test_a_macro_after_the_host_is_still_allowed(url: str) -> None:
    assert _host_takes_a_macro(url) is False


async def test_an_offer_in_redis_with_a_macro_after_extra_slashes_answers_404(
    api: httpx.AsyncClient, tenant: Tenant, settings: Settings, redis: Any
) -> None:
    """An offer published before the gateway's check, "https:///{sub1}/": the edge answered
    302 Location: https:///evil.example/ which a browser follows to https://evil.example/."""
    offer, link = await offer_and_link(api, tenant, "https://lp.example/ok?c={click_id}")
    ttl = 0.05
    async with running_edge(settings, link_cache_ttl=ttl) as edge:
        tracker = (await edge.get(link["shortUrl"])).headers["location"]
        entry = orjson.loads(await redis.get(edge_keys.offer_key(offer["id"])))
        await redis.set(edge_keys.offer_key(offer["id"]), orjson.dumps({**entry, "d": "https:///{sub1}/"}))
        await asyncio.sleep(ttl * 3)
        resp = await edge.get(tracker + "?sub1=evil.example")
        assert resp.status_code == 404, resp.headers.get("location")
