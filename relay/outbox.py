"""Per-connection outgoing buffer: write directly, queue only on pushback.

Waking a writer task for every message and every recipient was the main CPU
cost of a naive Trio relay (~35 µs per delivery).  Instead, whoever produces
frames (the fan-out, the committer, the session) appends them here and calls
:meth:`Flusher.flush` once per batch: each dirty connection gets ONE
non-blocking ``send`` of everything it has pending.  Only when the kernel
buffer is full is a writer task started for that connection; it sleeps on
socket writability and ends once the kernel has taken everything.

The buffer is bounded in bytes.  Live traffic beyond the bound marks the
connection too slow (it is then closed with ConsumerTooSlow and recovers by
resuming from its cursor); replay traffic instead waits for room.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import trio


class Outbox:
    """Pending frames of one connection.  Holds no task and no event while
    the socket keeps up: memory per idle connection matters at 10k+ sockets."""

    def __init__(self, fd: int, flusher: Flusher, limit: int) -> None:
        # A raw fd: os.write on a non-blocking socket is a plain send(2) that
        # never blocks the Trio thread and needs no task switch.
        self._fd = fd
        self._flusher = flusher
        self.limit = limit
        self._pending: list[bytes] = []
        self.pending_bytes = 0
        self._blocked = False
        self._writing = False  # a pushback writer task is running
        self._room: trio.Event | None = None
        self.overflowed = False
        self.broken = False
        # Plain counters read by relay.metrics at scrape time (never per-call metrics).
        self.frames_out = 0
        self.bytes_out = 0
        #: Called once when the owner must close the connection (overflow or error).
        self.on_fail: Callable[[], None] = _ignore
        #: Where the pushback writer runs; set by the owner while it is open.
        self.nursery: trio.Nursery | None = None

    @property
    def has_failed(self) -> bool:
        return self.overflowed or self.broken

    # --- producers ----------------------------------------------------------

    def write(self, data: bytes) -> bool:
        """Queue live data; False (and nothing queued) if over the limit."""
        if self.overflowed or self.broken:
            return False
        if self.pending_bytes + len(data) > self.limit:
            self.overflowed = True
            self.on_fail()
            return False
        self._append(data)
        return True

    def write_control(self, data: bytes) -> None:
        """Queue a frame that must go out whatever the bound (replies, close)."""
        if not self.broken:
            self._append(data)

    def _append(self, data: bytes) -> None:
        if not self._pending:
            self._flusher.mark(self)
        self._pending.append(data)
        self.pending_bytes += len(data)
        self.frames_out += 1

    async def wait_for_room(self, low_water: int) -> None:
        """Replay waits here so a long backlog never overflows the buffer."""
        while self.pending_bytes > low_water and not (self.broken or self.overflowed):
            await self._wait_progress()

    async def _wait_progress(self) -> None:
        if self._room is None:
            self._room = trio.Event()
        await self._room.wait()

    def _progress(self) -> None:
        room, self._room = self._room, None
        if room is not None:
            room.set()

    # --- flushing -----------------------------------------------------------

    def flush(self) -> None:
        """One non-blocking write of everything pending (called by Flusher)."""
        if self._blocked or not self._pending or self.broken:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._fail()  # EPIPE, ECONNRESET, EBADF...: the socket is dead
            return
        self._consume(data, sent)

    def _consume(self, data: bytes, sent: int) -> None:
        self.bytes_out += sent
        if sent == len(data):
            self._pending.clear()
            self.pending_bytes = 0
            self._progress()
            return
        rest = data[sent:]
        self._pending = [rest]
        self.pending_bytes = len(rest)
        if sent:
            self._progress()
        self._blocked = True
        if not self._writing and self.nursery is not None:
            self._writing = True
            self.nursery.start_soon(self._write_when_writable)

    def _fail(self) -> None:
        self.broken = True
        self._pending.clear()
        self.pending_bytes = 0
        self._progress()
        self.on_fail()

    async def _write_when_writable(self) -> None:
        """Started only when the kernel pushed back; ends once it took everything."""
        try:
            while self._blocked and not self.broken:
                await trio.lowlevel.wait_writable(self._fd)
                self._blocked = False
                self.flush()
        finally:
            self._writing = False

    async def drain(self) -> None:
        """Write out everything queued (used while closing, under a deadline)."""
        self.flush()
        while self._pending and not self.broken:
            await trio.lowlevel.wait_writable(self._fd)
            self._blocked = False
            self.flush()


def _ignore() -> None:
    pass


class Flusher:
    """Collects the outboxes written during a batch and flushes each once."""

    def __init__(self) -> None:
        self._dirty: list[Outbox] = []

    def mark(self, outbox: Outbox) -> None:
        self._dirty.append(outbox)

    def flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for outbox in dirty:
            outbox.flush()
