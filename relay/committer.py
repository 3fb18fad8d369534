"""Group commit: one transaction for the sends that arrive together.

Sessions submit sends into a bounded channel (a full channel blocks the
submitting connection's reader: backpressure, not loss).  One committer task
takes everything waiting, up to ``max_batch``, stores it in ONE storage
transaction, and only after the commit: publishes the new messages to the
fan-out in seq order, then acknowledges each sender.  While a commit is in
flight the next batch accumulates, so batches grow with load and a lone send
still commits immediately.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from protocol.errors import RelayError
from storage.base import Appended, NewMessage, Storage

from .fanout import FanOut
from .hub import MembershipChange, Published
from .outbox import Flusher


@dataclass(slots=True)
class PendingSend:
    message: NewMessage
    #: Called exactly once, after the commit (or its failure).
    on_done: Callable[[Appended | RelayError], None]
    #: Returns True when the submitter is gone: its send is then never stored.
    abandoned: Callable[[], bool]


class Committer:
    def __init__(
        self,
        storage: Storage,
        fanout: FanOut,
        flusher: Flusher,
        *,
        max_batch: int = 512,
        queue: int = 4096,
    ) -> None:
        self._storage = storage
        self._fanout = fanout
        self._flusher = flusher
        self._max_batch = max_batch
        self._send, self._receive = trio.open_memory_channel[PendingSend](queue)
        self.batches = 0
        self.committed = 0
        self.in_flight = 0
        #: Called once per batch after its fan-out and acks (relay.metrics
        #: latency histograms): per batch, never per recipient.
        self.observer: Callable[[list[PendingSend], float], None] | None = None
        #: Set when the committer stopped after close(): every queued send is committed.
        self.drained = trio.Event()

    async def submit(self, item: PendingSend) -> None:
        await self._send.send(item)

    async def run(self) -> None:
        async with self._receive:
            async for first in self._receive:  # ends once close() was called and all is taken
                batch = [first]
                while len(batch) < self._max_batch:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                await self._commit([p for p in batch if not p.abandoned()])
        self.drained.set()

    async def _commit(self, batch: list[PendingSend]) -> None:
        if not batch:
            return
        self.in_flight = len(batch)
        try:
            results: list[Appended | RelayError] = await self._storage.append_messages(
                [p.message for p in batch]
            )
        except RelayError as exc:
            results = [exc] * len(batch)
        finally:
            self.in_flight = 0
        committed_at = time.time()
        self.batches += 1
        fresh: list[Published] = []
        for pending, outcome in zip(batch, results, strict=True):
            if isinstance(outcome, Appended) and not outcome.duplicate:
                m = pending.message
                fresh.append(
                    Published(
                        m.conversation,
                        outcome.seq,
                        m.sender,
                        m.device,
                        outcome.created_ms,
                        m.ciphertext,
                    )
                )
        self.committed += len(fresh)
        if fresh:
            self._fanout.publish(fresh)
        for pending, outcome in zip(batch, results, strict=True):
            # An MLS commit that won changed the members (relay/mls_ds.py): announce
            # it after the commit itself, so joiners follow from the next seq.
            if isinstance(outcome, Appended) and (outcome.added or outcome.removed):
                self._fanout.publish_membership(
                    MembershipChange(
                        pending.message.conversation,
                        pending.message.sender,
                        tuple((user, outcome.seq) for user in outcome.added),
                        outcome.removed,
                        outcome.seq,
                    )
                )
        for pending, outcome in zip(batch, results, strict=True):
            pending.on_done(outcome)
        self._flusher.flush()
        if self.observer is not None:
            self.observer(batch, committed_at)

    def queued(self) -> int:
        return self._receive.statistics().current_buffer_used

    def close(self) -> None:
        """Stop accepting sends; queued ones are still committed by run()."""
        self._send.close()
