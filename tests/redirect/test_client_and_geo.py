"""Who clicked: the client IP (X-Forwarded-For only from trusted proxies) and its country."""
from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import pytest
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from services.redirect.client_ip import ClientIP
from services.redirect.geo import Geo
from shared.settings import Settings
from tests.helpers import Tenant
from tests.redirect.conftest import drain, offer_and_link, running_edge

DEST = "https://lp.example/land?c={click_id}&ip={ip}&cc={country_code}"


def q(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query, keep_blank_values=True).items()}


@pytest.fixture(scope="module")
def geoip_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-Country")
    writer.insert_network(IPSet(["81.2.69.0/24"]), {"country": {"iso_code": "GB", "names": {"en": "United Kingdom"}}})
    writer.insert_network(IPSet(["203.0.113.0/24"]), {"country": {"iso_code": "AU", "names": {"en": "Australia"}}})
    writer.insert_network(IPSet(["2001:db8::/32"]), {"country": {"iso_code": "DE", "names": {"en": "Germany"}}})
    path = tmp_path_factory.mktemp("geo") / "test-country.mmdb"
    writer.to_db_file(str(path))
    return path


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    resolve = ClientIP([ipaddress.ip_network("10.0.0.0/8")])
    assert resolve("10.1.2.3", b"203.0.113.5") == "203.0.113.5"
    assert resolve("198.51.100.1", b"203.0.113.5") == "198.51.100.1"          # untrusted peer: header ignored
    assert resolve("10.1.2.3", b"1.2.3.4, 203.0.113.5, 10.9.9.9") == "203.0.113.5"  # spoofed left part ignored
    assert resolve("10.1.2.3", b"garbage, 203.0.113.5") == "203.0.113.5"
    assert resolve("10.1.2.3", b"10.0.0.1, 10.0.0.2") == "10.0.0.1"
    assert resolve("10.1.2.3", None) == "10.1.2.3"
    assert resolve("10.1.2.3", b"[2001:db8::1]") == "2001:db8::1"
    assert ClientIP([])("10.1.2.3", b"203.0.113.5") == "10.1.2.3"


async def test_forwarded_for_through_the_edge(
    api: httpx.AsyncClient, tenant: Tenant, settings: Settings, db: asyncpg.Pool, redis: object
) -> None:
    _, link = await offer_and_link(api, tenant, DEST)
    proxies = (ipaddress.ip_network("10.0.0.0/8"),)
    async with running_edge(settings, client_ip="10.0.0.9", trusted_proxies=proxies) as edge:
        trusted = q(await edge.click(link["shortUrl"], headers={"x-forwarded-for": "9.9.9.9, 198.51.100.23"}))
    async with running_edge(settings, client_ip="192.0.2.50", trusted_proxies=proxies) as edge:
        untrusted = q(await edge.click(link["shortUrl"], headers={"x-forwarded-for": "198.51.100.23"}))
    async with running_edge(settings, client_ip="10.0.0.9", trusted_proxies=proxies) as edge:
        # One header per hop, as proxies may write it: read as one list, in order.
        lines = httpx.Headers([("x-forwarded-for", "9.9.9.9"), ("x-forwarded-for", "198.51.100.77"),
                               ("x-forwarded-for", "10.0.0.3")])
        tracker = (await edge.get(link["shortUrl"])).headers["location"]
        answer = await edge.get(tracker, headers=lines)
        assert answer.status_code == 302 and answer.request.headers.get_list("x-forwarded-for") == lines.get_list("x-forwarded-for")
        several = q(answer.headers["location"])
    assert several["ip"] == "198.51.100.77"
    assert trusted["ip"] == "198.51.100.23"
    assert untrusted["ip"] == "192.0.2.50"
    await drain(db, redis)
    assert await db.fetchval("SELECT ip FROM clicks WHERE id = $1", trusted["c"]) == "198.51.100.23"
    assert await db.fetchval("SELECT ip FROM clicks WHERE id = $1", untrusted["c"]) == "192.0.2.50"


def test_geo_lookups(geoip_db: Path, tmp_path: Path) -> None:
    geo = Geo(geoip_db)
    try:
        assert geo.country("81.2.69.160") == "GB"
        assert geo.country("2001:db8::5") == "DE"
        assert geo.country("192.0.2.1") is None      # not in the database
        assert geo.country("not an ip") is None
        assert geo.country(None) is None
    finally:
        geo.close()
    assert Geo(None).country("81.2.69.160") is None
    broken = tmp_path / "broken.mmdb"
    broken.write_bytes(b"not a database")
    assert Geo(broken).country("81.2.69.160") is None  # unusable database: unknown country, no failure


async def test_country_code_from_geoip(
    api: httpx.AsyncClient, tenant: Tenant, settings: Settings, db: asyncpg.Pool, redis: object, geoip_db: Path
) -> None:
    _, link = await offer_and_link(api, tenant, DEST)
    async with running_edge(settings, client_ip="81.2.69.160", geoip_db=geoip_db) as edge:
        gb = q(await edge.click(link["shortUrl"]))
    async with running_edge(settings, client_ip="192.0.2.1", geoip_db=geoip_db) as edge:
        unknown = q(await edge.click(link["shortUrl"]))
    assert gb["cc"] == "GB"
    assert unknown["cc"] == ""
    await drain(db, redis)
    assert await db.fetchval("SELECT country_code FROM clicks WHERE id = $1", gb["c"]) == "GB"
    assert await db.fetchval("SELECT country_code FROM clicks WHERE id = $1", unknown["c"]) is None


def test_a_forwarded_for_entry_with_a_port_is_its_address() -> None:
    """Proxies that write each hop with its port (Azure Application Gateway: "203.0.113.5:41234";
    bracketed for IPv6): the address is the client. It was taken for junk, and the click was the
    proxy's (found by review)."""
    resolve = ClientIP([ipaddress.ip_network("10.0.0.0/8")])
    assert resolve("10.1.2.3", b"203.0.113.5:41234") == "203.0.113.5"
    assert resolve("10.1.2.3", b"1.2.3.4:1, 203.0.113.5:41234, 10.0.0.2:443") == "203.0.113.5"
    assert resolve("10.1.2.3", b"[2001:db8::1]:443") == "2001:db8::1"
    assert resolve("10.1.2.3", b"1.2.3.4, 203.0.113.5:junk") == "10.1.2.3"  # still no address
    assert resolve("10.1.2.3", b"1.2.3.4, 203.0.113.5:") == "10.1.2.3"


async def test_forwarded_for_with_ports_through_the_edge(
    api: httpx.AsyncClient, tenant: Tenant, settings: Settings, geoip_db: Path
) -> None:
    _, link = await offer_and_link(api, tenant, DEST)
    proxies = (ipaddress.ip_network("10.0.0.0/8"),)
    async with running_edge(settings, client_ip="10.0.0.9", trusted_proxies=proxies, geoip_db=geoip_db) as edge:
        clicked = q(await edge.click(link["shortUrl"], headers={"x-forwarded-for": "81.2.69.160:52311"}))
    assert (clicked["ip"], clicked["cc"]) == ("81.2.69.160", "GB")


def _mmdb(path: Path, database_type: str) -> Path:
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type=database_type)
    writer.insert_network(IPSet(["81.2.69.0/24"]), {"country": {"iso_code": "GB"}, "city": {"names": {"en": "London"}}})
    writer.to_db_file(str(path))
    return path


@pytest.mark.parametrize("database_type", ["GeoIP2-Enterprise", "GeoIP2-City", "DBIP-Country-Lite", "DBIP-City-Lite"])
def test_every_maxmind_format_database_with_countries_gives_them(tmp_path: Path, database_type: str) -> None:
    """A MaxMind Enterprise database holds countries too, but geoip2 refuses its country() (and
    city()) on one: every lookup raised TypeError, taken for an unknown address, so every click's
    country was empty with nothing said (found by review)."""
    geo = Geo(_mmdb(tmp_path / "geo.mmdb", database_type))
    try:
        assert geo.enabled
        assert geo.country("81.2.69.160") == "GB"
    finally:
        geo.close()


def test_a_database_without_countries_is_reported_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    geo = Geo(_mmdb(tmp_path / "asn.mmdb", "GeoLite2-ASN"))
    assert not geo.enabled and geo.country("81.2.69.160") is None
    assert "countries will be empty" in caplog.text
