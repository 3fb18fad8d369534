"""Per-connection and per-user limits: token buckets and connection counts.

This is each node's own accounting.  Connections per user also hold across
nodes: with ``REDIS_URL`` every connection takes a lease in Redis
(:mod:`relay.cluster.presence`), and these counts are the fallback when there is no
Redis or it is unreachable.  KeyPackage claim rates are shared the same way
(:mod:`relay.cluster.sharedlimits`).

Request rates stay per node on purpose: a Redis round trip per request would
cost more than most requests.  A user's request rate across all nodes is still
bounded, by ``connections_per_user`` (cross-node) x ``requests_per_connection``.
Everything here is synchronous and allocation-free on the hot path: one
bucket update per request.

What counts as a request (relay/edge/session.py): every data message the client
sends, before it is parsed -- unknown and invalid requests included, and a
message costs one request per started REQUEST_BYTES, so 1 MiB frames cannot
be sent at the rate of small ones, or, when its body nests arrays or maps,
one per started NESTED_BYTES (decoding costs per item) -- and every ping and
pong.  A connection that keeps sending after RateLimited uses up its strike
bucket (``rate_limit_strikes`` refusals, refilled at that many per minute; a
refused message takes as many strikes as it costs requests) and is then
closed (RateLimitIgnored, 1008), as Centrifugo and Discord's gateway
disconnect clients that ignore their limits: every refusal is a reply, and
an unbounded stream of replies is what the limit was there to prevent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from protocol.errors import RateLimited
from protocol.requests import ListConversations, Request, Subscribe

#: A message costs one request per started REQUEST_BYTES of its size.
REQUEST_BYTES = 64 * 1024
#: ... and one per started NESTED_BYTES when its body holds arrays or maps:
#: decoding and checking costs per CBOR item, and a nested body can be one
#: item per byte (65,000 empty arrays in 64 KiB took 16-30 ms to decode, as
#: one request).  Flat bodies (every #send without removes) stay per 64 KiB.
NESTED_BYTES = 512
#: No frame holds more CBOR items than this (protocol/strictcbor.py MAX_ITEMS),
#: so no frame costs more to decode than this many bytes of items.
NESTED_MAX_BYTES = 64 * 1024


#: Requests whose work grows with what they name cost by that work, charged
#: before it is done: a #listConversations page one per started LIST_ROWS of
#: its ``limit`` (the rows it did not fill are given back after the reply:
#: small accounts pay 1), a #subscribe one per started SUBSCRIBE_CURSORS
#: cursors.  One 10,000-row reply took ~60 ms of the node's CPU (issue 12).
LIST_ROWS = 100
SUBSCRIBE_CURSORS = 50
#: A #subscribe reads every membership of the user, however few cursors it
#: names (~40 ms for 8,000), and each connection's bucket starts full: so the
#: conversations it set up are charged to the user's bucket afterwards, one
#: request per SUBSCRIBE_CONVERSATIONS, as debt the user's next requests wait
#: out -- on any connection, also one opened after closing all the others.
SUBSCRIBE_CONVERSATIONS = 50
#: Users with no connection left who still owe requests, kept until they
#: refilled (a full bucket is what a new one would be: dropping it is free).
OWING_PRUNE_AT = 1024


def list_cost(rows: int) -> int:
    """Requests a #listConversations page of ``rows`` rows counts as."""
    return 1 + max(0, rows - 1) // LIST_ROWS


def work_cost(req: Request) -> int:
    """Requests ``req`` counts as by the work it asks for (1 for most)."""
    if isinstance(req, ListConversations):
        return list_cost(req.limit)
    if isinstance(req, Subscribe):
        return 1 + max(0, len(req.cursors) - 1) // SUBSCRIBE_CURSORS
    return 1


def request_cost(size: int, nested: bool = False) -> int:
    """Requests a message of ``size`` bytes counts as: 1 up to 64 KiB, 16 for
    1 MiB; nested: 1 per 512 bytes up to 128 (its items are bounded)."""
    by_size = 1 + max(0, size - 1) // REQUEST_BYTES
    if not nested:
        return by_size
    return max(by_size, 1 + max(0, min(size, NESTED_MAX_BYTES) - 1) // NESTED_BYTES)


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

    def charge(self, n: float) -> None:
        """Take ``n`` tokens for work already done, into debt (at most one
        burst of it): what comes next waits until it is paid."""
        self.take(0)  # refill up to now
        self._level = max(-self.burst, self._level - n)

    @property
    def full(self) -> bool:
        self.take(0)
        return self._level >= self.burst

    def give(self, n: float) -> None:
        """Return ``n`` tokens taken for work that was not needed."""
        self._level = min(self.burst, self._level + n)


@dataclass
class _User:
    connections: int = 0
    requests: TokenBucket | None = None
    #: Open connections per device (a device reconnecting replaces its old one).
    devices: dict[str, int] = field(default_factory=dict)


@dataclass
class RateLimits:
    """Limits of one node.  A rate of 0 disables that limit."""

    connections_per_user: int = 20
    requests_per_connection: float = 200.0
    requests_per_user: float = 400.0
    #: RateLimited refusals a connection may collect (refilled at that many
    #: per minute) before it is closed; 0: never closed for it.
    rate_limit_strikes: int = 100
    clock: Callable[[], float] = field(default=trio.current_time)
    _users: dict[str, _User] = field(default_factory=dict)
    #: Users without connections whose request bucket is in debt (SUBSCRIBE_CONVERSATIONS).
    _owing: dict[str, _User] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)

    def connect(self, user: str, device: str | None = None) -> bool:
        """Count a new connection; False (and nothing counted) when over the limit.

        A device that already has a connection here is a replacement (the
        relay closes the older one), so it is admitted even at the limit."""
        entry = self._users.get(user) or self._owing.pop(user, None) or _User()
        self._users[user] = entry
        replacing = device is not None and entry.devices.get(device, 0) > 0
        limit = self.connections_per_user
        if limit and not replacing and entry.connections >= limit:
            self._count("TooManyConnections")
            return False
        entry.connections += 1
        if device is not None:
            entry.devices[device] = entry.devices.get(device, 0) + 1
        return True

    def disconnect(self, user: str, device: str | None = None) -> None:
        entry = self._users.get(user)
        if entry is None:
            return
        entry.connections -= 1
        if device is not None and device in entry.devices:
            entry.devices[device] -= 1
            if entry.devices[device] <= 0:
                del entry.devices[device]
        if entry.connections <= 0:
            del self._users[user]
            if entry.requests is not None and not entry.requests.full:
                self._keep_owing(user, entry)

    def _keep_owing(self, user: str, entry: _User) -> None:
        if len(self._owing) >= OWING_PRUNE_AT:  # amortized: runs once per that many
            self._owing = {u: e for u, e in self._owing.items() if not _paid(e)}
        entry.connections, entry.devices = 0, {}
        self._owing[user] = entry

    def refused(self, what: str) -> None:
        """Count a refusal decided elsewhere (across nodes, relay/cluster/presence.py)."""
        self._count(what)

    def connection_bucket(self) -> TokenBucket | None:
        rate = self.requests_per_connection
        return TokenBucket(rate, 2 * rate, self.clock) if rate else None

    def strike_bucket(self) -> TokenBucket | None:
        """Per connection: one token per RateLimited refusal; empty means close."""
        n = self.rate_limit_strikes
        return TokenBucket(n / 60.0, n, self.clock) if n else None

    def check_request(self, user: str, bucket: TokenBucket | None, cost: int = 1) -> None:
        """Raise RateLimited if this connection or this user is over its rate.

        ``cost`` is capped at a bucket's burst, so that a large message is
        slow to send but never impossible."""
        wait = bucket.take(min(cost, bucket.burst)) if bucket is not None else 0.0
        if not wait and self.requests_per_user:
            entry = self._users.setdefault(user, _User())
            if entry.requests is None:
                rate = self.requests_per_user
                entry.requests = TokenBucket(rate, 2 * rate, self.clock)
            wait = entry.requests.take(min(cost, entry.requests.burst))
        if wait:
            self._count("RateLimited")
            raise RateLimited(
                "too many requests; slow down", retry_after_ms=max(1, int(wait * 1000))
            )

    def charge_subscribed(self, user: str, conversations: int) -> None:
        """Charge the user for the conversations a #subscribe set up."""
        n = conversations // SUBSCRIBE_CONVERSATIONS
        entry = self._users.get(user)
        if n <= 0 or entry is None or not self.requests_per_user:
            return
        if entry.requests is None:
            rate = self.requests_per_user
            entry.requests = TokenBucket(rate, 2 * rate, self.clock)
        entry.requests.charge(n)

    def refund(self, user: str, bucket: TokenBucket | None, n: int) -> None:
        """Give back ``n`` of what check_request took (work not done)."""
        if n <= 0:
            return
        if bucket is not None:
            bucket.give(min(n, bucket.burst))
        entry = self._users.get(user)
        if entry is not None and entry.requests is not None:
            entry.requests.give(min(n, entry.requests.burst))

    def _count(self, what: str) -> None:
        self.rejected[what] = self.rejected.get(what, 0) + 1


def _paid(entry: _User) -> bool:
    return entry.requests is None or entry.requests.full
