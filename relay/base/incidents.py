"""Incidents and poisoned rows: the failures nobody planned for, each told once.

An *incident* is an unexpected failure on the relay's side that a client
sees as ``InternalError``: an exception that is not a
:class:`~protocol.errors.RelayError` (a bug), or a storage error that is not
an outage (storage refused data the edge should have refused).  Each gets a
random id that the reply carries (``incident`` in the error body, WebSocket
and HTTP alike) and one ERROR log line with the same id and the exception, and
it is counted (``relay_incidents_total{where}``).

A *poisoned row* is an item a background job (the delivery-state flush, the
lease release, push) cannot write however often it tries.  The job drops it,
logs it once and counts it (``relay_poisoned_dropped_total{job}``); the good
rows of the same round are still written.

Both are rare by construction (protocol/text.py refuses text storage cannot
hold at the edge), so a flood of them is itself the signal: past
``LOG_BURST`` lines per minute and kind, further ones are counted only.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from protocol.errors import Incident, RelayError, Unavailable

log = logging.getLogger("relay.incidents")

T = TypeVar("T")

#: Most log lines per minute for one kind of incident or drop (the rest are counted).
LOG_BURST = 20


class _Throttle:
    """At most LOG_BURST lines per minute per key (a fixed window: cheap, good enough)."""

    def __init__(self) -> None:
        self._window = 0
        self._lines: Counter[str] = Counter()

    def allow(self, key: str) -> bool:
        window = int(time.monotonic() // 60)
        if window != self._window:
            self._window, self._lines = window, Counter()
        self._lines[key] += 1
        return self._lines[key] <= LOG_BURST


class Incidents:
    """One per node (``relay.ops.metrics.incidents``); components may hold their own."""

    def __init__(self) -> None:
        #: Incidents by where they happened (``committer``, ``request``, ``handshake``...).
        self.counts: Counter[str] = Counter()
        #: Poisoned rows dropped, by background job.
        self.dropped: Counter[str] = Counter()
        self._throttle = _Throttle()

    def report(self, where: str, exc: BaseException | None, what: str = "") -> Incident:
        """Log and count one incident; returns the error to send (carrying its id)."""
        incident = Incident()
        self.counts[where] += 1
        if self._throttle.allow(f"incident:{where}"):
            log.error(
                "incident %s in %s%s: %s",
                incident.incident,
                where,
                f" ({what})" if what else "",
                _describe(exc),
                exc_info=exc,
                extra={"incident": incident.incident, "where": where},
            )
        return incident

    def reply(self, exc: RelayError, where: str, what: str = "") -> RelayError:
        """The error to send for ``exc``: an InternalError without an incident id
        (StorageError, InternalBug) becomes a logged Incident; anything else is sent as is."""
        if exc.error == "InternalError" and not isinstance(exc, Incident):
            return self.report(where, exc, what)
        return exc

    def drop(self, job: str, exc: BaseException, row: str) -> None:
        """A background job gives up on one row (``row``: a description without
        secrets); logged once per row, counted always."""
        self.dropped[job] += 1
        if self._throttle.allow(f"drop:{job}"):
            log.warning(
                "%s dropped a row it cannot write (%s): %s", job, row, _describe(exc),
                extra={"job": job},
            )  # fmt: skip


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no exception"
    if isinstance(exc, RelayError):
        return f"{type(exc).__name__}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"[:500]


def is_outage(exc: BaseException) -> bool:
    """A failure of the dependency, not of the data: never split a batch for it."""
    return isinstance(exc, Unavailable)


async def isolate(
    items: Sequence[T],
    write: Callable[[list[T]], Awaitable[object]],
    on_poisoned: Callable[[T, Exception], None],
) -> int:
    """Write ``items`` with ``write``; if a write fails on its data, split it in
    halves (bisection) until the item that fails is alone, hand that one to
    ``on_poisoned`` and write the rest.  An outage (Unavailable) is raised at
    once: splitting would only multiply the failing calls.  Returns how many
    splits it took (0 when the first write succeeded).

    ``write`` must leave nothing behind when it raises (one transaction)."""
    try:
        await write(list(items))
        return 0
    except Exception as exc:
        if is_outage(exc):
            raise
        if len(items) <= 1:
            if items:
                on_poisoned(items[0], exc)
            return 0
    mid = len(items) // 2
    return (
        1
        + await isolate(items[:mid], write, on_poisoned)
        + await isolate(items[mid:], write, on_poisoned)
    )
