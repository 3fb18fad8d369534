"""Caps on concurrent HTTP work: requests per user, blob transfers per user and per node.

A token bucket bounds how often; these bound how much at once, which is what
memory, file descriptors and the blob store feel.  Every authenticated HTTP
route (KeyPackages, claims, GroupInfo, blobs) holds one of the user's
``RELAY_HTTP_REQUESTS_PER_USER`` request slots until its response has been
sent; a blob upload or download also holds a transfer slot, one of the
user's ``RELAY_TRANSFERS_PER_USER`` and of the node's ``RELAY_TRANSFERS``,
until its last byte moved.  Beyond a per-user cap: 429 ``TooManyRequests``;
beyond the node's: 503 ``NodeBusy`` (retryable).

Slots are released by the ASGI wrapper (relay/edge/http/frontend.py) once the whole
exchange is over, response body included, however it ended: a client that
disconnects mid-download gives its slot back as surely as one that finishes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from quart import request

from protocol.errors import NodeBusy, TooManyRequests
from relay.edge.auth import Identity, token_from_request

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from relay.edge.auth import Authenticator

#: ASGI scope key: callbacks run once the request's exchange is over.
CLEANUP_KEY = "mls_relay.cleanup"


class Slots:
    """Holders at once, per key (0: unbounded) and in total (0: unbounded)."""

    def __init__(self, per_key: int, total: int = 0) -> None:
        self.per_key = per_key
        self.total = total
        self.held: Counter[str] = Counter()
        self.in_use = 0

    def take(self, key: str) -> str | None:
        """None when taken, else which cap refused ("user" or "node")."""
        if self.per_key and self.held[key] >= self.per_key:
            return "user"
        if self.total and self.in_use >= self.total:
            return "node"
        self.held[key] += 1
        self.in_use += 1
        return None

    def release(self, key: str) -> None:
        self.held[key] -= 1
        if self.held[key] <= 0:
            del self.held[key]  # the table holds only users with work in progress
        self.in_use -= 1


class HttpLimits:
    def __init__(
        self,
        authenticator: Authenticator,
        count_error: Callable[[str], None],
        registry: CollectorRegistry,
        *,
        requests_per_user: int,
        transfers_per_user: int,
        transfers: int,
    ) -> None:
        self.authenticator = authenticator
        #: Counts a refusal by its protocol name (relay_errors_total{type}).
        self._count_error = count_error
        self.requests = Slots(requests_per_user)
        self.transfers = Slots(transfers_per_user, transfers)
        self.refused: Counter[str] = Counter()
        registry.register(_Collector(self))

    def admit(self) -> Identity:
        """The verified identity of the current request, holding one of its
        user's request slots until the exchange is over."""
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()]
        who = self.authenticator.verify(token_from_request(headers, request.query_string))
        self._hold(self.requests, who.user, "requests")
        return who

    def transfer(self, who: Identity) -> None:
        """A blob transfer slot for ``who`` until the exchange is over."""
        self._hold(self.transfers, who.user, "transfers")

    def _hold(self, slots: Slots, user: str, what: str) -> None:
        refused = slots.take(user)
        if refused == "user":
            self.refused[f"{what}_per_user"] += 1
            self._count_error("TooManyRequests")
            limit = slots.per_key
            raise TooManyRequests(
                f"at most {limit} {what} at once per user; retry when one is done",
                retry_after_ms=1000,
            )
        if refused == "node":
            self.refused[f"{what}_per_node"] += 1
            self._count_error("NodeBusy")
            raise NodeBusy(f"this node has {slots.total} {what} in progress; retry later")
        on_exit(lambda: slots.release(user))


def on_exit(callback: Callable[[], Awaitable[None] | None]) -> None:
    """Run ``callback`` once the current request's exchange is over."""
    scope = cast("dict[str, Any]", request.scope)
    scope.setdefault(CLEANUP_KEY, []).append(callback)


async def run_cleanup(scope: Any) -> None:
    """The exchange is over (sent, failed or cancelled): run its callbacks,
    shielded and bounded, each exactly once."""
    with trio.CancelScope(shield=True), trio.move_on_after(5):
        for callback in scope.pop(CLEANUP_KEY, ()):
            result = callback()
            if result is not None:
                await result


class _Collector(Collector):
    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits

    def collect(self) -> Iterator[Any]:
        refused = CounterMetricFamily(
            "relay_http_refused",
            "HTTP requests refused by a concurrency cap (requests or transfers, per user or node).",
            labels=["cap"],
        )
        for cap in ("requests_per_user", "transfers_per_user", "transfers_per_node"):
            refused.add_metric([cap], self.limits.refused.get(cap, 0))
        yield refused
        in_progress = GaugeMetricFamily(
            "relay_http_in_progress", "Authenticated HTTP work in progress.", labels=["kind"]
        )
        in_progress.add_metric(["requests"], self.limits.requests.in_use)
        in_progress.add_metric(["transfers"], self.limits.transfers.in_use)
        yield in_progress
