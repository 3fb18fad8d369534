"""Server-Sent Events: a receive-only fallback for clients without WebSockets.

``GET /v1/events`` (token in ``Authorization: Bearer`` or ``?access_token=``)
answers ``text/event-stream``.  Each event is one protocol event as JSON:
``event:`` is its type without the ``#`` (``hello``, ``message``,
``membership``, ``ephemeral``, ``info``, ``error``) and ``data:`` its body,
with byte strings (conversation ids, ciphertext) in standard base64.

Resuming: every ``message`` event has an ``id:`` that is an opaque cursor,
``v1.`` + base64url(CBOR list of [conversation, seq]) holding the position
of EVERY conversation this stream (and the stream it resumed) delivered, not
just the event's own: resuming from one conversation's position would replay
the others from the stored cursor, which a receive-only client never
advances.  Browsers send it back as ``Last-Event-ID`` on reconnect; other
clients may pass it as ``?cursor=``.  Conversations absent from it resume
from the device's stored cursor.  Keep-alive comments (``: keep-alive``)
flow while idle.

No parallel delivery path: a stream is the WebSocket machinery (hub
subscription, :class:`~relay.delivery.streams.Streams` with its replay/live seam, the
#subscribe handler) writing into :class:`SseSink`, an Outbox whose consumer
is the HTTP response instead of a socket, with the same byte bound: a client
that reads too slowly is cut off (ConsumerTooSlow) and resumes by cursor.
Like a WebSocket, a stream holds a connection lease (relay/cluster/presence.py): it
counts in RELAY_CONNECTIONS_PER_USER across nodes (429 TooManyConnections
beyond), and its device counts as online, so it gets no push.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import trio
from quart import Response, request

from protocol import events, ssecursor
from protocol.closecodes import CloseReason
from protocol.errors import (
    NotMember,
    ShuttingDown,
    TooManyConnections,
)
from protocol.frames import OP_ERROR, decode_frame
from protocol.requests import Subscribe
from protocol.websocket import binary_frame
from relay.base.logs import user_hash
from relay.delivery.outbox import Flusher, Outbox
from relay.delivery.streams import Streams
from relay.edge.auth import token_from_request
from relay.edge.handlers import Handlers

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from relay.cluster.presence import Lease
    from relay.edge.auth import Identity
    from relay.edge.parts import EdgeParts

log = logging.getLogger("relay.sse")

#: Most bytes of SSE text rendered per write of the response body: an event's
#: ``id:`` repeats the whole cursor (up to 8 KiB), so a backlog of small
#: messages is rendered a slice at a time, never all at once.
RENDER_SLICE = 256 * 1024


#: The ``message`` of a stream's last event (``info``, ``name`` = the reason).
_END_DEFAULT = "stream closed; resume with Last-Event-ID"
_END_MESSAGES: dict[str, str] = {
    CloseReason.SERVICE_RESTART: "this node is going away; reconnect with Last-Event-ID",
}


def encode_cursor(positions: dict[bytes, int]) -> str:
    return ssecursor.encode(positions)


def decode_cursor(text: str) -> dict[bytes, int]:
    """Positions from a cursor; raises InvalidRequest on anything malformed
    (protocol/ssecursor.py: checked before anything is allocated)."""
    return ssecursor.decode(text)


class SseSink(Outbox):
    """An Outbox drained by a response body instead of a socket.

    Producers (hub, catch-up, replies) append WebSocket-framed bytes exactly
    as for a socket; flush() only wakes the response, which takes everything
    pending (freeing room for the replay) and renders it as SSE."""

    def __init__(self, flusher: Flusher, limit: int) -> None:
        super().__init__(-1, flusher, limit)
        self._queue: deque[bytes] = deque()
        self.ready = trio.Event()
        self.on_fail = self._wake  # overflow: wake the body, which ends the stream

    def _wake(self) -> None:
        self.ready.set()

    def flush(self) -> None:
        if self._pending or self._queue:
            self.ready.set()

    def pop(self) -> bytes | None:
        """The oldest pending frame (None when there is none).  A frame stays
        counted in pending_bytes until it is popped, so the byte bound holds
        while the body renders a backlog slice by slice."""
        if not self._queue:
            if not self._pending:
                return None
            self._queue.extend(self._pending)
            self._pending = []
        wire = self._queue.popleft()
        self.pending_bytes -= len(wire)
        return wire

    def taken(self) -> None:
        """After a slice: wake waiting producers; rearm unless more is pending."""
        self._progress()
        if not self._queue and not self._pending:
            self.ready = trio.Event()


def _payload(wire: bytes) -> bytes:
    """Strip the (unmasked, server-side) WebSocket frame header."""
    n = wire[1] & 0x7F
    if n == 126:
        return wire[4:]
    if n == 127:
        return wire[10:]
    return wire[2:]


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


class SseStream:
    """One SSE client: a receive-only
    :class:`~relay.delivery.connection.Connection` (the #subscribe handler
    sets it up exactly as a WebSocket's)."""

    #: Where request handlers start follow-up tasks (a session's nursery).
    nursery: trio.Nursery

    def __init__(
        self, parts: EdgeParts, identity: Identity, positions: dict[bytes, int], lease: Lease
    ) -> None:
        self.parts = parts
        self.identity = identity
        self.lease = lease
        self.user = identity.user
        self.device = identity.device
        self.id = secrets.token_hex(8)
        self.positions = positions
        self.outbox = SseSink(parts.flusher, parts.config.outbox_limit)
        self.streams = Streams(
            self.user, self.device, self.outbox, parts.flusher, parts.storage, self._unfollow
        )
        self.subscribed = False
        self._announced = False
        self._cancel = trio.CancelScope()
        self._ended: str | None = None

    # --- the Connection interface (relay/delivery/connection.py) ------------

    def send_frame(self, payload: bytes) -> None:
        self.outbox.write_control(binary_frame(payload))
        self.parts.flusher.flush()

    def refund(self, n: int) -> None:
        """An event stream sends no requests, so it is charged nothing to refund."""

    def close(self, code: int, reason: str) -> None:
        """End the stream: the body sends what is pending, then a last
        ``info`` event named ``reason`` (an event stream has no close
        code), then ends the response properly."""
        self._end(reason)

    def tick(self, now: float, wall: float) -> None:
        """Nothing to sweep: the token's expiry is timed by the stream's own
        task (_background) and keep-alives by the body, and the stream is
        not in the node's session registry (it displaces no one)."""

    def _unfollow(self, conversation: bytes) -> None:
        self.parts.hub.unsubscribe(self.streams, conversation)

    def _caught_up(self) -> None:
        if self.subscribed and not self._announced:
            self._announced = True
            self.send_frame(events.info("CaughtUp", "replay complete; live from here"))

    # --- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self.parts.registry.stream_opened(self)
        self.parts.metrics.opened(self.outbox, "sse")
        self.send_frame(
            events.hello(
                self.user, self.device, self.parts.server_name, self.id, self.parts.node_id
            )
        )
        nursery = self.parts.nursery()
        assert nursery is not None, "relay not running"
        # Tasks live in the relay's nursery: a response body cannot own one
        # (it is an async generator that suspends at every yield).
        await nursery.start(self._background)
        for attempt in range(3):
            cursors = await self._valid_cursors()
            try:
                await Handlers(self, self.parts.handlers).subscribe(Subscribe(0, cursors))
                break
            except NotMember:
                # Membership changed between our check and the subscription.
                # (FutureCursor is the client's: a cursor beyond the end is
                # refused as on the WebSocket, never clamped.)
                if attempt == 2:
                    raise
        log.info(
            "sse stream opened",
            extra={"session": self.id, "node": self.parts.node_id, "user": user_hash(self.user)},
        )

    async def _valid_cursors(self) -> dict[bytes, int]:
        """Positions of conversations we still belong to (one we left since
        the cursor was issued is dropped; one beyond its end is FutureCursor,
        raised by #subscribe as on the WebSocket)."""
        convs = {c.conversation for c in await self.parts.storage.list_conversations(self.user)}
        return {conv: seq for conv, seq in self.positions.items() if conv in convs}

    async def _background(self, *, task_status: trio.TaskStatus[None]) -> None:
        with self._cancel:
            try:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    self.streams.attach(nursery, self._caught_up)
                    task_status.started()
                    await trio.sleep_until(
                        trio.current_time() + max(0.0, self.identity.expires_at - time.time())
                    )
                    self._end(CloseReason.TOKEN_EXPIRED)
            except Exception:
                log.exception("sse stream failed", extra={"session": self.id})
                self._end(CloseReason.INTERNAL_ERROR)

    def _end(self, reason: str) -> None:
        if self._ended is None:
            self._ended = reason
        self.outbox.ready.set()

    def release(self) -> None:
        """Synchronous cleanup (runs in the body's finally, possibly cancelled)."""
        self.parts.registry.stream_ended(self)
        self._cancel.cancel()
        self.parts.hub.remove(self.streams, list(self.streams.by_conversation))
        self.parts.metrics.closed(self.outbox)
        self.parts.presence.release(self.lease)  # idempotent

    # --- the response body ---------------------------------------------------

    async def body(self) -> AsyncIterator[bytes]:
        keepalive = self.parts.config.sse_keepalive_s
        reason = "closed"
        try:
            yield b"retry: 2000\n\n"
            while True:
                with trio.move_on_after(keepalive):
                    await self.outbox.ready.wait()
                if self.outbox.has_failed:
                    self._end(CloseReason.CONSUMER_TOO_SLOW if self.outbox.overflowed else "closed")
                if self.parts.shutting_down():
                    self._end(CloseReason.SERVICE_RESTART)
                chunk = self._render_slice() if self.outbox.ready.is_set() else b""
                if self._ended is not None:
                    reason = self._ended
                    if reason == CloseReason.CONSUMER_TOO_SLOW:
                        self.parts.slow_consumer()
                    if reason != "closed":
                        self.parts.metrics.error(reason)
                    info = events.info(reason, _END_MESSAGES.get(reason, _END_DEFAULT))
                    yield chunk + self._render([binary_frame(info)])
                    return
                chunk = chunk or b": keep-alive\n\n"
                self.outbox.bytes_out += len(chunk)
                yield chunk
        finally:
            self.release()
            log.info("sse stream closed", extra={"session": self.id, "reason": reason})

    def _render_slice(self) -> bytes:
        """Render pending frames until RENDER_SLICE bytes of text (or none left)."""
        out: list[bytes] = []
        size = 0
        while size < RENDER_SLICE and (wire := self.outbox.pop()) is not None:
            piece = self._render([wire])
            out.append(piece)
            size += len(piece)
        self.outbox.taken()
        return b"".join(out)

    def _render(self, frames: list[bytes]) -> bytes:
        out: list[str] = []
        for wire in frames:
            if wire[0] & 0x0F != 0x2:
                continue  # only binary frames carry events (no close/ping here)
            frame = decode_frame(_payload(wire))
            body = frame.body
            lines = []
            if frame.op == OP_ERROR:
                name = "error"
            else:
                name = (frame.t or "#").lstrip("#")
                if name == "message":
                    # Most recent last: a cursor too long to hold every
                    # conversation keeps the recent ones (protocol/ssecursor.py).
                    self.positions.pop(body["conversation"], None)
                    self.positions[body["conversation"]] = body["seq"]
                    lines.append("id: " + encode_cursor(self.positions))
            lines.append("event: " + name)
            lines.append("data: " + json.dumps(_jsonable(body), separators=(",", ":")))
            out.append("\n".join(lines) + "\n\n")
        return "".join(out).encode()


def register(app: QuartTrio, parts: EdgeParts) -> None:
    @app.get("/v1/events")
    async def sse_events() -> Any:
        if parts.shutting_down():
            raise ShuttingDown("relay is shutting down")
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()]
        identity = parts.authenticator.verify(
            token_from_request(headers, request.query_string, from_query=True)
        )
        try:
            lease = await parts.presence.admit(identity.user, identity.device)
        except TooManyConnections as exc:
            parts.metrics.error(exc.error)
            raise
        try:  # the token's claims were checked by verify(); the lease goes back on any failure
            stream = SseStream(parts, identity, {}, lease)
        except BaseException:
            parts.presence.release(lease)
            raise
        try:
            # The token is spent before the cursor is even looked at: a used
            # token gets TokenReplayed, whatever its cursor.
            await parts.tokens.consume(identity)  # single-use tokens (relay/offline/retention.py)
            stream.positions = decode_cursor(
                request.headers.get("Last-Event-ID") or request.args.get("cursor", "")
            )
            await stream.start()
        except BaseException:
            stream.release()
            raise
        response = Response(
            stream.body(),
            content_type="text/event-stream; charset=utf-8",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        response.timeout = None  # Quart's default would cut the stream after 60 s
        return response
