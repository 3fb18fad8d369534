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
    pong_frame,
)
from protocol.wsframes import PongReceived
from relay.base.logs import connection_context
from relay.base.ratelimits import NESTED_BYTES, request_cost, work_cost
from relay.delivery.committer import PendingSend
from relay.delivery.outbox import Outbox
from relay.delivery.streams import Streams
from relay.edge.handlers import Handlers
from relay.edge.liveness import Liveness
from storage.base import Appended, NewMessage

if TYPE_CHECKING:
    from relay.edge.auth import Identity
    from relay.edge.parts import EdgeParts

log = logging.getLogger("relay.session")

RECEIVE_SIZE = 65536

#: Closes after which what is still queued is dropped, not drained: the
#: client did not read it (4008), or flooded us (1008).  Nothing is lost: a
#: dropped #message is replayed on resume, a dropped #result's send is durable.
_DISCARD_ON = frozenset({CloseCode.CONSUMER_TOO_SLOW, RateLimitIgnored.close_code})


class Session(Liveness):
    """A :class:`~relay.delivery.connection.Connection` over a WebSocket."""

    #: The connection's task nursery while it runs (request handlers use it).
    nursery: trio.Nursery

    def __init__(self, parts: EdgeParts, identity: Identity, stream: trio.SocketStream) -> None:
        self.parts = parts
        #: The node's committer, looked up once (every #send uses it).
        self._committer = parts.committer()
        self.identity = identity
        self.user = identity.user
        self.device = identity.device
        self.id = secrets.token_hex(8)
        self._stream = stream
        cfg = parts.config
        self.outbox = Outbox(stream.socket.fileno(), parts.flusher, cfg.outbox_limit)
        self.streams = Streams(
            self.user, self.device, self.outbox, parts.flusher, parts.storage, self._unfollow
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
        self._requests = parts.node_limits.connection_bucket()
        self._strikes = parts.node_limits.strike_bucket()
        self._closing: tuple[int, str] | None = None
        self._done = False
        self._cancel = trio.CancelScope()
        self.subscribed = False
        self._last_heard = trio.current_time()
        self._announced_caught_up = False
        self.handlers = Handlers(self, parts.handlers)
        self.streams.on_joined = self.handlers.on_joined  # MLS Welcome delivery

    # --- lifecycle ------------------------------------------------------------

    async def run(self, early: bytes) -> None:
        metrics = self.parts.metrics
        metrics.opened(self.outbox, "websocket")
        with connection_context(self.id, self.parts.node_id, self.user, self.device):
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
                self.user, self.device, self.parts.server_name, self.id, self.parts.node_id
            )
        )
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    self.outbox.nursery = nursery
                    self.streams.attach(nursery, self._caught_up)
                    self.parts.reader.add(self._fd, self)
                    if self._paused_for:  # the hello alone filled the queue (tiny bound)
                        self.parts.reader.pause(self._fd)
                    try:
                        if early:
                            self.feed(early)
                            self.parts.flusher.flush()
                        await trio.sleep_forever()  # until close() cancels us
                    finally:
                        self.parts.reader.remove(self._fd)
        finally:
            self.outbox.nursery = None
            self._done = True
            self.parts.registry.forget(self)
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
        self.parts.metrics.bytes_in += len(data)
        self._last_heard = trio.current_time()
        try:
            for event in self._conn.receive(data):
                if self._closing is not None:
                    return  # e.g. closed for its rate: the rest is not looked at
                if isinstance(event, Message):
                    self.parts.metrics.frames_in += 1
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
            self.parts.metrics.error(exc.error)
            self.close(exc.close_code, close_reason(exc))

    def _admit_control(self) -> bool:
        """Pings and pongs count against the request rate like requests."""
        try:
            self.parts.node_limits.check_request(self.user, self._requests)
        except RateLimited as exc:
            self._strike(exc)
            return False
        return True

    def _strike(self, exc: RateLimited, cost: int = 1) -> None:
        """A refusal for rate: counted, and the connection closed once its
        strikes are used up (its error replies are bounded that way too).  A
        refused message takes as many strikes as it costs requests: it was
        decoded before it was refused, and that decoding is what it costs."""
        self.parts.metrics.error(exc.error)
        if self._strikes is not None and self._strikes.take(min(cost, self._strikes.burst)):
            refusal = RateLimitIgnored("the client kept sending after RateLimited")
            self.parts.metrics.error(refusal.error)
            log.warning("closing a connection that ignores its rate limit")
            self.close(refusal.close_code, refusal.error)

    def _on_message(self, data: bytes) -> None:
        frame = decode_frame(data)  # MalformedFrame closes the connection
        cost = request_cost(len(data), len(data) > NESTED_BYTES and _nested(frame.body))
        try:
            # The rate first: unknown and invalid requests count like valid ones.
            self.parts.node_limits.check_request(self.user, self._requests, cost)
            req = parse_request(frame, self.parts.request_limits)
            # Requests whose work grows with what they name pay for it before it runs.
            if (extra := work_cost(req) - cost) > 0:
                self.parts.node_limits.check_request(self.user, self._requests, extra)
        except RateLimited as exc:
            self._strike(exc, cost)
            if self._closing is None:
                self.outbox.write_control(binary_frame(events.error(exc, request_id(frame))))
            return
        except InvalidRequest as exc:
            self.parts.metrics.error(exc.error)
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
        self.parts.node_limits.refund(self.user, self._requests, n)

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
        if self._committer.full:
            self._send_later(req)
            return
        try:
            message = self.handlers.new_message_nowait(req)
        except RelayError as exc:
            self._reply_failed(req, exc)
            return
        except Exception as exc:  # a parser bug fails this send alone
            self._reply_failed(req, self.parts.metrics.incidents.report("send", exc))
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
                    exc = self.parts.metrics.incidents.report("send", exc)
                self._reply_failed(req, exc)
                continue
            # Still first in line while waiting: later sends queue behind it.
            await self._committer.wait_room()
            self._slow_sends.popleft()
            self._commit(req, message)
        self.parts.flusher.flush()

    def _reply_failed(self, req: Send, exc: RelayError) -> None:
        self._release_slot()
        exc = self.parts.metrics.incidents.reply(exc, "send")  # InternalError: logged, with id
        self.parts.metrics.error(exc.error)
        self.outbox.write_control(binary_frame(events.error(exc, req.id)))

    def _commit(self, req: Send, message: NewMessage) -> None:
        def answer(outcome: Appended | RelayError) -> None:
            # Runs in the committer after the commit, inside its Flusher.batch():
            # the #result leaves with the batch's fan-out, in one send.
            if isinstance(outcome, Appended):
                self._release_slot()
                blob = message.blob_key if not outcome.duplicate else ""  # relay/offline/blobs.py
                reply = events.send_result(
                    req.id, outcome.seq, outcome.created_ms, outcome.epoch, blob
                )
                self.outbox.write_control(binary_frame(reply))
            else:
                self._reply_failed(req, outcome)

        self._committer.submit(PendingSend(message, answer, lambda: self._done))

    async def _handle(self, req: Request) -> None:
        try:
            reply = await self.handlers.handle(req)
        except RelayError as exc:
            # An InternalError (StorageError) is logged with an id the reply carries.
            exc = self.parts.metrics.incidents.reply(exc, "request", type(req).__name__)
            self.parts.metrics.error(exc.error)
            reply = events.error(exc, req.id)
        except Exception as exc:
            self.parts.metrics.error("InternalError")
            incident = self.parts.metrics.incidents.report("request", exc, type(req).__name__)
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
        self.parts.flusher.flush()

    def _unfollow(self, conversation: bytes) -> None:
        self.parts.hub.unsubscribe(self.streams, conversation)


_FLAT = frozenset({str, bytes, int, bool, float, type(None)})


def _nested(body: dict[str, object]) -> bool:
    """Whether a body holds arrays or maps (decoding those costs per item)."""
    return not _FLAT.issuperset(map(type, body.values()))
