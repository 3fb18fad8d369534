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
    RelayError,
    StorageError,
)
from protocol.frames import decode_frame
from protocol.requests import Request, Send, parse_request, request_id
from protocol.websocket import (
    CLOSE_CONSUMER_TOO_SLOW,
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    Closed,
    Message,
    PingReceived,
    ServerConnection,
    binary_frame,
    close_frame,
    pong_frame,
)
from storage.base import Appended, NewMessage

from .committer import PendingSend
from .handlers import Handlers
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
        self._closing: tuple[int, str] | None = None
        self._done = False
        self._cancel = trio.CancelScope()
        self.subscribed = False
        self._announced_caught_up = False
        self.handlers = Handlers(self)

    # --- lifecycle ------------------------------------------------------------

    async def run(self, early: bytes) -> None:
        self.send_frame(events.hello(self.user, self.device, self.relay.server_name, self.id))
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    nursery.start_soon(self.outbox.run_writer)
                    nursery.start_soon(self._watch_outbox)
                    nursery.start_soon(self.streams.run_catch_up, self._caught_up)
                    nursery.start_soon(self._expire_token)
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
            self.close(CLOSE_CONSUMER_TOO_SLOW, "ConsumerTooSlow")
        else:
            self.close(CLOSE_NORMAL, "")

    async def _expire_token(self) -> None:
        await trio.sleep_until(
            trio.current_time() + max(0.0, self.identity.expires_at - time.time())
        )
        self.close(4401, "TokenExpired")

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
                self.close(exc.close_code, exc.error)
                return
            try:
                data = await self._stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return

    async def _on_event(self, event: Message | PingReceived | Closed) -> bool:
        if isinstance(event, Message):
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
        except InvalidRequest as exc:
            self.send_frame(events.error(exc, request_id(frame)))
            return
        await self._in_flight.acquire()
        if isinstance(req, Send) and not req.ephemeral:
            await self._submit(req)
        else:
            self.nursery.start_soon(self._handle, req)

    async def _submit(self, req: Send) -> None:
        message = NewMessage(
            conversation=req.conversation,
            sender=self.user,
            device=self.device,
            client_message_id=req.client_message_id,
            ciphertext=req.ciphertext,
            created_ms=int(time.time() * 1000),
        )

        def on_done(outcome: Appended | RelayError) -> None:
            self._in_flight.release()
            if isinstance(outcome, Appended):
                self.send_frame(events.result(req.id, seq=outcome.seq, time=outcome.created_ms))
            else:
                self.send_frame(events.error(outcome, req.id))

        await self.relay.committer.submit(PendingSend(message, on_done, lambda: self._done))

    async def _handle(self, req: Request) -> None:
        try:
            reply = await self.handlers.handle(req)
        except RelayError as exc:
            reply = events.error(exc, req.id)
        except Exception:
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
