"""Prometheus metrics, read at scrape time from plain counters.

The hot path (hub fan-out, outbox writes, session reads) only bumps plain
ints on objects it already touches; nothing here is called per delivery.
A custom collector turns those ints into Prometheus families when /metrics
is scraped.  Latency histograms are fed once per commit batch by the
committer's observer hook, with a lock-free bucket array (the
prometheus-client Histogram takes a lock per observation).

Each Relay owns its own CollectorRegistry: several relays run in one test
process, and a global registry would mix their numbers.  The node hands
:class:`RelayMetrics` what it samples (:class:`Sampled`), never itself.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from relay.base.incidents import Incidents

if TYPE_CHECKING:
    from relay.delivery.committer import Committer, PendingSend
    from relay.delivery.hub import Hub
    from relay.delivery.outbox import Outbox
    from relay.offline.blobs import Blobs
    from relay.offline.delivery_state import DeliveryTracker
    from relay.offline.push import Pusher
    from storage.base import Storage

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Latency buckets (seconds): sub-millisecond commits on SQLite up to
#: multi-second stalls of an overloaded PostgreSQL.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0
)  # fmt: skip

#: The status page's history: one sample a second for ten minutes.
SAMPLE_INTERVAL_S = 1.0
HISTORY = 600
RECENT_ERRORS_S = 600.0


class FastHistogram:
    """Bucket counts in a list; observe() is a bisect and two additions."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = list(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        value = max(value, 0.0)  # wall-clock steps must not yield negative latencies
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        for bound, count in zip([*self.bounds, float("inf")], self.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.total)

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(slots=True)
class Sample:
    at: float
    committed: int
    delivered: int
    connections: int
    errors: int


@dataclass(frozen=True, slots=True)
class Sampled:
    """What the metrics read at scrape time: the node's parts, read-only."""

    hub: Hub
    storage: Storage
    blobs: Blobs
    delivery: DeliveryTracker
    pusher: Pusher | None
    #: The committer once the node runs (None before).
    committer: Callable[[], Committer | None]
    #: Connections closed because their outgoing buffer overflowed.
    slow_consumers: Callable[[], int]
    #: RELAY_POOL_MAX: the pools' capacity when a backend does not report it.
    pool_max: int


class RelayMetrics:
    """Plain counters of one relay node, their Prometheus view and a short history."""

    def __init__(self, node_id: str, incidents: Incidents, sampled: Sampled) -> None:
        self.node_id = node_id
        self.sampled = sampled
        self.started_at = time.time()
        self.frames_in = 0
        self.bytes_in = 0
        self.connections_total: Counter[str] = Counter()
        #: Open connections' outboxes by transport: their frame and byte
        #: counts are summed at scrape time, then folded into the closed totals.
        self.open: dict[Outbox, str] = {}
        self._closed_frames_out = 0
        self._closed_bytes_out = 0
        self.errors: Counter[str] = Counter()
        #: Unexpected failures (InternalError replies) and poisoned rows dropped.
        self.incidents = incidents
        self._recent_errors: deque[tuple[float, str]] = deque(maxlen=10000)
        self.send_to_commit = FastHistogram()
        self.commit_to_deliver = FastHistogram()
        self.fanout_lag = FastHistogram()
        self.history: deque[Sample] = deque(maxlen=HISTORY)
        #: Hook for a multi-node deployment: returns the other nodes' summaries
        #: (same shape as node_summary()), e.g. gathered over the fan-out bus.
        self.peer_nodes: Callable[[], list[dict[str, Any]]] = list
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)

    # --- counting (called by sessions, SSE streams and the committer) --------

    def opened(self, outbox: Outbox, transport: str) -> None:
        self.open[outbox] = transport
        self.connections_total[transport] += 1

    def closed(self, outbox: Outbox) -> None:
        if self.open.pop(outbox, None) is not None:
            self._closed_frames_out += outbox.frames_out
            self._closed_bytes_out += outbox.bytes_out

    def error(self, kind: str) -> None:
        """Count an error reply or close by its protocol name (never user data)."""
        self.errors[kind] += 1
        self._recent_errors.append((time.time(), kind))

    def observe_batch(self, batch: Sequence[PendingSend], committed_at: float) -> None:
        """The committer's observer: once per batch, after fan-out and acks."""
        now = time.time()
        self.commit_to_deliver.observe(now - committed_at)
        oldest = committed_at
        for pending in batch:
            created = pending.message.created_ms / 1000
            self.send_to_commit.observe(committed_at - created)
            oldest = min(oldest, created)
        self.fanout_lag.observe(now - oldest)

    def observe_fanout_lag(self, created_ms: int) -> None:
        """For a fan-out bus: a batch from another node reached this node's hub."""
        self.fanout_lag.observe(time.time() - created_ms / 1000)

    # --- reading -------------------------------------------------------------

    def frames_out(self) -> int:
        return self._closed_frames_out + sum(o.frames_out for o in self.open)

    def bytes_out(self) -> int:
        return self._closed_bytes_out + sum(o.bytes_out for o in self.open)

    def connections(self) -> Counter[str]:
        return Counter(self.open.values())

    def committed(self) -> int:
        committer = self.sampled.committer()
        return committer.committed if committer is not None else 0

    def delivered(self) -> int:
        return self.sampled.hub.delivered

    def slow_consumer_closes(self) -> int:
        return self.sampled.slow_consumers()

    def recent_errors(self, window: float = RECENT_ERRORS_S) -> dict[str, int]:
        cutoff = time.time() - window
        return dict(Counter(kind for at, kind in self._recent_errors if at >= cutoff))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def sample(self) -> None:
        self.history.append(
            Sample(
                time.time(),
                self.committed(),
                self.delivered(),
                len(self.open),
                sum(self.errors.values()),
            )
        )

    async def run_sampler(self) -> None:
        """Record one history sample a second (for /status); runs for the relay's life."""
        while True:
            self.sample()
            await trio.sleep(SAMPLE_INTERVAL_S)

    def node_summary(self) -> dict[str, Any]:
        rate = 0.0
        if len(self.history) >= 2:
            a, b = self.history[-2], self.history[-1]
            rate = (b.committed - a.committed) / max(b.at - a.at, 1e-6)
        return {
            "node": self.node_id,
            "connections": dict(self.connections()),
            "messages_per_second": round(rate, 2),
            "committed": self.committed(),
            "uptime_s": int(time.time() - self.started_at),
        }


def pool_usage(
    storage: object, capacity: dict[str, int]
) -> Iterator[tuple[str, int, int, int, int]]:
    """(pool, size, in use, idle, waiting) for each connection pool of a storage backend.

    Prefers a backend's own ``pool_stats()`` (same tuples).  Otherwise reads
    the pools the current backends hold (``_pool``, ``_writer``,
    ``_readers``): their slot semaphore (free slots, waiting tasks) and idle
    list, read-only; the semaphore does not record its size, so ``capacity``
    (from the configuration the pools were built with) supplies it."""
    stats = getattr(storage, "pool_stats", None)
    if callable(stats):
        yield from stats()
        return
    for attr in ("_pool", "_writer", "_readers"):
        pool = getattr(storage, attr, None)
        slots = getattr(pool, "_slots", None)
        name = attr.lstrip("_")
        if not isinstance(slots, trio.Semaphore) or name not in capacity:
            continue
        size = slots.max_value or capacity[name]
        idle = len(getattr(pool, "_idle", ()))
        waiting = slots.statistics().tasks_waiting
        yield name, size, max(0, size - slots.value), idle, waiting


class _Collector(Collector):
    def __init__(self, metrics: RelayMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Any]:
        m, sampled = self.m, self.m.sampled
        conns = m.connections()
        gauge = GaugeMetricFamily(
            "relay_connections", "Open client connections.", labels=["transport"]
        )
        total = CounterMetricFamily(
            "relay_connections_accepted", "Client connections accepted.", labels=["transport"]
        )
        for transport in ("websocket", "sse"):
            gauge.add_metric([transport], conns.get(transport, 0))
            total.add_metric([transport], m.connections_total.get(transport, 0))
        yield gauge
        yield total
        yield _counter("relay_frames_received", "WebSocket frames received.", m.frames_in)
        yield _counter("relay_frames_sent", "Frames and events queued to clients.", m.frames_out())
        yield _counter("relay_received_bytes", "Bytes read from client sockets.", m.bytes_in)
        yield _counter("relay_sent_bytes", "Bytes written to client sockets.", m.bytes_out())
        yield _counter("relay_messages_committed", "Messages stored.", m.committed())
        committer = sampled.committer()
        yield _counter(
            "relay_commit_batches", "Commit transactions.", committer.batches if committer else 0
        )
        yield _counter(
            "relay_fanout_offers", "Live messages offered to connections.", m.delivered()
        )
        yield _counter(
            "relay_slow_consumer_closes",
            "Connections closed because their outgoing buffer overflowed.",
            m.slow_consumer_closes(),
        )
        errors = CounterMetricFamily(
            "relay_errors", "Error replies and error closes by type.", labels=["type"]
        )
        for kind, count in sorted(m.errors.items()):
            errors.add_metric([kind], count)
        yield errors
        yield m.send_to_commit.family(
            "relay_send_to_commit_seconds", "Time from a send's arrival to its commit."
        )
        yield m.commit_to_deliver.family(
            "relay_commit_to_deliver_seconds",
            "Time from a batch's commit to its fan-out being flushed to sockets.",
        )
        yield m.fanout_lag.family(
            "relay_fanout_lag_seconds",
            "Time from the oldest send of a batch to its publication on this node.",
        )
        yield _gauge(
            "relay_commit_queue_sends",
            "Sends waiting for the committer.",
            committer.queued() if committer else 0,
        )
        yield _gauge(
            "relay_outbox_pending_bytes",
            "Bytes queued for clients but not yet accepted by the kernel.",
            sum(o.pending_bytes for o in m.open),
        )
        yield from _pool_families(sampled)
        yield from _offline_families(sampled)
        yield from _incident_families(m, committer)


def _incident_families(m: RelayMetrics, committer: Committer | None) -> Iterator[Any]:
    """Unexpected failures, isolated batch items and dropped rows (relay/base/incidents.py)."""
    incidents = CounterMetricFamily(
        "relay_incidents",
        "Unexpected failures answered with InternalError (each logged with its id).",
        labels=["where"],
    )
    for where, count in sorted(m.incidents.counts.items()):
        incidents.add_metric([where], count)
    yield incidents
    dropped = CounterMetricFamily(
        "relay_poisoned_dropped",
        "Rows a background job could not write and dropped (each logged once).",
        labels=["job"],
    )
    for job, count in sorted(m.incidents.dropped.items()):
        dropped.add_metric([job], count)
    yield dropped
    yield _counter(
        "relay_commit_splits",
        "Commit batches split because storage refused one of their items.",
        committer.splits if committer else 0,
    )


def _offline_families(sampled: Sampled) -> Iterator[Any]:
    """Push, blobs and delivery state (issue #7)."""
    blobs = sampled.blobs
    yield _counter("relay_blobs_written", "Blobs written to the blob store.", blobs.written)
    yield _counter("relay_blobs_collected", "Blobs deleted from the blob store.", blobs.collected)
    yield _counter(
        "relay_delivery_positions_recorded",
        "Delivered positions written for #deliveryState.",
        sampled.delivery.rows_written,
    )
    pusher = sampled.pusher
    if pusher is None:
        return
    pushes = CounterMetricFamily(
        "relay_push", "Push notifications for offline devices, by outcome.", labels=["outcome"]
    )
    stats = pusher.stats
    for outcome in ("sent", "failed", "dropped", "retried", "coalesced", "gone", "online"):
        pushes.add_metric([outcome], getattr(stats, outcome))
    yield pushes
    yield _gauge("relay_push_pending", "Devices and offers waiting for a push.", pusher.pending())


def _pool_families(sampled: Sampled) -> Iterator[Any]:
    size = GaugeMetricFamily("relay_db_pool_size", "Database pool capacity.", labels=["pool"])
    used = GaugeMetricFamily(
        "relay_db_pool_connections", "Database pool connections by state.", labels=["pool", "state"]
    )
    waiting = GaugeMetricFamily(
        "relay_db_pool_waiting", "Tasks waiting for a database connection.", labels=["pool"]
    )
    pool_max = sampled.pool_max
    capacity = {"pool": pool_max, "readers": max(1, pool_max), "writer": 1}
    storage = sampled.storage
    for pool, capacity_, in_use, idle, queued in pool_usage(storage, capacity):
        size.add_metric([pool], capacity_)
        used.add_metric([pool, "in_use"], in_use)
        used.add_metric([pool, "idle"], idle)
        waiting.add_metric([pool], queued)
    yield size
    yield used
    yield waiting
    yield _counter(
        "relay_db_jobs_abandoned",
        "Database jobs given up at RELAY_DB_DEADLINE_S (their connection killed).",
        getattr(storage, "abandoned_jobs", 0),
    )


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)
