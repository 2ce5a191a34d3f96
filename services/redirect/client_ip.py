"""The visitor's IP: the peer address, or X-Forwarded-For when the peer is a trusted proxy."""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
        for part in reversed(forwarded_for.decode("latin-1").split(",")):
            candidate = part.strip()
            if candidate.startswith("[") and "]" in candidate:
                candidate = candidate[1:candidate.index("]")]
            try:
                ipaddress.ip_address(candidate)
            except ValueError:
                break
            client = candidate
            if not self.is_trusted(candidate):
                break
        return client
