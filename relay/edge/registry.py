"""The node's session registry: at most one WebSocket per (user, device).

SSE streams are listed beside them, not by device.

A device that connects again displaces its older connection (1000 Replaced),
on this node directly and on other nodes through the fan-out
(``displace``/``on_displaced``, relay/cluster/redisbus.py): the registration
time orders the two, so the newer connection stays whichever node hears of
the other first.  One sweep task checks heartbeats and token expiry for
every registered connection (:meth:`Connection.tick`): timer tasks per
connection were a third of an idle connection's memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

import trio

from protocol.closecodes import CloseCode, CloseReason
from relay.delivery.connection import Connection
from relay.delivery.hub import Hub

Device = tuple[str, str]


class SessionRegistry:
    def __init__(
        self, hub: Hub, ping_interval_s: float, on_register: Callable[[str, str, float], None]
    ) -> None:
        self._hub = hub
        self._period = min(5.0, ping_interval_s / 2)
        #: Told of every registration (user, device, wall-clock time): the
        #: delivery state counts the device, the fan-out displaces it elsewhere.
        self._on_register = on_register
        self.sessions: dict[Device, Connection] = {}
        #: Wall-clock registration time per device, to order displacements.
        self._registered_at: dict[Device, float] = {}
        self._empty = trio.Event()
        #: Open SSE streams (relay/edge/sse.py).  Not by device: a stream
        #: displaces no one and is not swept (it times its token itself).
        self.event_streams: set[Connection] = set()
        self._stream_ended = trio.Event()

    def register(self, conn: Connection) -> Connection | None:
        """Register a device's connection; returns the one it displaces, if any."""
        key = (conn.user, conn.device)
        previous = self.sessions.get(key)
        self.sessions[key] = conn
        self._registered_at[key] = now = time.time()
        self._on_register(conn.user, conn.device, now)
        return previous

    def is_registered(self, conn: Connection) -> bool:
        return self.sessions.get((conn.user, conn.device)) is conn

    def forget(self, conn: Connection) -> None:
        """The connection ended (or never started): unregister it, unless a
        newer one of the device took its place, and leave the hub."""
        key = (conn.user, conn.device)
        if self.sessions.get(key) is conn:
            del self.sessions[key]
            self._registered_at.pop(key, None)
            if not self.sessions:
                self._empty.set()
        self._hub.remove(conn.streams, list(conn.streams.by_conversation))

    def displaced_elsewhere(self, user: str, device: str, registered_at: float) -> None:
        """Another node registered this device: close ours unless it is newer."""
        conn = self.sessions.get((user, device))
        if conn is not None and self._registered_at[(user, device)] < registered_at:
            conn.close(CloseCode.REPLACED, CloseReason.REPLACED)

    async def all_closed(self) -> None:
        while self.sessions:
            self._empty = trio.Event()
            await self._empty.wait()

    def stream_opened(self, conn: Connection) -> None:
        self.event_streams.add(conn)

    def stream_ended(self, conn: Connection) -> None:
        """An SSE stream's response ended (idempotent)."""
        self.event_streams.discard(conn)
        self._stream_ended.set()

    async def streams_ended(self, streams: Collection[Connection]) -> None:
        """Until each of ``streams`` has ended."""
        while any(conn in self.event_streams for conn in streams):
            self._stream_ended = trio.Event()
            await self._stream_ended.wait()

    async def sweep(self) -> None:
        """Heartbeats and token expiry for every connection, from one task."""
        while True:
            await trio.sleep(self._period)
            now, wall = trio.current_time(), time.time()
            for conn in list(self.sessions.values()):
                conn.tick(now, wall)
