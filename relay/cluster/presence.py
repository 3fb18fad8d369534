"""Who is connected, across every node: connection leases in Redis.

Each WebSocket connection holds a lease in its user's sorted set
``{prefix}conns:{user}``; the member names the device, the node and the
connection, the score is the lease's expiry (Redis' clock, ms).  Admission is
one Lua script: it drops expired leases, admits a device that already holds
one (the relay displaces its older connection), refuses when the user's other
devices hold ``connections_per_user`` leases, else adds the lease.

One task (:meth:`Presence.run`) refreshes every local lease each
``lease_ttl / 3`` in batched script calls and removes released leases as
connections close.  A node that dies without closing leaves leases that
expire after ``lease_ttl``; a node that stops cleanly removes its own.

Without Redis, and while it is unreachable, admission is this node's own count
(:class:`relay.base.ratelimits.RateLimits`): a Redis outage never stops a node from serving.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TypeVar

import trio
from coredis.commands import Script

from protocol import text
from protocol.errors import TooManyConnections
from relay.base.incidents import Incidents
from relay.base.ratelimits import RateLimits
from relay.cluster.sharedlimits import LUA_NOW, SharedRedis, script_call

log = logging.getLogger("relay.presence")

T = TypeVar("T")

#: Longest user or device name a lease takes (the token checks are tighter).
_MAX_NAME = 4096

#: Extends a user's set to its newest lease, so that an idle set expires by itself.
_KEEP = """
local function keep(key)
  local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if top[2] then redis.call('PEXPIREAT', key, math.ceil(tonumber(top[2]))) end
end
"""

# KEYS[1]: the user's leases.  ARGV: the new lease, its device prefix, the
# limit (0: none), the ttl in ms.  Returns {1, n} admitted or {0, n} refused,
# n = live leases of the user's other devices.
_ADMIT: Script[bytes] = Script(
    script=LUA_NOW
    + _KEEP
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local prefix, limit, ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local others, same = 0, false
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if string.sub(m, 1, #prefix) == prefix then same = true else others = others + 1 end
end
if limit > 0 and not same and others >= limit then return {0, others} end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
keep(KEYS[1])
return {1, others}
"""
)

# KEYS[i]: a user's leases, ARGV[1]: ttl ms, ARGV[i + 1]: our lease in KEYS[i].
# An upsert: a lease lost in an outage comes back with the next refresh.
_REFRESH: Script[bytes] = Script(
    script=LUA_NOW
    + _KEEP
    + """
local expiry = now + tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  redis.call('ZADD', key, expiry, ARGV[i + 1])
  keep(key)
end
return {#KEYS}
"""
)

# KEYS[i]: a user's leases, ARGV[i]: a lease to remove from it.
_RELEASE: Script[bytes] = Script(
    script="""
for i, key in ipairs(KEYS) do redis.call('ZREM', key, ARGV[i]) end
return {#KEYS}
"""
)

# KEYS[i]: a user's leases, ARGV[i]: a device prefix.  Returns 1 or 0 per key:
# whether that device holds a live lease.
_ONLINE: Script[bytes] = Script(
    script=LUA_NOW
    + """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = 0
  local prefix = ARGV[i]
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, string.format('(%d', now), '+inf')) do
    if string.sub(m, 1, #prefix) == prefix then out[i] = 1; break end
  end
end
return out
"""
)


@dataclass(eq=False, slots=True)
class Lease:
    """One admitted connection; give it back with :meth:`Presence.release`."""

    user: str
    device: str
    member: str


def _device_prefix(device: str) -> str:
    # Length-prefixed, so that no other device's member starts with it.
    return f"{len(device.encode())}:{device}\x00"


class Presence:
    """Connection admission and presence for one node."""

    def __init__(
        self,
        limits: RateLimits,
        redis: SharedRedis,
        node_id: str,
        *,
        lease_ttl: float = 30.0,
        max_batch: int = 500,
        max_pending: int = 100_000,
        incidents: Incidents | None = None,
    ) -> None:
        self._limits = limits
        self.redis = redis
        self._node_id = node_id
        #: Seconds a lease lives without refresh (how long a dead node's slots stay taken).
        self.lease_ttl = lease_ttl
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._leases: dict[str, Lease] = {}
        self._devices: Counter[tuple[str, str]] = Counter()
        #: (key, member, released at) of released leases not yet removed from Redis.
        self._released: list[tuple[str, str, float]] = []
        #: Where a dropped release is counted (the node's, in a relay).
        self.incidents = Incidents() if incidents is None else incidents
        self._wake = trio.Event()

    @property
    def limit(self) -> int:
        return self._limits.connections_per_user

    def _key(self, user: str) -> str:
        return f"{self.redis.prefix}conns:{user}"

    # --- admission ---------------------------------------------------------------

    async def admit(self, user: str, device: str) -> Lease:
        """A lease for a new connection (WebSocket or SSE stream), or
        TooManyConnections (counted) when the user is at the limit -- this
        node's count first, then every node's."""
        lease = await self._admit(user, device)
        if lease is None:
            raise TooManyConnections(f"at most {self.limit} connections per user")
        return lease

    async def _admit(self, user: str, device: str) -> Lease | None:
        # Everything that can fail on the text comes before anything is counted:
        # a user or device Redis cannot encode once took a slot that was never
        # given back, and stuck in the release queue (the edge refuses it first:
        # relay/edge/auth.py; this is the backstop).
        text.storable(user, "user", _MAX_NAME, empty=False)
        text.storable(device, "device", _MAX_NAME, empty=False)
        member = f"{_device_prefix(device)}{self._node_id}\x00{secrets.token_hex(8)}"
        lease = Lease(user, device, member)
        args: list[str | int] = [member, _device_prefix(device), self.limit, self._ttl_ms()]
        if not self._limits.connect(user, device):
            return None
        try:
            reply = await self.redis.attempt(
                "connections", script_call(_ADMIT, [self._key(user)], args)
            )
        except BaseException:  # cancelled mid-call: the script may have added it
            self._limits.disconnect(user, device)
            self._remove(lease)
            raise
        if reply is not None and reply[0] == 0:
            self._limits.disconnect(user, device)
            self._limits.refused("TooManyConnections")
            return None
        # Held (and so refreshed) only once admitted: a refresh must never
        # upsert a lease that the script is about to refuse.
        self._leases[member] = lease
        self._devices[(user, device)] += 1
        return lease  # admitted everywhere, or by this node alone (Redis unreachable)

    def release(self, lease: Lease) -> None:
        """The connection closed (synchronous: safe in a cancelled task's finally)."""
        if self._leases.pop(lease.member, None) is None:
            return
        self._limits.disconnect(lease.user, lease.device)
        pair = (lease.user, lease.device)
        self._devices[pair] -= 1
        if self._devices[pair] <= 0:
            del self._devices[pair]
        self._remove(lease)

    def _remove(self, lease: Lease) -> None:
        """Remove the lease from Redis soon (the maintenance task batches removals)."""
        if not self.redis.enabled:
            return
        key = self._key(lease.user)
        if not _encodable(key) or not _encodable(lease.member):
            # It could never be sent, and would fail every batch it shares.
            self.incidents.drop("lease_release", ValueError("not UTF-8"), "a lease")
            return
        if len(self._released) < self._max_pending:  # beyond that they expire
            self._released.append((key, lease.member, trio.current_time()))
        self._wake.set()

    # --- presence -------------------------------------------------------------------

    async def online(self, pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these (user, device) pairs are connected to any node.

        This node's connections always count; others are known from live
        leases.  Without Redis, or while it is unreachable, only this node's."""
        found = {pair for pair in pairs if pair in self._devices}
        rest = [pair for pair in dict.fromkeys(pairs) if pair not in found]
        for chunk in _batches(rest if self.redis.enabled else [], self._max_batch):
            keys = [self._key(user) for user, _ in chunk]
            devices = [_device_prefix(device) for _, device in chunk]
            flags = await self.redis.attempt("online", script_call(_ONLINE, keys, devices))
            if flags is None:
                break
            found.update(pair for pair, flag in zip(chunk, flags, strict=True) if flag)
        return found

    # --- the maintenance task ----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the shared Redis client open, refresh this node's leases and
        remove released ones; at the end, remove every lease of this node."""
        async with self.redis.connected():
            task_status.started()
            if not self.redis.enabled:
                return
            try:
                await self._maintain()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await self._release_all()

    async def _maintain(self) -> None:
        due = trio.current_time() + self.lease_ttl / 3
        while True:
            with trio.move_on_at(due):
                await self._wake.wait()
            self._wake = trio.Event()
            if self._released:
                await self._flush_released()
            if trio.current_time() >= due:
                period = self.lease_ttl / 3
                # After a failure retry sooner: a missed refresh eats into the ttl.
                due = trio.current_time() + (period if await self._refresh() else min(period, 1))

    async def _refresh(self) -> bool:
        for chunk in _batches(self._held(), self._max_batch):
            keys, members = _split(chunk)
            call = script_call(_REFRESH, keys, [self._ttl_ms(), *members])
            if await self.redis.attempt("refresh", call, probe=True) is None:
                return False
        return True

    async def _flush_released(self) -> None:
        while self._released:
            chunk = self._released[: self._max_batch]
            pairs = [(key, member) for key, member, _ in chunk]
            if await self.redis.attempt("release", script_call(_RELEASE, *_split(pairs))) is None:
                # Kept for the next wake-up, but never retried past the lease's
                # own expiry: by then Redis dropped it anyway.
                stale = trio.current_time() - self.lease_ttl
                self._released = [r for r in self._released if r[2] > stale]
                return
            del self._released[: len(chunk)]

    async def _release_all(self) -> None:
        """Stopping: remove every lease of this node.  A fresh client, since
        the cancellation that stops us also stopped the shared one's connections."""
        pending = [(key, member) for key, member, _ in self._released] + self._held()
        if not pending:
            return
        try:
            async with self.redis.new_client("bye") as client:
                for chunk in _batches(pending, self._max_batch):
                    await script_call(_RELEASE, *_split(chunk))(client)
        except Exception as exc:
            log.warning(
                "could not remove this node's connection leases (they expire in %gs): %r",
                self.lease_ttl,
                exc,
            )

    def _held(self) -> list[tuple[str, str]]:
        """(key, member) of every lease this node holds."""
        return [(self._key(lease.user), lease.member) for lease in self._leases.values()]

    def _ttl_ms(self) -> int:
        return max(1, int(self.lease_ttl * 1000))


def _encodable(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _split(pairs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    return [key for key, _ in pairs], [member for _, member in pairs]


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk
