"""Per-connection and per-user limits: token buckets and connection counts.

These are enforced on each node.  The per-user figures are per node; with N
nodes behind a load balancer a user can reach N times the connection limit
(documented in docs/OPERATIONS.md).  Everything here is synchronous and
allocation-free on the hot path: one bucket update per request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from protocol.errors import RateLimited


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    __slots__ = ("_clock", "_level", "_stamp", "burst", "rate")

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._level = burst
        self._stamp = clock()

    def take(self, n: float = 1.0) -> float:
        """Take ``n`` tokens; returns 0 on success, else seconds until possible."""
        now = self._clock()
        self._level = min(self.burst, self._level + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._level >= n:
            self._level -= n
            return 0.0
        return (n - self._level) / self.rate if self.rate > 0 else float("inf")


@dataclass
class _User:
    connections: int = 0
    requests: TokenBucket | None = None


@dataclass
class Limits:
    """Limits of one node.  A rate of 0 disables that limit."""

    connections_per_user: int = 20
    requests_per_connection: float = 200.0
    requests_per_user: float = 400.0
    clock: Callable[[], float] = field(default=trio.current_time)
    _users: dict[str, _User] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)

    def connect(self, user: str) -> bool:
        """Count a new connection; False (and nothing counted) when over the limit."""
        entry = self._users.setdefault(user, _User())
        if self.connections_per_user and entry.connections >= self.connections_per_user:
            self._count("TooManyConnections")
            return False
        entry.connections += 1
        return True

    def disconnect(self, user: str) -> None:
        entry = self._users.get(user)
        if entry is None:
            return
        entry.connections -= 1
        if entry.connections <= 0:
            del self._users[user]

    def connection_bucket(self) -> TokenBucket | None:
        rate = self.requests_per_connection
        return TokenBucket(rate, 2 * rate, self.clock) if rate else None

    def check_request(self, user: str, bucket: TokenBucket | None) -> None:
        """Raise RateLimited if this connection or this user is over its rate."""
        wait = bucket.take() if bucket is not None else 0.0
        if not wait and self.requests_per_user:
            entry = self._users.setdefault(user, _User())
            if entry.requests is None:
                rate = self.requests_per_user
                entry.requests = TokenBucket(rate, 2 * rate, self.clock)
            wait = entry.requests.take()
        if wait:
            self._count("RateLimited")
            raise RateLimited(
                "too many requests; slow down", retry_after_ms=max(1, int(wait * 1000))
            )

    def _count(self, what: str) -> None:
        self.rejected[what] = self.rejected.get(what, 0) + 1
