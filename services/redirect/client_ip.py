"""The visitor's IP: the peer address, or X-Forwarded-For when the peer is a trusted proxy."""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_HOPS = 32  # proxies of ours a request may have passed, at most


class ClientIP:
    def __init__(self, trusted: Iterable[Network]) -> None:
        self._trusted = tuple(trusted)
        self.trusts_any = bool(self._trusted)
        self._memo: dict[str, bool] = {}

    def is_trusted(self, address: str) -> bool:
        known = self._memo.get(address)
        if known is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                known = False
            else:
                # ::ffff:10.0.0.5 is 10.0.0.5 (a dual-stack proxy writes IPv4 hops so): an IPv6
                # address is never "in" an IPv4 network.
                if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped
                known = any(ip in net for net in self._trusted)
            if len(self._memo) >= 10_000:
                self._memo.clear()
            self._memo[address] = known
        return known

    def __call__(self, peer: str | None, forwarded_for: bytes | None) -> str | None:
        """``forwarded_for`` is the raw X-Forwarded-For header (all of them joined by commas)."""
        if not self._trusted or forwarded_for is None or peer is None or not self.is_trusted(peer):
            return peer
        # Walk from the nearest hop back: the first address not ours is the client. Anything left
        # of it was written by the client and cannot be believed.
        client = peer
        # The nearest MAX_HOPS hops at most: the rest stays one string (a header of a million
        # commas must not become a million strings), which is no address.
        for part in reversed(forwarded_for.decode("latin-1").rsplit(",", MAX_HOPS)):
            candidate = part.strip()
            if candidate.startswith("[") and "]" in candidate:
                candidate = candidate[1:candidate.index("]")]
            elif candidate.count(":") == 1:  # an IPv4 address and its port, as some proxies write a hop (Azure's)
                address, _, port = candidate.partition(":")
                if port.isdigit():
                    candidate = address
            try:
                ip = ipaddress.ip_address(candidate)
            except ValueError:
                break
            mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
            client = str(mapped) if mapped is not None else candidate
            if not self.is_trusted(candidate):
                break
        return client
