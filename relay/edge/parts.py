"""What the edge uses of its node: :class:`EdgeParts`, built once per node.

WebSocket sessions, SSE streams and the upgrade path get these parts
(relay/node.py builds them) rather than the node itself, the way request
handlers get :class:`~relay.edge.handlers.HandlerParts`: nothing in
relay/edge imports relay.node (pyproject.toml's layers contract).  What the
node creates or changes only once running is reached through callables: the
committer (built in ``Relay.run``), the node's task nursery and whether it is
shutting down.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import trio

    from protocol.requests import RequestLimits
    from relay.base.config import Config
    from relay.base.ratelimits import RateLimits
    from relay.cluster.presence import Presence
    from relay.delivery.committer import Committer
    from relay.delivery.hub import Hub
    from relay.delivery.outbox import Flusher
    from relay.edge.auth import Authenticator
    from relay.edge.handlers import HandlerParts
    from relay.edge.reader import NodeReader
    from relay.edge.registry import SessionRegistry
    from relay.offline.retention import SingleUseTokens
    from relay.ops.metrics import RelayMetrics
    from storage.base import Storage


@dataclass(frozen=True, slots=True)
class EdgeParts:
    """The node's parts its connections use (relay/node.py builds them)."""

    config: Config
    #: The hello's ``server`` and ``node`` (docs/PROTOCOL.md).
    server_name: str
    node_id: str
    flusher: Flusher
    reader: NodeReader
    storage: Storage
    hub: Hub
    registry: SessionRegistry
    metrics: RelayMetrics
    #: Connection and request rates (relay/base/ratelimits.py).
    node_limits: RateLimits
    #: Sizes a request may have (protocol/requests.py).
    request_limits: RequestLimits
    handlers: HandlerParts
    presence: Presence
    authenticator: Authenticator
    tokens: SingleUseTokens
    #: The node's committer (created when the node runs).
    committer: Callable[[], Committer]
    #: The node's task nursery once running (SSE streams start tasks in it).
    nursery: Callable[[], trio.Nursery | None]
    shutting_down: Callable[[], bool]
    #: Counts a client closed for not reading (4008, mls_relay_slow_consumers).
    slow_consumer: Callable[[], None]
    #: Hands the node what closes the port (relay/ops/shutdown.py), once listening.
    listening: Callable[[Callable[[], Awaitable[None]]], None]
