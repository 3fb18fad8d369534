"""New connections per source address per second: a token bucket per address.

Used at accept (relay/edge/gate.py), before a byte of the request head is read, so
a refused connection costs one table update and a short fixed answer: no
token is parsed, no signature checked, no database asked.  Centrifugo and
nginx's ``limit_conn``/``limit_req`` bound the same thing per client IP.

The table is bounded without a pruning an attacker could use to reset a
limit.  A bucket that has refilled is the same as no bucket, so only those go:
entries are kept in least-recently-used order and, at every take, the oldest
go while they have been idle for a full refill (``burst / rate`` seconds).
That is exact and O(1) amortized.  Should the table still hold
:data:`MAX_ADDRESSES` entries that are all recent, an address without one
shares a single overflow bucket: a flood from more addresses than that in
one refill time neither grows memory nor lifts the limit of anyone tracked.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

#: Addresses (IPv4, IPv6 /64) tracked at once.
MAX_ADDRESSES = 65536
#: The key of the bucket shared by addresses the full table cannot track.
OVERFLOW = "*"


class ConnectRate:
    """``rate`` new connections per second per key, ``burst`` at once."""

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        self.rate = rate
        self.burst = float(max(1, burst))
        self.clock = clock
        self.max_addresses = max_addresses
        #: key -> (tokens, when last updated), least recently used first.
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.refill_s = self.burst / rate if rate > 0 else 0.0

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str) -> float:
        """One connection from ``key``: 0.0 if allowed, else seconds until one is."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        self._expire(now)
        if key not in self.buckets and len(self.buckets) >= self.max_addresses:
            key = OVERFLOW
        tokens, stamp = self.buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self.buckets[key] = (tokens, now)  # most recently used: the end
        return wait

    def _expire(self, now: float) -> None:
        """Drop the entries idle for a whole refill: their bucket is full again."""
        while self.buckets:
            key, (_, stamp) = next(iter(self.buckets.items()))
            if now - stamp < self.refill_s:
                return
            del self.buckets[key]
