"""Keeping up: what a WebSocket session's client must keep pace with.

:class:`Liveness` is the part of :class:`~relay.edge.session.Session` that
decides when a connection is not read (requests in flight up to
RELAY_MAX_IN_FLIGHT, an outbox past three quarters of RELAY_OUTBOX_LIMIT)
and when it is closed for not keeping up: a client that does not read
(4008), a message that does not arrive (slowloris), silence past two ping
intervals, an expired token.  A mixin rather than an object of its own:
its methods are the session's (no indirection on the hot path, no extra
object per connection, and idle connections count in tens of thousands).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.closecodes import CloseCode, CloseReason
from protocol.errors import MessageTimeout
from protocol.websocket import ServerConnection, close_reason, ping_frame
from relay.edge.http.body import MIN_BODY_RATE

if TYPE_CHECKING:
    from relay.base.config import Config
    from relay.delivery.committer import Committer
    from relay.delivery.outbox import Outbox
    from relay.edge.auth import Identity
    from relay.edge.parts import EdgeParts

# Why reading is paused (bits of Session._paused_for).
_IN_FLIGHT, _BACKLOG = 1, 2


class Liveness:
    """Read pauses and liveness checks of a session (mixed into Session)."""

    # What the session provides (relay/edge/session.py).
    parts: EdgeParts
    identity: Identity
    outbox: Outbox
    _committer: Committer
    _conn: ServerConnection
    _fd: int
    _closing: tuple[int, str] | None
    _in_flight: int
    _paused_for: int  # _IN_FLIGHT | _BACKLOG
    _last_heard: float
    _bytes_out_at_tick: int
    _messages_at_tick: int
    _message_since: float | None

    def close(self, code: int, reason: str) -> None:
        raise NotImplementedError

    def send_frame_raw(self, wire: bytes) -> None:
        raise NotImplementedError

    def _on_outbox_failed(self) -> None:
        if self.outbox.overflowed:
            self._too_slow()
        else:
            self.close(CloseCode.NORMAL, "")

    def _too_slow(self) -> None:
        if self._closing is None:
            self.parts.slow_consumer()
            self.parts.metrics.error(CloseReason.CONSUMER_TOO_SLOW)
        self.close(CloseCode.CONSUMER_TOO_SLOW, CloseReason.CONSUMER_TOO_SLOW)

    def _on_backlog(self, backlogged: bool) -> None:
        """The outbox passed three quarters of its bound (or drained to half):
        stop (or resume) reading, so a client that does not read is not
        decoded at full speed, and TCP pushes back on it."""
        if backlogged:
            self._pause(_BACKLOG)
        else:
            self._resume(_BACKLOG)

    def tick(self, now: float, wall: float) -> None:
        """Called by the node's sweep (SessionRegistry.sweep) every few seconds.

        Token expiry and heartbeats are checked here rather than by timer
        tasks of each connection: three sleeping tasks per socket were a
        third of the memory of an idle connection."""
        if wall >= self.identity.expires_at:
            self.close(CloseCode.TOKEN_EXPIRED, CloseReason.TOKEN_EXPIRED)
            return
        if self._paused_for & _BACKLOG and self.outbox.bytes_out == self._bytes_out_at_tick:
            self._too_slow()  # paused since the last sweep, and not a byte taken
            return
        self._bytes_out_at_tick = self.outbox.bytes_out
        if self._message_too_slow(now):
            return
        interval = self.parts.config.ping_interval_s
        silent = now - self._last_heard
        if silent >= 2 * interval:
            self.close(CloseCode.GOING_AWAY, CloseReason.PING_TIMEOUT)
        elif silent >= interval:
            self.send_frame_raw(ping_frame())

    def _message_too_slow(self, now: float) -> bool:
        """Slowloris: a message begun and not finished in time.  A byte now
        and then keeps a connection alive (it is not silent) and holds up to
        RELAY_MAX_FRAME of buffer; like an HTTP body (relay/edge/http/body.py), a
        message gets RELAY_HANDSHAKE_TIMEOUT_S plus RELAY_MAX_FRAME at
        MIN_BODY_RATE.  The clock stops while the relay does not read this
        connection (paused, or the commit queue congested): then the wait
        is ours, not the client's."""
        conn, cfg = self._conn, self.parts.config
        pending, done = conn.message_pending, conn.messages
        same = done == self._messages_at_tick
        self._messages_at_tick = done
        if not pending:
            self._message_since = None
        elif not same or self._message_since is None or self._behind():
            self._message_since = now
        elif now - self._message_since > (limit := _message_time(cfg)):
            exc = MessageTimeout(f"a message took longer than {limit:g} s")
            self.parts.metrics.error(exc.error)
            self.close(exc.close_code, close_reason(exc))
            return True
        return False

    def _behind(self) -> bool:
        return bool(self._paused_for) or self._committer.congested

    def _take_slot(self) -> None:
        """Backpressure: a client with max_in_flight requests pending is not
        read until replies went out (the requests already read still run)."""
        self._in_flight += 1
        if self._in_flight >= self.parts.config.max_in_flight:
            self._pause(_IN_FLIGHT)

    def _release_slot(self) -> None:
        self._in_flight -= 1
        if self._paused_for & _IN_FLIGHT and self._in_flight < self.parts.config.max_in_flight // 2:
            self._resume(_IN_FLIGHT)

    def _pause(self, why: int) -> None:
        if not self._paused_for:
            self.parts.reader.pause(self._fd)
        self._paused_for |= why

    def _resume(self, why: int) -> None:
        if self._paused_for & why:
            self._paused_for &= ~why
            if not self._paused_for:
                self.parts.reader.resume(self._fd)


def _message_time(cfg: Config) -> float:
    """Seconds a WebSocket message may take to arrive, whatever its size."""
    return cfg.handshake_timeout_s + cfg.max_frame / MIN_BODY_RATE
