"""Limits that hold across every node sharing a Redis, and the Redis they share.

:class:`SharedRedis` is the one Redis client behind the cross-node limits:
connection leases (:mod:`relay.cluster.presence`) and KeyPackage claim rates
(:class:`ClaimLimits`, here).  Every call is bounded by a Trio cancel scope
and may fail; the caller then answers from this node's own counts ("fail
open"), because a Redis outage must never stop a node from serving.  Such
fallbacks are counted (``relay_shared_limit_fallbacks_total{check}``), each
outage is logged once, and after a failure Redis is left alone for a short,
growing pause so that a hung Redis does not slow down every check.

Claim rates use GCRA (the generic cell rate algorithm: a token bucket kept as
one timestamp per key) in a Lua script, so one check is one atomic round trip
however many nodes race.  Times come from Redis' clock, never from the nodes'
(theirs may disagree).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import coredis
import trio
from coredis.commands import Script
from coredis.retry import NoRetryPolicy
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from protocol.errors import InvalidRequest, RateLimited

log = logging.getLogger("relay.sharedlimits")

T = TypeVar("T")
Client = coredis.Redis[bytes]

#: Labels of relay_shared_limit_fallbacks_total, one per kind of shared check.
CHECKS = ("connections", "claims", "online", "refresh", "release")

#: Lua: Redis' clock in milliseconds (shared by every script here and in presence).
LUA_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# KEYS[1]: the claimer's key, KEYS[2..]: one per target user.  ARGV: claimer
# period (ms per claim) and burst, then the same for targets; a period of 0
# disables that limit.  Returns {0, 0} when allowed, else {i, wait_ms} for the
# first key over its rate.  The claimer is charged when it is under its own
# rate (a refused claim still costs a claim); the targets are checked first
# and charged only if every one of them is under its rate, so a claim refused
# for one user takes nothing from the others -- exactly like the in-process
# buckets (TokenBuckets).  A key holds its "theoretical arrival time" and
# expires once that has passed (its bucket is full again).
_CLAIM: Script[bytes] = Script(
    script=LUA_NOW
    + """
local function wait_of(key, period, burst)
  local tat = math.max(tonumber(redis.call('GET', key)) or now, now)
  return tat, tat + period - burst * period - now
end
local function charge(key, tat, period)
  redis.call('SET', key, tostring(tat + period), 'PX', math.ceil(tat + period - now))
end
local cp, cb = tonumber(ARGV[1]), tonumber(ARGV[2])
if cp > 0 then
  local tat, wait = wait_of(KEYS[1], cp, cb)
  if wait > 0 then return {1, math.ceil(wait)} end
  charge(KEYS[1], tat, cp)
end
local tp, tb = tonumber(ARGV[3]), tonumber(ARGV[4])
if tp > 0 then
  local tats = {}
  for i = 2, #KEYS do
    local tat, wait = wait_of(KEYS[i], tp, tb)
    if wait > 0 then return {i, math.ceil(wait)} end
    tats[i] = tat
  end
  for i = 2, #KEYS do charge(KEYS[i], tats[i], tp) end
end
return {0, 0}
"""
)

#: Most distinct users one claim may name (WebSocket #claimKeyPackages and
#: POST /v1/keypackages/claim alike): each costs a rate-limit key, so padding
#: a claim with junk DIDs must not be free.
MAX_USERS_PER_CLAIM = 100


class SharedRedis:
    """The cross-node limits' Redis client; disabled (every call None) without a URL."""

    def __init__(
        self,
        url: str,
        prefix: str,
        *,
        name: str = "node",
        call_timeout: float = 1.0,
        max_pause: float = 5.0,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self._name = name
        self.call_timeout = call_timeout
        self._max_pause = max_pause
        self._client: Client | None = None
        #: After a failure no call is tried before this (trio clock): fail fast.
        self._paused_until = 0.0
        self._pause = 0.0
        self.up = True
        self.outages = 0
        self.fallbacks: Counter[str] = Counter()

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    def new_client(self, role: str) -> Client:
        return coredis.Redis.from_url(
            self.url,
            # Our callers fall back at once; coredis' own retries would only delay that.
            retry_policy=NoRetryPolicy(),
            client_name=f"{self._name}:{role}",
        )

    @asynccontextmanager
    async def connected(self) -> AsyncIterator[None]:
        """Keep the client open while the block runs (in the task that owns it).

        Entering does not connect: a node starts while Redis is down."""
        if not self.enabled:
            yield
            return
        async with self.new_client("limits") as client:
            self._client = client
            try:
                yield
            finally:
                self._client = None

    async def attempt(
        self, check: str, call: Callable[[Client], Awaitable[T]], *, probe: bool = False
    ) -> T | None:
        """``call(client)`` within ``call_timeout``.  None when it failed or was
        not tried (disabled, not connected, or paused after a failure; ``probe``
        ignores the pause); each such None of an enabled client is counted."""
        if not self.enabled:
            return None
        client = self._client
        if client is None or (not probe and trio.current_time() < self._paused_until):
            self.fallbacks[check] += 1
            return None
        try:
            with trio.fail_after(self.call_timeout):
                result = await call(client)
        except Exception as exc:  # coredis raises several kinds, sometimes grouped
            self._failed(exc)
            self.fallbacks[check] += 1
            return None
        if not self.up:
            log.info("Redis reachable again: connection and claim limits span all nodes")
        self.up, self._pause = True, 0.0
        return result

    def _failed(self, exc: BaseException) -> None:
        self._pause = min(self._max_pause, max(0.25, 2 * self._pause))
        self._paused_until = trio.current_time() + self._pause
        if self.up:  # once per outage
            self.up = False
            self.outages += 1
            log.warning(
                "Redis unreachable (%r): connection and claim limits count this node only "
                "until it is back",
                exc,
            )

    def register_metrics(self, registry: CollectorRegistry) -> None:
        registry.register(_Collector(self))


class _Collector(Collector):
    def __init__(self, redis: SharedRedis) -> None:
        self.redis = redis

    def collect(self) -> Iterator[Any]:
        fallbacks = CounterMetricFamily(
            "relay_shared_limit_fallbacks",
            "Cross-node limit checks answered by this node alone (Redis unreachable).",
            labels=["check"],
        )
        for check in CHECKS:
            fallbacks.add_metric([check], self.redis.fallbacks.get(check, 0))
        yield fallbacks
        yield CounterMetricFamily(
            "relay_shared_limit_outages",
            "Redis outages seen by the cross-node limits (each logged once).",
            value=self.redis.outages,
        )


class TokenBuckets:
    """Per-key token buckets: ``rate`` tokens per second, at most ``burst``.

    Forgetting a bucket must never hand its owner a fresh burst: only buckets
    that have refilled completely are dropped (they hold no state), and only
    when the table has doubled since the last sweep, so sweeping costs O(1)
    per take on average.  If the table still holds ``max_keys`` buckets that
    are all in use, a NEW key is refused for one token's time (fail closed
    for whoever brings new keys) rather than any existing bucket forgotten."""

    def __init__(
        self,
        rate: float,
        burst: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_keys: int = 50_000,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}
        self._sweep_at = 1024
        self._swept = -1e18

    def _level(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def wait(self, key: str, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens are there (0.0: now); takes nothing."""
        now = self.clock()
        if key not in self._buckets and not self._room():
            return 1 / self.rate if self.rate > 0 else float("inf")
        tokens = self._level(key, now)
        if tokens >= n:
            return 0.0
        return (n - tokens) / self.rate if self.rate > 0 else float("inf")

    def take(self, key: str, n: float = 1.0) -> float:
        """Take ``n`` tokens: 0.0 when allowed, else seconds until they would be."""
        wait = self.wait(key, n)
        if wait:
            return wait
        now = self.clock()
        self._buckets[key] = (self._level(key, now) - n, now)
        return 0.0

    def _room(self) -> bool:
        """Whether a new key may be added, after sweeping full buckets when the
        table has doubled since the last sweep (or, when it is at max_keys, at
        most once a second: a sweep of a full table costs ~10 ms)."""
        size, now = len(self._buckets), self.clock()
        if size >= self._sweep_at or (size >= self.max_keys and now - self._swept >= 1.0):
            full = [k for k in self._buckets if self._level(k, now) >= self.burst]
            for k in full:
                del self._buckets[k]
            self._swept = now
            self._sweep_at = max(1024, 2 * len(self._buckets))
        return len(self._buckets) < self.max_keys


class ClaimLimits:
    """KeyPackage claims per minute, per claimer and per target user.

    Across nodes through Redis when there is one; this node's own buckets
    otherwise, and while Redis is unreachable: the same rule either way (a
    claimer under its rate is charged; targets are charged only when all are
    under theirs).  A rate of 0 disables a limit."""

    def __init__(
        self,
        redis: SharedRedis,
        per_claimer: int,
        per_target: int,
        *,
        max_users: int = MAX_USERS_PER_CLAIM,
    ) -> None:
        self._redis = redis
        self._per_claimer = per_claimer
        self._per_target = per_target
        self.max_users = max_users
        self.claimers = TokenBuckets(per_claimer / 60, per_claimer)
        self.targets = TokenBuckets(per_target / 60, per_target)

    async def check(self, claimer: str, users: Sequence[str]) -> None:
        """Charge one claim; raise RateLimited (retryable, ``retry_after_ms``)
        when the claimer, or one of the users, is over its rate, and
        InvalidRequest when the claim names more than ``max_users`` users."""
        targets = list(dict.fromkeys(users))
        if len(targets) > self.max_users:
            raise InvalidRequest(f"a claim names at most {self.max_users} users", field="users")
        verdict = await self._redis.attempt("claims", lambda c: self._shared(c, claimer, targets))
        if verdict is None:
            verdict = self._local(claimer, targets)
        index, wait = verdict
        if index < 0:
            return
        retry_after_ms = int(wait * 1000) + 1
        if index == 0:
            raise RateLimited("too many claims", retry_after_ms=retry_after_ms)
        raise RateLimited(
            "too many claims for this user", user=targets[index - 1], retry_after_ms=retry_after_ms
        )

    def _local(self, claimer: str, targets: list[str]) -> tuple[int, float]:
        """(-1, 0) when allowed, else (0 for the claimer or 1 + target index, seconds)."""
        if self._per_claimer and (wait := self.claimers.take(claimer)):
            return 0, wait
        if self._per_target:
            for i, user in enumerate(targets, 1):
                if wait := self.targets.wait(user):
                    return i, wait
            for user in targets:
                self.targets.take(user)
        return -1, 0.0

    async def _shared(self, client: Client, claimer: str, targets: list[str]) -> tuple[int, float]:
        prefix = self._redis.prefix
        keys = [f"{prefix}claims:by:{claimer}", *(f"{prefix}claims:for:{u}" for u in targets)]
        args = [*_gcra(self._per_claimer), *_gcra(self._per_target)]
        index, wait_ms = await script_call(_CLAIM, keys, args)(client)
        return index - 1, wait_ms / 1000


def script_call(
    script: Script[bytes], keys: Sequence[str], args: Sequence[str | int | float]
) -> Callable[[Client], Awaitable[list[int]]]:
    """A call for :meth:`SharedRedis.attempt`: run ``script``, which returns integers."""

    async def call(client: Client) -> list[int]:
        reply: object = await script(keys=keys, args=args, client=client)
        if not isinstance(reply, list):
            raise TypeError(f"unexpected script reply {reply!r}")
        return [int(x) for x in reply]

    return call


def _gcra(per_minute: int) -> tuple[float, int]:
    """(milliseconds per claim, burst) of a per-minute rate; the burst is one minute's worth."""
    return (60_000 / per_minute if per_minute > 0 else 0.0), per_minute
