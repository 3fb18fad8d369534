"""What the rest of the node needs of one client connection.

A WebSocket session (:mod:`relay.edge.session`) and a Server-Sent Events
stream (:mod:`relay.edge.sse`) are both a :class:`Connection`: one device of
one user, its subscription state (:class:`~relay.delivery.streams.Streams`,
which the hub delivers into), a way to queue a protocol frame, and a way to
close.  The request handlers, the node's session registry, the delivery
state tracker and the graceful shutdown depend on this interface, never on
either class, so neither has to pass itself off as the other.
"""

from __future__ import annotations

from typing import Protocol

import trio

from relay.delivery.streams import Streams


class Connection(Protocol):
    #: Who is connected: the token's user and device (relay/edge/auth.py).
    user: str
    device: str
    #: The connection's id (in its #hello and in its log lines).
    id: str
    #: Its subscriptions: the replay/live seam per conversation, registered
    #: with the hub while subscribed.
    streams: Streams
    #: Set by #subscribe (one subscription per connection).
    subscribed: bool
    #: Where request handlers start follow-up tasks (Welcome delivery).
    nursery: trio.Nursery

    def send_frame(self, payload: bytes) -> None:
        """Queue one protocol frame (a reply or an event) and flush."""

    def close(self, code: int, reason: str) -> None:
        """Ask the connection to end (synchronous, idempotent): a WebSocket
        closes with ``code``; an event stream ends with an ``info`` event
        named ``reason``."""

    def tick(self, now: float, wall: float) -> None:
        """The node's sweep, every few seconds: heartbeats and token expiry
        (``now`` is trio's clock, ``wall`` the time of day)."""
