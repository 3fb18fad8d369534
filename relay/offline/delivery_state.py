"""Delivery state: which devices got which messages, kept off the hot path.

Delivering a message touches no table.  A session's streams already know,
per conversation, the next seq they will hand to the connection; once per
``RELAY_DELIVERY_FLUSH_S`` this tracker walks the node's sessions, collects
the positions that moved since the last round, and writes them in batches
of WRITE_CHUNK (``record_deliveries``), together with the devices that connected
(``touch_devices``: the recipients a sender's delivery state counts).

"Delivered" means handed to the device's connection; "acknowledged" comes
from the device's own ``#ack`` (its cursor).  A position the database did
not take (an outage) is retried next round: it only ever grows.  A row it
refuses for its data is dropped, alone, and never tried again.

The walk visits every session x conversation (1,000 x 200 took 90-190 ms
in one go, during which no socket of the node was served): it runs in
slices of at most WALK_SLICE_S, pausing WALK_PAUSE_S between them, on a
snapshot of the sessions and of each session's conversations (either may
change while it pauses), and allocates only for the positions that moved:
a round that built a new 200,000-entry map each time spent tens of ms at
once in the garbage collector and in freeing the old map.  What was
written is kept per device with a session here, per conversation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import trio

from protocol import text
from protocol.errors import Unavailable
from relay.base.incidents import isolate
from relay.base.logs import user_hash

if TYPE_CHECKING:
    from relay.base.incidents import Incidents
    from relay.delivery.connection import Connection
    from relay.delivery.streams import Stream
    from storage.base import Storage

log = logging.getLogger("relay.delivery")

#: Most devices remembered as connected-but-not-yet-recorded between rounds.
MAX_SEEN = 100_000
#: Most rows remembered as refused by storage (skipped without a new try).
MAX_POISONED = 10_000
#: The walk runs at most this long before letting others run...
WALK_SLICE_S = 0.002
#: ...for this long (a sleep, not a bare checkpoint: serving one HTTP request
#: takes several scheduler rounds, each of which would wait a whole slice).
WALK_PAUSE_S = 0.001
#: Streams visited between two looks at the clock.
WALK_STEP = 64
#: Delivery rows per write (and per look at the clock when remembering
#: them): building one write's parameters is loop work too.
WRITE_CHUNK = 2000

Device = tuple[str, str]
#: (user, device, conversation, position): one delivery-state row.
Row = tuple[str, str, bytes, int]


class _Slices:
    """Lets others run once WALK_SLICE_S has passed since the last pause."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    async def tick(self) -> None:
        if time.perf_counter() - self.started > WALK_SLICE_S:
            await trio.sleep(WALK_PAUSE_S)
            self.started = time.perf_counter()


class DeliveryTracker:
    def __init__(
        self,
        storage: Storage,
        sessions: Callable[[], Iterable[Connection]],
        incidents: Incidents,
        *,
        flush_s: float,
    ) -> None:
        self._storage = storage
        #: The node's sessions right now (walked on a snapshot each round).
        self._sessions = sessions
        self._incidents = incidents
        self._flush_s = flush_s
        self._seen: set[tuple[str, str]] = set()
        #: Positions written so far, per device with a session at the last
        #: round, per conversation: a round allocates only for what moved.
        self._recorded: dict[Device, dict[bytes, int]] = {}
        #: Keys ((user, device) or (user, device, conversation)) storage refused.
        self._poisoned: set[tuple[str | bytes, ...]] = set()
        self.rounds = 0
        self.rows_written = 0
        self.dropped = 0
        #: Streams (session x conversation) the last round visited.
        self.walked = 0

    def connected(self, user: str, device: str) -> None:
        """A device connected (synchronous; recorded at the next round)."""
        if len(self._seen) < MAX_SEEN:
            self._seen.add((user, device))

    async def _moved(self) -> tuple[list[Row], dict[Device, dict[bytes, Stream]]]:
        """The positions past what was written, and the devices walked (with
        their streams)."""
        moved: list[Row] = []
        live: dict[Device, dict[bytes, Stream]] = {}
        poisoned = self._poisoned
        slices = _Slices()
        self.walked = 0
        for session in list(self._sessions()):
            user, device = session.user, session.device
            streams = live[(user, device)] = session.streams.by_conversation
            recorded = self._recorded.get((user, device), {})
            conversations = list(streams)  # references only: no object per stream
            self.walked += len(conversations)
            for i in range(0, len(conversations), WALK_STEP):
                for conversation in conversations[i : i + WALK_STEP]:
                    stream = streams.get(conversation)  # gone while we paused: nothing to add
                    if stream is None or stream.next_seq - 1 <= recorded.get(conversation, 0):
                        continue
                    if not poisoned or (user, device, conversation) not in poisoned:
                        moved.append((user, device, conversation, stream.next_seq - 1))
                await slices.tick()
        return moved, live

    async def _remember(self, moved: list[Row], live: dict[Device, dict[bytes, Stream]]) -> None:
        """What was written, kept for the devices with a session here."""
        slices = _Slices()
        for i in range(0, len(moved), WRITE_CHUNK):
            for user, device, conversation, position in moved[i : i + WRITE_CHUNK]:
                self._recorded.setdefault((user, device), {})[conversation] = position
            await slices.tick()
        for key in [key for key in self._recorded if key not in live]:
            del self._recorded[key]
        for key, recorded in self._recorded.items():
            streams = live[key]
            if len(recorded) > len(streams):  # conversations the session left
                self._recorded[key] = {c: p for c, p in recorded.items() if c in streams}

    async def flush(self) -> None:
        """One round: write what moved.  Raises in an outage (Unavailable: the
        next round writes it all again).  A row storage refuses for its data is
        dropped alone -- logged once, counted, never tried again -- and the
        other rows of the round are still written (relay/base/incidents.py)."""
        seen, self._seen = self._seen, set()
        try:
            moved, live = await self._moved()
            await self._write(seen, moved)
        except BaseException:
            self._seen |= seen  # next round tries again; positions are recomputed anyway
            raise
        await self._remember(moved, live)
        self.rounds += 1

    async def _write(self, seen: set[Device], moved: list[Row]) -> None:
        now_ms = int(time.time() * 1000)
        storage = self._storage
        devices = sorted(pair for pair in seen if pair not in self._poisoned)

        async def touch(chunk: list[tuple[str, str]]) -> None:
            await storage.touch_devices(chunk, now_ms)

        async def record(chunk: list[tuple[str, str, bytes, int]]) -> None:
            await storage.record_deliveries(chunk, now_ms)

        await isolate(devices, touch, self._drop)
        for i in range(0, len(moved), WRITE_CHUNK):  # each a bounded bite of the loop
            rows = moved[i : i + WRITE_CHUNK]
            await isolate(rows, record, self._drop)
            self.rows_written += len(rows)

    def _drop(self, row: tuple[str, str] | tuple[str, str, bytes, int], exc: Exception) -> None:
        """A row storage refuses: skipped from now on (its key never changes)."""
        if len(self._poisoned) >= MAX_POISONED:
            self._poisoned.clear()  # a bound; a cleared row fails (and is dropped) once more
        self._poisoned.add(row[:3])
        what = f"user {user_hash(row[0])}, device {text.excerpt(row[1])}"
        self._incidents.drop("delivery_state", exc, what)
        self.dropped += 1

    async def run(self) -> None:
        period = self._flush_s
        while True:
            await trio.sleep(period)
            try:
                await self.flush()
            except Unavailable:
                log.warning("could not record delivery positions", exc_info=True)
            except Exception as exc:  # a bug: told, counted, and the next round runs
                self._incidents.report("delivery_state", exc, "a flush")
