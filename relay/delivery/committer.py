"""Group commit: one transaction for the sends that arrive together.

Sessions submit sends into a bounded queue (from half full the node stops
reading sockets; a send that still finds it full waits in its session:
backpressure, not loss).  One committer task
takes everything waiting, up to ``max_batch``, stores it in ONE storage
transaction, and only after the commit: publishes the new messages to the
fan-out in seq order, then acknowledges each sender.  While a commit is in
flight the next batch accumulates, so batches grow with load.

A batch may also wait a little (``linger``, RELAY_COMMIT_LINGER_MS) for the
sends that follow its first one, counted from that first send's arrival.
When commits are quick (a fast disk at light load) every batch would
otherwise hold two or three sends, and the fixed cost of a commit (the thread
hop, the round trip, PostgreSQL's commit record and WAL flush) was most of
the CPU per message.  Lingering never delays a send by more than ``linger``
beyond what it would have waited anyway: a send that arrived during the
previous commit has already waited that long and goes at once, and a full
batch goes at once.

One bad item fails alone: a batch that storage refuses for its data (not an
outage) is split in halves until the refused item is alone, and everything
else commits.  And the committer is supervised: an unexpected exception
anywhere in a batch is one logged incident (relay/base/incidents.py) and a
retryable ``InternalError`` carrying its id for that batch's senders, and the
committer goes on.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from protocol.errors import RelayError, ShuttingDown, Unavailable
from relay.base.incidents import Incidents
from relay.delivery.fanout import FanOut
from relay.delivery.hub import MembershipChange, Published
from relay.delivery.outbox import Flusher
from storage.base import Appended, NewMessage, Storage


@dataclass(slots=True)
class PendingSend:
    message: NewMessage
    #: Answers the sender (writes its #result or error, Session._commit):
    #: called exactly once, after the commit (or its failure).
    answer: Callable[[Appended | RelayError], None]
    #: Returns True when the submitter is gone: its send is then never stored.
    abandoned: Callable[[], bool]
    #: Set when answer was called (the committer answers each send once).
    answered: bool = False


class Committer:
    def __init__(
        self,
        storage: Storage,
        fanout: FanOut,
        flusher: Flusher,
        *,
        max_batch: int = 512,
        queue: int = 4096,
        linger: float = 0.0,
        incidents: Incidents | None = None,
        observer: Callable[[list[PendingSend], float], None] | None = None,
        on_published: Callable[[list[Published]], None] | None = None,
    ) -> None:
        self._storage = storage
        self._fanout = fanout
        self._flusher = flusher
        self._max_batch = max_batch
        # A deque and one event per batch instead of a memory channel: submit()
        # is a plain append, with no task switch per send.
        self._queue: deque[PendingSend] = deque()
        self._limit = queue
        self._arrived = trio.Event()
        self._linger = linger
        #: trio.current_time() when the queue last went from empty to not empty.
        self._first_at = 0.0
        #: Set when the queue holds a full batch (ends a linger early).
        self._full = trio.Event()
        self._closed = False
        self.batches = 0
        self.committed = 0
        #: Batches split because one of their items failed (see _append).
        self.splits = 0
        #: Where unexpected failures are logged and counted (the node's, in a relay).
        self.incidents = incidents or Incidents()
        #: Called once per batch after its fan-out and acks (relay.metrics
        #: latency histograms): per batch, never per recipient.
        self.observer = observer
        #: Called with each batch's new messages after their fan-out (synchronous).
        self.on_published = on_published
        #: Set when the committer stopped after close(): every queued send is committed.
        self.drained = trio.Event()
        # Overload: above half the queue the node stops reading sockets (see
        # NodeReader) until the queue is back under an eighth.  Reading,
        # decoding and refusing sends the database cannot take cost the CPU
        # that delivery needs; unread bytes wait in TCP buffers instead.
        self._high = max(1, queue // 2)
        self._low = queue // 8
        self._calm = trio.Event()
        self._calm.set()
        #: Set whenever a batch leaves the queue (sessions waiting for room).
        self._room = trio.Event()

    def submit(self, item: PendingSend) -> None:
        """Queue a send (synchronous).  Refused, retryably, when draining or full:
        it was never stored, so the client resends with the same id."""
        if self._closed:
            item.answer(ShuttingDown("relay is shutting down; send again elsewhere"))
        elif self.full:
            item.answer(Unavailable("the commit queue is full; retry shortly"))
        else:
            queue = self._queue
            if not queue:
                self._first_at = trio.current_time()
            queue.append(item)
            self._arrived.set()
            if len(queue) >= self._max_batch:
                self._full.set()
            if len(queue) >= self._high and self._calm.is_set():
                self._calm = trio.Event()

    @property
    def full(self) -> bool:
        """submit() would refuse: sessions hold their sends until wait_room()."""
        return len(self._queue) >= self._limit and not self._closed

    async def wait_room(self) -> None:
        """Until the queue can take a send (or the committer is closing)."""
        while self.full:
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()

    @property
    def congested(self) -> bool:
        return not self._calm.is_set()

    async def wait_calm(self) -> None:
        """Until the commit queue is back under its low-water mark."""
        await self._calm.wait()

    async def run(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                if self._closed:
                    break  # close() was called and everything queued is committed
                await self._arrived.wait()
                self._arrived = trio.Event()
                continue
            if self._linger and len(queue) < self._max_batch and not self._closed:
                await self._gather(self._first_at + self._linger)
            n = min(len(queue), self._max_batch)
            batch = [queue.popleft() for _ in range(n)]
            self._room.set()
            if len(queue) <= self._low:
                self._calm.set()
            live = [p for p in batch if not p.abandoned()]
            try:
                await self._commit(live)
            except Exception as exc:  # last resort: the committer outlives any bug
                incident = self.incidents.report("committer", exc, "a batch")
                for pending in live:
                    self._answer(pending, incident)
        self.drained.set()

    async def _gather(self, deadline: float) -> None:
        """Let more sends join the batch until ``deadline`` or a full batch."""
        if trio.current_time() >= deadline:
            return
        self._full = trio.Event()
        if len(self._queue) >= self._max_batch:
            return
        with trio.move_on_at(deadline):
            await self._full.wait()

    async def _commit(self, batch: list[PendingSend]) -> None:
        """Store one batch, publish what is new, answer every sender exactly once.

        Supervised: whatever goes wrong after the commit (a bug in the fan-out,
        a hook, a callback) is one logged incident and a retryable error for
        the senders not yet answered; the committer goes on with the next
        batch.  A resend is safe: the idempotency key finds the stored copy."""
        if not batch:
            return
        results = await self._append(batch)
        committed_at = time.time()
        self.batches += 1
        try:
            # One flush for the batch: the fan-out's frames, membership events
            # and every sender's #result leave in one send per connection.
            with self._flusher.batch():
                self._publish_and_answer(batch, results)
            if self.observer is not None:
                self.observer(batch, committed_at)
        except Exception as exc:
            self.incidents.report("committer", exc, "after answering a batch")

    async def _append(self, batch: list[PendingSend]) -> list[Appended | RelayError]:
        """append_messages, with a batch that fails on its data split in halves
        until the item storage refuses is alone: the others commit, only that
        one gets an error.  A failed statement stores nothing (one transaction
        on both backends), so the halves never store an item twice; should a
        failure come after a commit, the idempotency key answers the retry
        with the stored seq (duplicate).  An outage is never split: every
        half would fail the same way."""
        try:
            results = await self._storage.append_messages([p.message for p in batch])
        except Unavailable as exc:
            return [exc] * len(batch)
        except Exception as exc:  # StorageError, InternalBug, any bug below: not an outage
            if len(batch) == 1:
                return [self.incidents.report("committer", exc, "a send storage refused")]
            self.splits += 1
            mid = len(batch) // 2
            first = await self._append(batch[:mid])
            return first + await self._append(batch[mid:])
        if len(results) != len(batch):  # committed, but we cannot tell who got what
            incident = self.incidents.report(
                "committer", None, f"{len(results)} results for {len(batch)} sends"
            )
            return [incident] * len(batch)
        return results

    def _publish_and_answer(
        self, batch: list[PendingSend], results: list[Appended | RelayError]
    ) -> None:
        try:
            self._publish(batch, results)
        except Exception as exc:
            incident = self.incidents.report(
                "committer", exc, f"publishing a committed batch of {len(batch)}"
            )
            results = [incident if isinstance(r, Appended) else r for r in results]
        for pending, outcome in zip(batch, results, strict=True):
            self._answer(pending, outcome)

    def _publish(self, batch: list[PendingSend], results: list[Appended | RelayError]) -> None:
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
                        m.blob_key,
                        m.blob_size,
                    )
                )
        self.committed += len(fresh)
        if fresh:
            self._fanout.publish(fresh)
            if self.on_published is not None:  # push for offline devices (relay/offline/push.py)
                self.on_published(fresh)
        for pending, outcome in zip(batch, results, strict=True):
            # An MLS commit that won changed the members (relay/mls/service.py): announce
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

    def _answer(self, pending: PendingSend, outcome: Appended | RelayError) -> None:
        """Call the sender's answer once; a callback that raises is an incident
        of its own and does not keep the batch's other senders waiting."""
        if pending.answered:
            return
        pending.answered = True
        try:
            pending.answer(outcome)
        except Exception as exc:
            self.incidents.report("committer", exc, "a sender's callback")

    def queued(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        """Stop accepting sends; queued ones are still committed by run()."""
        self._closed = True
        self._arrived.set()
        self._room.set()  # waiting sessions submit, and are refused retryably
        self._calm.set()  # shutting down: read on (sends are refused anyway)
