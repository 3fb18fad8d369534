"""What the rest of the node needs of one client connection.

A WebSocket session (:mod:`relay.edge.session`) and a Server-Sent Events
stream (:mod:`relay.edge.sse`) are both a :class:`Connection`: one device of
one user, its subscription state (:class:`~relay.delivery.streams.Streams`,
which the hub delivers into), its outbox, a way to queue a protocol frame,
and a way to close.  The request handlers, the node's session registry, the delivery
state tracker and the graceful shutdown depend on this interface, never on
either class, so neither has to pass itself off as the other.
"""

from __future__ import annotations

from typing import Protocol

import trio

from relay.delivery.outbox import Outbox
from relay.delivery.streams import Streams


class Connection(Protocol):
    #: Set by #subscribe (one subscription per connection).
    subscribed: bool

    @property
    def user(self) -> str:
        """The token's user (relay/edge/auth.py)."""

    @property
    def device(self) -> str:
        """The token's device: one registered connection per (user, device)."""

    @property
    def id(self) -> str:
        """The connection's id (in its #hello and in its log lines)."""

    @property
    def streams(self) -> Streams:
        """Its subscriptions: the replay/live seam per conversation,
        registered with the hub while subscribed."""

    @property
    def outbox(self) -> Outbox:
        """Its byte-bounded queue of frames to the client."""

    @property
    def nursery(self) -> trio.Nursery:
        """Where request handlers start follow-up tasks (Welcome delivery)."""

    def send_frame(self, payload: bytes) -> None:
        """Queue one protocol frame (a reply or an event) and flush."""

    def close(self, code: int, reason: str) -> None:
        """Ask the connection to end (synchronous, idempotent): a WebSocket
        closes with ``code``; an event stream ends with an ``info`` event
        named ``reason``."""

    def refund(self, n: int) -> None:
        """Give back ``n`` requests charged for work a handler did not need
        (a short #listConversations page)."""

    def tick(self, now: float, wall: float) -> None:
        """The node's sweep, every few seconds: heartbeats and token expiry
        (``now`` is trio's clock, ``wall`` the time of day)."""
