"""Fan-out between relay nodes through Redis pub/sub (coredis, native on Trio).

Every node publishes what it committed to ONE channel, ``{prefix}fanout``,
and every node subscribes to it.  A node never waits for Redis to deliver to
its own connections: :meth:`RedisFanOut.publish` hands events to the local hub
first, then queues them for Redis; the subscriber skips batches carrying this
process's instance id.

Redis carries fan-out only.  PostgreSQL is the source of truth and the
subscriber side of :mod:`relay.delivery.streams` repairs any seq gap from it, so the
bus may lose or reorder messages (two publishers race; a node reconnects)
without breaking exactly-once, in-order delivery.  What the bus must do is
make sure a loss is *noticed* even when no later message follows it:

* events it could not publish (buffer full, Redis down) are remembered as
  ``conversation -> highest lost seq`` and announced with a ``repair`` event
  once publishing works again; receivers make the affected streams re-read
  storage (:meth:`relay.delivery.hub.Hub.repair`);
* after its subscription was interrupted, a node cannot know what it missed:
  it makes every local stream re-check storage.

Membership changes and displacement notices are few and not repairable from a
seq, so they are retained (up to a bound) across an outage rather than dropped.
Ephemeral messages are best effort, as on a single node.

This module does the I/O, buffering and loss accounting; the wire format
(events as tagged CBOR lists, several per PUBLISH) and the delivery of a
received batch to the hub are in :mod:`relay.cluster.buswire`.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import coredis
import trio
from coredis.retry import NoRetryPolicy

import relay.cluster.buswire as buswire
from relay.delivery.fanout import FanOut
from relay.delivery.hub import Ephemeral, Hub, MembershipChange, Published, ReadMark

log = logging.getLogger("relay.redisbus")

#: Approximate per-event overhead added to ciphertext sizes for buffer accounting.
_OVERHEAD = 96


@dataclass
class BusStats:
    published_events: int = 0
    published_batches: int = 0
    received_events: int = 0
    #: Events not published (buffer full or Redis unavailable); repaired from storage.
    dropped: int = 0
    malformed: int = 0
    repairs_sent: int = 0
    repairs_received: int = 0
    resubscribes: int = 0
    #: Peers that went silent (crashed, or lost Redis): everything was re-checked.
    peers_lost: int = 0


class RedisFanOut(FanOut):
    def __init__(
        self,
        hub: Hub,
        url: str,
        prefix: str,
        *,
        node_id: str = "",
        on_displaced: Callable[[str, str, float], None] | None = None,
        buffer_events: int = 50_000,
        buffer_bytes: int = 64 * 1024 * 1024,
        batch_events: int = 512,
        batch_bytes: int = 1024 * 1024,
        publish_timeout: float = 5.0,
        max_backoff: float = 2.0,
        heartbeat: float = 1.0,
        peer_timeout: float = 4.0,
    ) -> None:
        self._hub = hub
        self._url = url
        self.channel = f"{prefix}fanout"
        self._client_name = f"{prefix}{node_id or 'node'}"
        self.instance = secrets.token_bytes(8)  # unique per process, unlike node ids
        self._on_displaced = on_displaced
        #: Told the commit time (ms) of the oldest message of each batch that
        #: arrives from another node (relay_fanout_lag_seconds).
        self.observe_lag: Callable[[int], None] | None = None
        self._buffer_events = buffer_events
        self._buffer_bytes = buffer_bytes
        self._batch_events = batch_events
        self._batch_bytes = batch_bytes
        self._publish_timeout = publish_timeout
        self._max_backoff = max_backoff
        self._heartbeat = heartbeat
        self._peer_timeout = peer_timeout
        #: Other nodes' instance ids -> when we last heard from them.
        self._peers: dict[bytes, float] = {}
        # (event, size, retained): retained events survive a failed publish.
        self._queue: deque[tuple[list[Any], int, bool]] = deque()
        self._queued_bytes = 0
        self._lost: dict[bytes, int] = {}
        self._lost_all = False
        self._wake = trio.Event()
        self._publisher_ok = False
        self._subscriber_ok = False
        self.stats = BusStats()

    # --- FanOut (synchronous; never blocks the committer) --------------------

    def publish(self, messages: list[Published]) -> None:
        self._hub.publish(messages)  # local delivery never waits for Redis
        for m in messages:
            if not self._enqueue(buswire.message(m), len(m.ciphertext)):
                self._note_lost(m.conversation, m.seq)

    def publish_ephemeral(self, message: Ephemeral) -> None:
        self._hub.publish_ephemeral(message)
        if not self._enqueue(buswire.ephemeral(message), len(message.ciphertext)):
            self.stats.dropped += 1  # best effort, like on one node

    def publish_membership(self, change: MembershipChange) -> None:
        self._hub.publish_membership(change)
        self._enqueue(buswire.membership(change), 0, retained=True)

    def publish_read(self, mark: ReadMark) -> None:
        self._hub.publish_read(mark)
        if not self._enqueue(buswire.read_mark(mark), 0):
            self.stats.dropped += 1  # live only, like ephemerals; #readPositions has them

    def displace(self, user: str, device: str, registered_at: float) -> None:
        self._enqueue(buswire.displace(user, device, registered_at), 0, retained=True)

    @property
    def healthy(self) -> bool:
        return self._publisher_ok and self._subscriber_ok and not self._lost_pending()

    def _enqueue(self, event: list[Any], size: int, *, retained: bool = False) -> bool:
        size += _OVERHEAD
        limit = self._buffer_events * (2 if retained else 1)
        if len(self._queue) >= limit or (
            not retained and self._queued_bytes + size > self._buffer_bytes
        ):
            self.stats.dropped += 1
            return False
        self._queue.append((event, size, retained))
        self._queued_bytes += size
        self._wake.set()
        return True

    def _note_lost(self, conversation: bytes, seq: int) -> None:
        if self._lost_all:
            return
        if len(self._lost) >= self._buffer_events and conversation not in self._lost:
            self._lost_all, self._lost = True, {}  # too many to list: everyone re-checks
            return
        if self._lost.get(conversation, 0) < seq:
            self._lost[conversation] = seq
        self._wake.set()

    def _lost_pending(self) -> bool:
        return self._lost_all or bool(self._lost)

    # --- tasks -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publisher and subscriber.  Reports started once the first subscription
        attempt finished either way: a node without Redis still serves its own
        clients, and the repair on reconnect covers what it missed."""
        async with self._new_client("pub") as client, trio.open_nursery() as nursery:
            await nursery.start(self._subscriber)
            nursery.start_soon(self._watch_peers)
            task_status.started()
            try:
                await self._publisher(client)
            finally:
                # Shutdown: what the committer published last must still reach
                # the other nodes, or their clients wait for the next message;
                # then say goodbye so that they do not take us for crashed.
                # A fresh client: the cancellation that stops us also stopped
                # the connection tasks of the first one.
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    self._enqueue(buswire.bye(), 0, retained=True)
                    try:
                        async with self._new_client("bye") as last:
                            while self._queue or self._lost_pending():
                                if not await self._publish_batch(last):
                                    break
                    except Exception as exc:
                        log.warning("could not flush fan-out at shutdown: %r", exc)
                nursery.cancel_scope.cancel()

    def _new_client(self, role: str) -> coredis.Redis[bytes]:
        return coredis.Redis.from_url(
            self._url,
            retry_policy=NoRetryPolicy(),  # a retried PUBLISH could deliver twice
            connect_timeout=5,
            client_name=f"{self._client_name}:{role}",
        )

    async def _publisher(self, client: coredis.Redis[bytes]) -> None:
        backoff = 0.05
        while True:
            if not self._queue and not self._lost_pending():
                # Idle: an empty batch after ``heartbeat`` tells peers we live.
                with trio.move_on_after(self._heartbeat):
                    await self._wake.wait()
                self._wake = trio.Event()
            if await self._publish_batch(client):
                backoff = 0.05
            else:
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)

    async def _watch_peers(self) -> None:
        """A node killed between commit and PUBLISH (or with events still in its
        buffer) leaves gaps that no later message may reveal.  When a peer
        falls silent, every local stream re-checks storage once."""
        while True:
            await trio.sleep(self._heartbeat)
            if not self._subscriber_ok:
                continue  # we are the deaf one; resubscribing re-checks anyway
            now = trio.current_time()
            gone = [p for p, seen in self._peers.items() if now - seen > self._peer_timeout]
            if gone:
                for peer in gone:
                    del self._peers[peer]
                self.stats.peers_lost += len(gone)
                log.warning("%d peer node(s) went silent; re-checking every stream", len(gone))
                self._hub.repair(None)

    def _take_batch(self) -> list[tuple[list[Any], int, bool]]:
        batch: list[tuple[list[Any], int, bool]] = []
        if self._lost_pending():
            marker = None if self._lost_all else dict(self._lost)
            batch.append((buswire.repair(marker), 0, False))
            self._lost, self._lost_all = {}, False
        size = 0
        while self._queue and len(batch) < self._batch_events:
            item = self._queue[0]
            if batch and size + item[1] > self._batch_bytes:
                break
            self._queue.popleft()
            self._queued_bytes -= item[1]
            size += item[1]
            batch.append(item)
        return batch

    async def _publish_batch(self, client: coredis.Redis[bytes]) -> bool:
        batch = self._take_batch()
        payload = buswire.dumps(self.instance, (event for event, _, _ in batch))
        try:
            with trio.fail_after(self._publish_timeout):
                await client.publish(self.channel, payload)
        except Exception as exc:  # coredis raises several kinds, often grouped
            if self._publisher_ok:
                log.warning("Redis publish failed, fan-out degraded to repair: %r", exc)
            self._publisher_ok = False
            self._give_up(batch)
            return False
        if not self._publisher_ok:
            log.info("Redis publish works again")
        self._publisher_ok = True
        self.stats.published_batches += 1
        self.stats.published_events += len(batch)
        if batch and batch[0][0][0] == buswire.REPAIR:
            self.stats.repairs_sent += 1
        return True

    def _give_up(self, batch: list[tuple[list[Any], int, bool]]) -> None:
        """After a failed PUBLISH: everything queued is lost except retained events;
        lost messages become a repair marker for when Redis is back."""
        retained = [item for item in batch if item[2]]
        for event, _, keep in [*batch, *self._queue]:
            if keep:
                continue
            if event[0] == buswire.MSG:
                self._note_lost(event[1], event[2])
            if event[0] == buswire.REPAIR:
                if event[1] is None:
                    self._lost_all, self._lost = True, {}
                else:
                    for conversation, seq in event[1].items():
                        self._note_lost(conversation, seq)
                continue
            self.stats.dropped += 1
        retained += [item for item in self._queue if item[2]]
        self._queue = deque(retained)
        self._queued_bytes = sum(size for _, size, _ in retained)

    async def _subscriber(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        backoff = 0.05
        reported = False
        missed = False  # True once anything might have been published unseen
        while True:
            try:
                client = self._new_client("sub")
                async with (
                    client,
                    client.pubsub(
                        channels=[self.channel],
                        ignore_subscribe_messages=True,
                        # Reconnect ourselves: coredis' own resubscribe is silent,
                        # and after a gap every local stream must re-check storage.
                        retry_policy=NoRetryPolicy(),
                        max_idle_seconds=5,
                    ) as pubsub,
                ):
                    self._subscriber_ok = True
                    backoff = 0.05
                    if missed:
                        self.stats.resubscribes += 1
                        log.info("Redis subscription restored; re-checking every stream")
                        self._hub.repair(None)
                        # Peers get a fresh timeout: silence during OUR outage
                        # proves nothing, but silence from now on does.
                        now = trio.current_time()
                        self._peers = dict.fromkeys(self._peers, now)
                    if not reported:
                        reported = True
                        task_status.started()
                    async for message in pubsub:
                        data = message["data"]
                        if isinstance(data, bytes):
                            self._receive(data)
            except BaseExceptionGroup as group:
                cancelled, failure = group.split(trio.Cancelled)
                if cancelled is not None:
                    # Shutting down: coredis' unsubscribe on a closed connection
                    # adds errors that must not turn a cancellation into a crash.
                    raise cancelled from None
                if self._subscriber_ok or not reported:
                    log.warning("Redis subscription lost: %r", failure)
            except Exception as exc:
                if self._subscriber_ok or not reported:
                    log.warning("Redis subscription lost: %r", exc)
            self._subscriber_ok = False
            missed = True
            if not reported:
                reported = True
                task_status.started()
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    # --- receiving ---------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        try:
            sender, events = buswire.loads(data)
            if sender == self.instance:
                return  # already delivered locally by publish()
            self._peers[sender] = trio.current_time()
            oldest = buswire.deliver(
                events,
                self._hub,
                # Stopped cleanly: its silence from now on is no crash.
                on_bye=lambda: self._peers.pop(sender, None),
                on_repair=self._count_repair,
                on_displaced=self._on_displaced,
            )
            if oldest is not None and self.observe_lag is not None:
                self.observe_lag(oldest)
            self.stats.received_events += len(events)
        except buswire.MALFORMED as exc:
            self.stats.malformed += 1
            log.warning("malformed fan-out message ignored: %r", exc)

    def _count_repair(self) -> None:
        self.stats.repairs_received += 1
