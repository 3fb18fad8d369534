"""One authenticated WebSocket connection: requests in, events out.

The reader loop decodes frames and dispatches requests.  Sends go to the
committer in arrival order (so one device's sends keep their order) and are
answered from the committer's callback after the commit; other requests run
as tasks in the session's nursery, bounded per connection.  Outgoing frames
go through the connection's :class:`~relay.outbox.Outbox`.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING

import trio

from protocol import events
from protocol.errors import (
    InvalidRequest,
    ProtocolError,
    RateLimited,
    RelayError,
    StorageError,
)
from protocol.frames import decode_frame
from protocol.requests import Request, Send, parse_request, request_id
from protocol.websocket import (
    CLOSE_CONSUMER_TOO_SLOW,
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    Closed,
    Message,
    PingReceived,
    ServerConnection,
    binary_frame,
    close_frame,
    ping_frame,
    pong_frame,
)
from storage.base import Appended

from .committer import PendingSend
from .handlers import Handlers
from .logs import connection_context
from .outbox import Outbox
from .streams import Streams

if TYPE_CHECKING:
    from .app import Relay
    from .auth import Identity

log = logging.getLogger("relay.session")

RECEIVE_SIZE = 65536


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
        self._in_flight = trio.Semaphore(cfg.max_in_flight)
        self._requests = relay.node_limits.connection_bucket()
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
                code, reason = self._closing or (CLOSE_NORMAL, "")
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
                    nursery.start_soon(self.outbox.run_writer)
                    nursery.start_soon(self._watch_outbox)
                    nursery.start_soon(self.streams.run_catch_up, self._caught_up)
                    nursery.start_soon(self._expire_token)
                    nursery.start_soon(self._heartbeat)
                    await self._read_loop(early)
                    nursery.cancel_scope.cancel()
        finally:
            self._done = True
            self.relay.forget(self)
            await self._finish()

    def close(self, code: int, reason: str) -> None:
        """Ask the session to close with ``code`` (idempotent, synchronous)."""
        if self._closing is None:
            self._closing = (code, reason)
        self._cancel.cancel()

    async def _finish(self) -> None:
        code, reason = self._closing or (CLOSE_NORMAL, "")
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            self.outbox.write_control(close_frame(code, reason))
            nursery_writer = self.outbox
            async with trio.open_nursery() as n:
                n.start_soon(nursery_writer.run_writer)
                await nursery_writer.drain()
                n.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await self._stream.aclose()

    async def _watch_outbox(self) -> None:
        await self.outbox.failed.wait()
        if self.outbox.overflowed:
            self.relay.metrics_slow_consumers += 1
            self.relay.metrics.error("ConsumerTooSlow")
            self.close(CLOSE_CONSUMER_TOO_SLOW, "ConsumerTooSlow")
        else:
            self.close(CLOSE_NORMAL, "")

    async def _expire_token(self) -> None:
        await trio.sleep_until(
            trio.current_time() + max(0.0, self.identity.expires_at - time.time())
        )
        self.close(4401, "TokenExpired")

    async def _heartbeat(self) -> None:
        """Ping idle connections; close those that stay silent (dead peers
        would otherwise hold memory and fan-out work forever)."""
        interval = self.relay.config.ping_interval_s
        while True:
            await trio.sleep(interval)
            silent = trio.current_time() - self._last_heard
            if silent >= 2 * interval:
                self.close(CLOSE_GOING_AWAY, "PingTimeout")
                return
            if silent >= interval:
                self.send_frame_raw(ping_frame())

    def _caught_up(self) -> None:
        # Announced once, after the replay that #subscribe started; later gap
        # repairs are invisible to the client.
        if self.subscribed and not self._announced_caught_up:
            self._announced_caught_up = True
            self.send_frame(events.info("CaughtUp", "replay complete; live from here"))

    # --- reading ----------------------------------------------------------------

    async def _read_loop(self, early: bytes) -> None:
        data = early
        while True:
            try:
                if data:
                    for event in self._conn.receive(data):
                        if not await self._on_event(event):
                            return
            except ProtocolError as exc:
                self.relay.metrics.error(exc.error)
                self.close(exc.close_code, exc.error)
                return
            try:
                data = await self._stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            self.relay.metrics.bytes_in += len(data)
            if not data:
                return
            self._last_heard = trio.current_time()

    async def _on_event(self, event: Message | PingReceived | Closed) -> bool:
        if isinstance(event, Message):
            self.relay.metrics.frames_in += 1
            await self._on_message(event.data)
            return True
        if isinstance(event, PingReceived):
            self.send_frame_raw(pong_frame(event.payload))
            return True
        self._closing = (event.code if event.code in (1000, 1001) else CLOSE_NORMAL, "")
        return False

    async def _on_message(self, data: bytes) -> None:
        frame = decode_frame(data)  # MalformedFrame closes the connection
        try:
            req = parse_request(frame, self.relay.limits)
            self.relay.node_limits.check_request(self.user, self._requests)
        except (InvalidRequest, RateLimited) as exc:
            self.relay.metrics.error(exc.error)
            self.send_frame(events.error(exc, request_id(frame)))
            return
        await self._in_flight.acquire()
        if isinstance(req, Send) and not req.ephemeral:
            await self._submit(req)
        else:
            self.nursery.start_soon(self._handle, req)

    async def _submit(self, req: Send) -> None:
        try:  # MLS conversations: parse the MLSMessage header (relay/mls_ds.py)
            message = await self.handlers.new_message(req)
        except RelayError as exc:
            self._in_flight.release()
            self.send_frame(events.error(exc, req.id))
            return

        def on_done(outcome: Appended | RelayError) -> None:
            self._in_flight.release()
            if isinstance(outcome, Appended):
                mls = {} if outcome.epoch is None else {"epoch": outcome.epoch}
                self.send_frame(
                    events.result(req.id, seq=outcome.seq, time=outcome.created_ms, **mls)
                )
            else:
                self.relay.metrics.error(outcome.error)
                self.send_frame(events.error(outcome, req.id))

        await self.relay.committer.submit(PendingSend(message, on_done, lambda: self._done))

    async def _handle(self, req: Request) -> None:
        try:
            reply = await self.handlers.handle(req)
        except RelayError as exc:
            self.relay.metrics.error(exc.error)
            reply = events.error(exc, req.id)
        except Exception:
            self.relay.metrics.error("InternalError")
            log.exception("request %s failed", type(req).__name__)
            reply = events.error(StorageError("internal error"), req.id)
        finally:
            self._in_flight.release()
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

    def internal_error(self) -> None:
        self.close(CLOSE_INTERNAL, "InternalError")
