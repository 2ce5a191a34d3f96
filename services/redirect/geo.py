"""Country of an IP from a local MaxMind-format database; without one, country is unknown."""
from __future__ import annotations

import logging
from pathlib import Path

import geoip2.database
import geoip2.errors

log = logging.getLogger("trackly.redirect.geo")

_MEMO_LIMIT = 50_000


class Geo:
    def __init__(self, path: Path | None) -> None:
        self._reader: geoip2.database.Reader | None = None
        self.enabled = False
        self._memo: dict[str, str | None] = {}
        if path is None:
            return
        try:
            self._reader = geoip2.database.Reader(str(path))
        except Exception as exc:  # noqa: BLE001 - a bad database must not stop the redirect
            log.warning("GeoIP database %s unusable (%s); countries will be empty", path, exc)
            return
        # geoip2 answers each method only for its own kinds of database (by name): any other
        # raises TypeError, which a lookup could not tell from an address it cannot read.
        database_type = self._reader.metadata().database_type
        if "Enterprise" in database_type:
            self._lookup = self._reader.enterprise
        elif "City" in database_type:
            self._lookup = self._reader.city
        elif "Country" in database_type:
            self._lookup = self._reader.country
        else:
            log.warning("GeoIP database %s holds no countries (%s); countries will be empty", path, database_type)
            self.close()
            return
        self.enabled = True

    def country(self, ip: str | None) -> str | None:
        if self._reader is None or not ip:
            return None
        try:
            return self._memo[ip]
        except KeyError:
            pass
        try:
            code = self._lookup(ip).country.iso_code
        except (geoip2.errors.AddressNotFoundError, ValueError, TypeError):
            code = None
        except Exception as exc:  # noqa: BLE001 - a corrupt record is an unknown country, not a 500
            log.debug("GeoIP lookup of %s failed: %s", ip, exc)
            code = None
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        self._memo[ip] = code
        return code

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
            self.enabled = False
