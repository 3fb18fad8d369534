"""One authenticated WebSocket connection: requests in, events out.

The reader loop decodes frames and dispatches requests.  Sends go to the
committer in arrival order (so one device's sends keep their order) and are
answered from the committer's callback after the commit; other requests run
as tasks in the session's nursery, bounded per connection.  Outgoing frames
go through the connection's :class:`~relay.delivery.outbox.Outbox`.

What one client can make this connection cost is bounded: every message,
ping and pong it sends takes from its request rate limit before anything is
parsed (relay/base/ratelimits.py), one that keeps sending while refused is closed
(1008 RateLimitIgnored), every byte queued for it counts against
RELAY_OUTBOX_LIMIT (4008 ConsumerTooSlow beyond), and while its queue is
over three quarters full the connection is not read at all: a client that
does not read is not decoded either.  If such a paused queue makes no
progress between two sweeps, the client is not reading: 4008 as well.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections import deque
from typing import TYPE_CHECKING

import trio

from protocol import events
from protocol.closecodes import CloseCode, CloseReason
from protocol.errors import (
    InvalidRequest,
    MessageTimeout,
    ProtocolError,
    RateLimited,
    RateLimitIgnored,
    RelayError,
)
from protocol.frames import decode_frame
from protocol.requests import Request, Send, parse_request, request_id
from protocol.websocket import (
    Message,
    PingReceived,
    ServerConnection,
    binary_frame,
    close_frame,
    close_reason,
    ping_frame,
    pong_frame,
)
from protocol.wsframes import PongReceived
from relay.base.logs import connection_context
from relay.base.ratelimits import NESTED_BYTES, request_cost, work_cost
from relay.delivery.committer import PendingSend
from relay.delivery.outbox import Outbox
from relay.delivery.streams import Streams
from relay.edge.handlers import Handlers
from relay.edge.http.body import MIN_BODY_RATE
from storage.base import Appended, NewMessage

if TYPE_CHECKING:
    from relay.base.config import Config
    from relay.edge.auth import Identity
    from relay.node import Relay

log = logging.getLogger("relay.session")

RECEIVE_SIZE = 65536

# Why reading is paused (bits of Session._paused_for).
_IN_FLIGHT, _BACKLOG = 1, 2
#: Closes after which what is still queued is dropped, not drained: the
#: client did not read it (4008), or flooded us (1008).  Nothing is lost: a
#: dropped #message is replayed on resume, a dropped #result's send is durable.
_DISCARD_ON = frozenset({CloseCode.CONSUMER_TOO_SLOW, RateLimitIgnored.close_code})


class Session:
    def __init__(self, relay: Relay, identity: Identity, stream: trio.SocketStream) -> None:
        self.relay = relay
        self.identity = identity
        self.user = identity.user
        self.device = identity.device
        self.id = secrets.token_hex(8)
        self._stream = stream
        cfg = relay.config
        self.outbox = Outbox(stream.socket.fileno(), relay.flusher, cfg.outbox_limit)
        self.streams = Streams(
            self.user, self.device, self.outbox, relay.flusher, relay.storage, self._unfollow
        )
        self._conn = ServerConnection(cfg.max_frame)
        # Requests in flight on this connection (bounded by max_in_flight; the
        # reader waits on _slot_freed, created only when it has to wait).
        self._in_flight = 0
        self._paused_for = 0  # _IN_FLIGHT | _BACKLOG
        self._slow_sends: deque[Send] = deque()
        self._fd = stream.socket.fileno()
        self.outbox.on_fail = self._on_outbox_failed
        self.outbox.on_backlog = self._on_backlog
        #: outbox.bytes_out at the last sweep (a paused queue must move).
        self._bytes_out_at_tick = 0
        #: Messages received whole at the last sweep, and since when the one
        #: in progress has been waited for (None: none in progress).
        self._messages_at_tick = 0
        self._message_since: float | None = None
        self._requests = relay.node_limits.connection_bucket()
        self._strikes = relay.node_limits.strike_bucket()
        self._closing: tuple[int, str] | None = None
        self._done = False
        self._cancel = trio.CancelScope()
        self.subscribed = False
        self._last_heard = trio.current_time()
        self._announced_caught_up = False
        self.handlers = Handlers(self)
        self.streams.on_joined = self.handlers.on_joined  # MLS Welcome delivery

    # --- lifecycle ------------------------------------------------------------

    async def run(self, early: bytes) -> None:
        metrics = self.relay.metrics
        metrics.opened(self.outbox, "websocket")
        with connection_context(self.id, self.relay.node_id, self.user, self.device):
            log.info("connection opened", extra={"transport": "websocket"})
            try:
                await self._run(early)
            finally:
                metrics.closed(self.outbox)
                code, reason = self._closing or (CloseCode.NORMAL, "")
                log.info(
                    "connection closed",
                    extra={"code": code, "reason": reason, "frames_out": self.outbox.frames_out},
                )

    async def _run(self, early: bytes) -> None:
        self.send_frame(
            events.hello(
                self.user, self.device, self.relay.server_name, self.id, self.relay.node_id
            )
        )
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    self.outbox.nursery = nursery
                    self.streams.attach(nursery, self._caught_up)
                    self.relay.reader.add(self._fd, self)
                    if self._paused_for:  # the hello alone filled the queue (tiny bound)
                        self.relay.reader.pause(self._fd)
                    try:
                        if early:
                            self.feed(early)
                            self.relay.flusher.flush()
                        await trio.sleep_forever()  # until close() cancels us
                    finally:
                        self.relay.reader.remove(self._fd)
        finally:
            self.outbox.nursery = None
            self._done = True
            self.relay.forget(self)
            await self._finish()

    def close(self, code: int, reason: str) -> None:
        """Ask the session to close with ``code`` (idempotent, synchronous)."""
        if self._closing is None:
            self._closing = (code, reason)
        self._cancel.cancel()

    async def _finish(self) -> None:
        code, reason = self._closing or (CloseCode.NORMAL, "")
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            if code in _DISCARD_ON:
                self.outbox.discard()  # it was not reading: the close frame goes next
            self.outbox.write_final(close_frame(code, reason))
            await self.outbox.drain()
            # Closing handshake (RFC 6455 §7.1.1): half-close, then read to the
            # client's EOF.  Closing with its frames still arriving would reset
            # the connection, and a reset client can lose our close frame (1006).
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._stream.send_eof()
                while await self._stream.receive_some(RECEIVE_SIZE):
                    pass
        with trio.CancelScope(shield=True):
            await self._stream.aclose()

    def _on_outbox_failed(self) -> None:
        if self.outbox.overflowed:
            self._too_slow()
        else:
            self.close(CloseCode.NORMAL, "")

    def _too_slow(self) -> None:
        if self._closing is None:
            self.relay.metrics_slow_consumers += 1
            self.relay.metrics.error(CloseReason.CONSUMER_TOO_SLOW)
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
        """Called by the node's sweeper (Relay.sweep) every few seconds.

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
        interval = self.relay.config.ping_interval_s
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
        conn, cfg = self._conn, self.relay.config
        pending, done = conn.message_pending, conn.messages
        same = done == self._messages_at_tick
        self._messages_at_tick = done
        if not pending:
            self._message_since = None
        elif not same or self._message_since is None or self._behind():
            self._message_since = now
        elif now - self._message_since > (limit := _message_time(cfg)):
            exc = MessageTimeout(f"a message took longer than {limit:g} s")
            self.relay.metrics.error(exc.error)
            self.close(exc.close_code, close_reason(exc))
            return True
        return False

    def _behind(self) -> bool:
        return bool(self._paused_for) or self.relay.committer.congested

    def _caught_up(self) -> None:
        # Announced once, after the replay that #subscribe started; later gap
        # repairs are invisible to the client.
        if self.subscribed and not self._announced_caught_up:
            self._announced_caught_up = True
            self.send_frame(events.info("CaughtUp", "replay complete; live from here"))

    # --- reading ----------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes from the socket (b"" at end of stream), from the node's reader.

        Synchronous on purpose: requests are validated and dispatched without
        a task switch; only requests that need I/O start tasks."""
        if self._closing is not None:
            return  # closing: what the client still sends is ignored
        if not data:
            self.close(CloseCode.NORMAL, "")
            return
        self.relay.metrics.bytes_in += len(data)
        self._last_heard = trio.current_time()
        try:
            for event in self._conn.receive(data):
                if self._closing is not None:
                    return  # e.g. closed for its rate: the rest is not looked at
                if isinstance(event, Message):
                    self.relay.metrics.frames_in += 1
                    self._on_message(event.data)
                elif isinstance(event, PingReceived):
                    # A ping beyond the rate gets no pong (it gets a strike):
                    # answering every ping is what a ping flood wants.
                    if self._admit_control():
                        self.outbox.write_control(pong_frame(event.payload))
                elif isinstance(event, PongReceived):
                    self._admit_control()
                else:
                    code = (
                        event.code
                        if event.code in (CloseCode.NORMAL, CloseCode.GOING_AWAY)
                        else CloseCode.NORMAL
                    )
                    self.close(code, "")
                    return
        except ProtocolError as exc:  # includes a malformed frame body
            self.relay.metrics.error(exc.error)
            self.close(exc.close_code, close_reason(exc))

    def _admit_control(self) -> bool:
        """Pings and pongs count against the request rate like requests."""
        try:
            self.relay.node_limits.check_request(self.user, self._requests)
        except RateLimited as exc:
            self._strike(exc)
            return False
        return True

    def _strike(self, exc: RateLimited, cost: int = 1) -> None:
        """A refusal for rate: counted, and the connection closed once its
        strikes are used up (its error replies are bounded that way too).  A
        refused message takes as many strikes as it costs requests: it was
        decoded before it was refused, and that decoding is what it costs."""
        self.relay.metrics.error(exc.error)
        if self._strikes is not None and self._strikes.take(min(cost, self._strikes.burst)):
            refusal = RateLimitIgnored("the client kept sending after RateLimited")
            self.relay.metrics.error(refusal.error)
            log.warning("closing a connection that ignores its rate limit")
            self.close(refusal.close_code, refusal.error)

    def _on_message(self, data: bytes) -> None:
        frame = decode_frame(data)  # MalformedFrame closes the connection
        cost = request_cost(len(data), len(data) > NESTED_BYTES and _nested(frame.body))
        try:
            # The rate first: unknown and invalid requests count like valid ones.
            self.relay.node_limits.check_request(self.user, self._requests, cost)
            req = parse_request(frame, self.relay.limits)
            # Requests whose work grows with what they name pay for it before it runs.
            if (extra := work_cost(req) - cost) > 0:
                self.relay.node_limits.check_request(self.user, self._requests, extra)
        except RateLimited as exc:
            self._strike(exc, cost)
            if self._closing is None:
                self.outbox.write_control(binary_frame(events.error(exc, request_id(frame))))
            return
        except InvalidRequest as exc:
            self.relay.metrics.error(exc.error)
            self.outbox.write_control(binary_frame(events.error(exc, request_id(frame))))
            return
        self._take_slot()
        if isinstance(req, Send) and not req.ephemeral:
            self._send(req)
        else:
            self.nursery.start_soon(self._handle, req)

    def fail(self) -> None:
        self.close(CloseCode.INTERNAL_ERROR, CloseReason.INTERNAL_ERROR)

    def refund(self, n: int) -> None:
        """Give back ``n`` requests charged for work a handler did not need."""
        self.relay.node_limits.refund(self.user, self._requests, n)

    def _take_slot(self) -> None:
        """Backpressure: a client with max_in_flight requests pending is not
        read until replies went out (the requests already read still run)."""
        self._in_flight += 1
        if self._in_flight >= self.relay.config.max_in_flight:
            self._pause(_IN_FLIGHT)

    def _release_slot(self) -> None:
        self._in_flight -= 1
        if self._paused_for & _IN_FLIGHT and self._in_flight < self.relay.config.max_in_flight // 2:
            self._resume(_IN_FLIGHT)

    def _pause(self, why: int) -> None:
        if not self._paused_for:
            self.relay.reader.pause(self._fd)
        self._paused_for |= why

    def _resume(self, why: int) -> None:
        if self._paused_for & why:
            self._paused_for &= ~why
            if not self._paused_for:
                self.relay.reader.resume(self._fd)

    def _send(self, req: Send) -> None:
        """Sends enter the committer in arrival order.  One whose MLS group
        state is not cached yet waits for a lookup, and later sends of this
        connection queue behind it so they keep their order.  So does a send
        that finds the commit queue full: it waits here for room instead of
        being refused (at most RELAY_MAX_IN_FLIGHT per connection, the bound
        on what a connection may have pending anyway)."""
        if self._slow_sends:
            self._slow_sends.append(req)
            return
        if self.relay.committer.full:
            self._send_later(req)
            return
        try:
            message = self.handlers.new_message_nowait(req)
        except RelayError as exc:
            self._reply_failed(req, exc)
            return
        except Exception as exc:  # a parser bug fails this send alone
            self._reply_failed(req, self.relay.metrics.incidents.report("send", exc))
            return
        if message is None:
            self._send_later(req)
        else:
            self._commit(req, message)

    def _send_later(self, req: Send) -> None:
        self._slow_sends.append(req)
        self.nursery.start_soon(self._send_slowly)

    async def _send_slowly(self) -> None:
        while self._slow_sends:
            req = self._slow_sends[0]
            try:
                message = await self.handlers.new_message(req)
            except Exception as exc:  # RelayError; anything else is an incident
                self._slow_sends.popleft()
                if not isinstance(exc, RelayError):
                    exc = self.relay.metrics.incidents.report("send", exc)
                self._reply_failed(req, exc)
                continue
            # Still first in line while waiting: later sends queue behind it.
            await self.relay.committer.wait_room()
            self._slow_sends.popleft()
            self._commit(req, message)
        self.relay.flusher.flush()

    def _reply_failed(self, req: Send, exc: RelayError) -> None:
        self._release_slot()
        exc = self.relay.metrics.incidents.reply(exc, "send")  # InternalError: logged, with id
        self.relay.metrics.error(exc.error)
        self.outbox.write_control(binary_frame(events.error(exc, req.id)))

    def _commit(self, req: Send, message: NewMessage) -> None:
        def on_done(outcome: Appended | RelayError) -> None:
            # Runs in the committer after the commit; it flushes once per batch.
            if isinstance(outcome, Appended):
                self._release_slot()
                blob = message.blob_key if not outcome.duplicate else ""  # relay/offline/blobs.py
                reply = events.send_result(
                    req.id, outcome.seq, outcome.created_ms, outcome.epoch, blob
                )
                self.outbox.write_control(binary_frame(reply))
            else:
                self._reply_failed(req, outcome)

        self.relay.committer.submit(PendingSend(message, on_done, lambda: self._done))

    async def _handle(self, req: Request) -> None:
        try:
            reply = await self.handlers.handle(req)
        except RelayError as exc:
            # An InternalError (StorageError) is logged with an id the reply carries.
            exc = self.relay.metrics.incidents.reply(exc, "request", type(req).__name__)
            self.relay.metrics.error(exc.error)
            reply = events.error(exc, req.id)
        except Exception as exc:
            self.relay.metrics.error("InternalError")
            incident = self.relay.metrics.incidents.report("request", exc, type(req).__name__)
            reply = events.error(incident, req.id)
        finally:
            self._release_slot()
        self.send_frame(reply)

    # --- writing ----------------------------------------------------------------

    def send_frame(self, payload: bytes) -> None:
        """Queue one protocol frame and flush (replies are never dropped)."""
        self.send_frame_raw(binary_frame(payload))

    def send_frame_raw(self, wire: bytes) -> None:
        self.outbox.write_control(wire)
        self.relay.flusher.flush()

    def _unfollow(self, conversation: bytes) -> None:
        self.relay.hub.unsubscribe(self.streams, conversation)


_FLAT = frozenset({str, bytes, int, bool, float, type(None)})


def _nested(body: dict[str, object]) -> bool:
    """Whether a body holds arrays or maps (decoding those costs per item)."""
    return not _FLAT.issuperset(map(type, body.values()))


def _message_time(cfg: Config) -> float:
    """Seconds a WebSocket message may take to arrive, whatever its size."""
    return cfg.handshake_timeout_s + cfg.max_frame / MIN_BODY_RATE
