"""Per-connection outgoing buffer: write directly, queue only on pushback.

Waking a writer task for every message and every recipient was the main CPU
cost of a naive Trio relay (~35 µs per delivery).  Instead, whoever produces
frames (the fan-out, the committer, the session) appends them here and calls
:meth:`Flusher.flush` once per batch: each dirty connection gets ONE
non-blocking ``send`` of everything it has pending.  Only when the kernel
buffer is full is a writer task started for that connection; it sleeps on
socket writability and ends once the kernel has taken everything.

The buffer is bounded in bytes, and every byte queued counts: live
messages, replays, replies, errors, pongs, pings, membership events.  A
frame that would pass the bound marks the connection too slow instead of
being queued (it is then closed with ConsumerTooSlow and recovers by
resuming from its cursor; a #result lost that way is harmless, the send is
durable and its retry gets the same seq).  Replays wait for room instead
(:meth:`Outbox.wait_room_for`), so a long backlog fills at most half the
bound.  Only the close frame may go past the bound, once.  Replies used to
bypass the bound: a client that sent requests and never read grew a node
by gigabytes.

Above PAUSE_AT of the bound the owner is told (``on_backlog(True)``) so it
can stop reading the connection, and again (``on_backlog(False)``) once the
queue drained to RESUME_AT: a client that does not read is not decoded at
full speed either (TCP backpressure does the rest).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import trio

#: Fractions of the bound where the owner pauses and resumes reading.
PAUSE_AT, RESUME_AT = 0.75, 0.5


class Outbox:
    """Pending frames of one connection.  Holds no task and no event while
    the socket keeps up: memory per idle connection matters at 10k+ sockets."""

    def __init__(self, fd: int, flusher: Flusher, limit: int) -> None:
        # A raw fd: os.write on a non-blocking socket is a plain send(2) that
        # never blocks the Trio thread and needs no task switch.
        self._fd = fd
        self._flusher = flusher
        self.limit = limit
        self._pause_at = int(limit * PAUSE_AT)
        self._resume_at = int(limit * RESUME_AT)
        self._backlogged = False
        self._pending: list[bytes] = []
        self._partial = False  # _pending[0] was partly sent already
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
        #: Called with True when the queue passes PAUSE_AT of the bound, with
        #: False when it drained back to RESUME_AT.
        self.on_backlog: Callable[[bool], None] = _ignore_flag
        #: Where the pushback writer runs; set by the owner while it is open.
        self.nursery: trio.Nursery | None = None

    @property
    def has_failed(self) -> bool:
        return self.overflowed or self.broken

    # --- producers ----------------------------------------------------------

    def write(self, data: bytes) -> bool:
        """Queue a frame; False (nothing queued, the owner told to close) if it
        would pass the bound.  A frame larger than the whole bound is queued
        only into an empty queue, so that it can be delivered at all."""
        if self.overflowed or self.broken:
            return False
        if self.pending_bytes and self.pending_bytes + len(data) > self.limit:
            self.overflowed = True
            self._progress()  # a replay waiting for room gives up
            self.on_fail()
            return False
        self._append(data)
        return True

    def write_control(self, data: bytes) -> bool:
        """Replies, errors, pongs, events: counted and bounded like live data
        (the name says who writes, not a privilege)."""
        return self.write(data)

    def write_final(self, data: bytes) -> None:
        """The close frame (at most 127 bytes): queued even past the bound,
        once, since nothing is queued after it."""
        if not self.broken:
            self._append(data)

    async def wait_room_for(self, size: int) -> None:
        """Replay waits here before each frame while the queue is over half
        the bound: a backlog of any length never fills more than that, and
        live traffic keeps the other half.  Returns at once if the
        connection failed (the write then says so)."""
        half = self.limit // 2
        while self._pending and self.pending_bytes + size > half and not self.has_failed:
            self._flusher.flush()  # what is queued must be on its way before we wait
            if self._pending and self.pending_bytes + size > half:
                await self._wait_progress()

    def _append(self, data: bytes) -> None:
        if not self._pending:
            self._flusher.mark(self)
        self._pending.append(data)
        self.pending_bytes += len(data)
        self.frames_out += 1
        if self.pending_bytes > self._pause_at and not self._backlogged:
            self._backlogged = True
            self.on_backlog(True)

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
        if self._backlogged and self.pending_bytes <= self._resume_at:
            self._backlogged = False
            self.on_backlog(False)

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
            self._partial = False
            self._progress()
            return
        # Keep frame boundaries (discard() needs them): skip the frames sent
        # whole, cut what was sent off the first one left.
        frames, skip, i = self._pending, sent, 0
        while skip >= len(frames[i]):
            skip -= len(frames[i])
            i += 1
        rest = frames[i:]
        if skip:
            rest[0] = rest[0][skip:]
        self._partial = skip > 0 or (i == 0 and self._partial)
        self._pending = rest
        self.pending_bytes -= sent
        if sent:
            self._progress()
        self._blocked = True
        if not self._writing and self.nursery is not None:
            self._writing = True
            self.nursery.start_soon(self._write_when_writable)

    def discard(self) -> None:
        """Drop every queued frame not yet begun: closing a client that did
        not read, the close frame should not wait behind what it never
        will (and that memory is freed now).  A frame partly sent is kept,
        or the close frame would be read as the rest of its payload."""
        keep = self._pending[:1] if self._partial else []
        self._pending = keep
        self.pending_bytes = len(keep[0]) if keep else 0

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


def _ignore_flag(flag: bool) -> None:
    pass


class Flusher:
    """Collects the outboxes written during a batch and flushes each once.

    Inside :meth:`batch` a ``flush()`` is deferred to the batch's end, so a
    committed batch (fan-out, membership events, every sender's ``#result``)
    leaves in one ``send`` per connection whoever asked to flush meanwhile."""

    def __init__(self) -> None:
        self._dirty: list[Outbox] = []
        self._holding = 0

    def mark(self, outbox: Outbox) -> None:
        self._dirty.append(outbox)

    def flush(self) -> None:
        if self._holding:
            return  # the enclosing batch flushes on its way out
        dirty, self._dirty = self._dirty, []
        for outbox in dirty:
            outbox.flush()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Synchronous code only (no await inside): nothing waits unflushed."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
            self.flush()
