"""One reader for all of a node's WebSockets.

A Trio task per connection costs a task wake-up, an epoll registration
change and a reschedule for every incoming frame: at 1,000 sends/s that was
a quarter of the event loop.  Instead the node keeps a private epoll set of
every session's socket; one task waits for that set to become readable,
reads every ready socket with a plain non-blocking ``os.read`` and hands the
bytes to the session synchronously.  This mirrors the write side
(relay.outbox), where one ``send`` per dirty connection follows each batch.

Backpressure: a session with too many requests in flight is paused (its fd
stays in the set with no events) and resumed when its replies went out; and
while the node's commit queue is congested, no socket is read at all (see
:meth:`relay.delivery.committer.Committer.congested`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
from typing import TYPE_CHECKING, Protocol

import trio

from relay.delivery.outbox import Flusher

if TYPE_CHECKING:
    from relay.delivery.committer import Committer

log = logging.getLogger("relay.reader")

READ_SIZE = 65536
MAX_EVENTS = 1024


class Readable(Protocol):
    def feed(self, data: bytes) -> None: ...

    def fail(self) -> None:
        """A bug while handling this connection's bytes: close it, alone."""


class NodeReader:
    def __init__(self, flusher: Flusher) -> None:
        self._epoll = select.epoll()
        self._flusher = flusher
        self._sessions: dict[int, Readable] = {}
        #: Set by the relay once its committer exists: reading waits while it is congested.
        self.committer: Committer | None = None
        self.throttled = 0

    def add(self, fd: int, session: Readable) -> None:
        self._sessions[fd] = session
        self._epoll.register(fd, select.EPOLLIN)

    def remove(self, fd: int) -> None:
        """Must be called before the socket is closed (fd numbers are reused)."""
        if self._sessions.pop(fd, None) is not None:
            # Already closed: the kernel dropped it from the set.
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def pause(self, fd: int) -> None:
        if fd in self._sessions:
            self._epoll.modify(fd, 0)

    def resume(self, fd: int) -> None:
        if fd in self._sessions:
            self._epoll.modify(fd, select.EPOLLIN)

    async def run(self) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(self._epoll.fileno())
                committer = self.committer
                if committer is not None and committer.congested:
                    self.throttled += 1
                    await committer.wait_calm()
                self._read_ready()
        finally:
            self._epoll.close()

    def _read_ready(self) -> None:
        for fd, _ in self._epoll.poll(0, MAX_EVENTS):
            session = self._sessions.get(fd)
            if session is None:
                continue
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                data = b""  # reset by the peer: same as end of stream
            try:
                session.feed(data)
            except Exception:
                # One connection's bug must not stop reading for everyone.
                log.exception("connection input failed")
                self.remove(fd)
                session.fail()
        # Replies and events produced while reading go out in one write each.
        self._flusher.flush()
