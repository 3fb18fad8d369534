"""Python client SDK (Trio, trio-websocket) for the mls-relay wire protocol.

::

    async with RelayClient.connect("ws://localhost:3000/v1/ws", token) as client:
        await client.create_conversation(b"room", ["did:example:bob"])
        seq = await client.send(b"room", ciphertext)
        async for event in client.events():
            if isinstance(event, Message):
                ...
                await client.ack(event.conversation, event.seq)

The client reconnects by itself (jittered exponential backoff, capped) and
resumes without gaps or duplicates: it remembers the highest seq it has
*yielded* per conversation and re-subscribes with exactly those cursors, so
anything buffered but not yet consumed is delivered again and de-duplicated
by seq on the way out.  Sends are re-sent after a reconnect with the same
``client_message_id`` (the relay stores each at most once and answers the
retry with the original seq).  Requests that are not idempotent (create,
add, remove, leave, delete, claim) fail with :class:`ConnectionLost` instead:
the caller decides.  Ciphertext is opaque here: MLS encryption is the
application's job.

``token`` is a string or a callable returning one, called before every
connection.  Relays make tokens single-use by default (a replayed ``jti`` is
refused with 401 ``TokenReplayed``), so a client that must survive reconnects
passes a callable that mints or fetches a fresh token; with a plain string the
first reconnect fails with ``RequestFailed("AuthRejected", ...)``.

This module holds the connection: reconnects, request/reply matching and the
event stream.  The typed request methods (``send``, ``mark_read``, ...) are
in :mod:`mls_relay_client.requests`, events, results and errors in
:mod:`mls_relay_client.events`; both are re-exported here.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import cbor2
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

from .events import (
    ClaimedKeyPackage,
    ConnectionLost,
    DeliveryState,
    Ephemeral,
    Event,
    Info,
    KeyPackageClaim,
    Membership,
    Message,
    Other,
    Read,
    RequestFailed,
    Welcome,
    parse_event,
)
from .requests import Requests

__all__ = [
    "ClaimedKeyPackage",
    "ConnectionLost",
    "DeliveryState",
    "Ephemeral",
    "Event",
    "Info",
    "KeyPackageClaim",
    "Membership",
    "Message",
    "Other",
    "Read",
    "RelayClient",
    "RequestFailed",
    "Welcome",
]

#: Requests safe to send again on a new connection: sends carry their
#: client_message_id; the others only read, register the same thing again, or
#: move a position that never goes back.
_IDEMPOTENT = frozenset(
    {
        "#send",
        "#ack",
        "#listConversations",
        "#markRead",
        "#readPositions",
        "#deliveryState",
        "#registerPush",
    }
)
#: Close codes after which reconnecting with the same token is pointless.
_FATAL_CLOSES = frozenset({4401, 4403})


def _unwrap(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _rejected(exc: ConnectionRejected) -> RequestFailed:
    """An upgrade refused by the relay: its JSON body names the reason (TokenReplayed...)."""
    text = (exc.body or b"").decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except ValueError:
        body = {}
    details = {"status": exc.status_code, **(body if isinstance(body, dict) else {})}
    return RequestFailed("AuthRejected", f"{exc.status_code} {text}".strip(), details)


# --- frames ----------------------------------------------------------------------


def _encode(t: str, body: dict[str, Any]) -> bytes:
    return cbor2.dumps({"t": t, "op": 1}, canonical=True) + cbor2.dumps(body, canonical=True)


def _decode(data: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    stream = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(stream)
    return decoder.decode(), decoder.decode()


@dataclass
class _Pending:
    t: str
    body: dict[str, Any]
    done: trio.Event = field(default_factory=trio.Event)
    reply: dict[str, Any] | None = None
    error: Exception | None = None
    #: The connection generation it was last sent on (0: not sent yet).
    sent_on: int = 0


class RelayClient(Requests):
    def __init__(
        self,
        url: str,
        token: str | Callable[[], str],
        *,
        subscribe: bool = True,
        initial_backoff: float = 0.25,
        max_backoff: float = 30.0,
        request_timeout: float = 60.0,
    ) -> None:
        self.url = url
        self._token = token
        self._subscribe = subscribe
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.request_timeout = request_timeout
        self.hello: dict[str, Any] = {}
        self.connections = 0
        self._ws: WebSocketConnection | None = None
        self._generation = 0
        self._next_id = 1
        self._pending: dict[int, _Pending] = {}
        #: Highest seq yielded by events(), per conversation: the resume cursors.
        self._yielded: dict[bytes, int] = {}
        self._connected = trio.Event()
        self._fatal: Exception | None = None
        self._send_events, self._events = trio.open_memory_channel[Event](math.inf)

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, url: str, token: str | Callable[[], str], **options: Any
    ) -> AsyncIterator[RelayClient]:
        """Connect (retrying as configured) and keep the connection up until exit."""
        client = cls(url, token, **options)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._maintain)
            with trio.move_on_after(client.request_timeout):
                await client._connected.wait()
            if client._connected.is_set() and client._fatal is None:
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
                return
            nursery.cancel_scope.cancel()
        # Raised outside the nursery, so callers catch it without an ExceptionGroup.
        raise client._fatal or TimeoutError(f"could not connect to {url}")

    # --- requests --------------------------------------------------------------

    async def request(self, t: str, **body: Any) -> dict[str, Any]:
        """Send any request and wait for its #result body (raises RequestFailed)."""
        if self._fatal is not None:
            raise self._fatal
        rid, self._next_id = self._next_id, self._next_id + 1
        pending = _Pending(t, body)
        self._pending[rid] = pending
        try:
            await self._transmit(rid, pending)  # while disconnected: sent on reconnect
            with trio.fail_after(self.request_timeout):
                await pending.done.wait()
        finally:
            self._pending.pop(rid, None)
        if pending.error is not None:
            raise pending.error
        assert pending.reply is not None
        return pending.reply

    async def _transmit(self, rid: int, pending: _Pending) -> None:
        ws = self._ws
        if ws is None or pending.sent_on == self._generation:
            return
        pending.sent_on = self._generation
        # A dropped connection is noticed by the reader; the request waits for the next.
        with suppress(ConnectionClosed):
            await ws.send_message(_encode(pending.t, {"id": rid, **pending.body}))

    # --- events ----------------------------------------------------------------

    async def events(self) -> AsyncIterator[Event]:
        """Events in order, across reconnects; each message exactly once (by seq)."""
        async for event in self._events:
            if isinstance(event, Message):
                if event.seq <= self._yielded.get(event.conversation, 0):
                    continue  # re-delivered after a reconnect: already yielded
                self._yielded[event.conversation] = event.seq
            yield event
        if self._fatal is not None:
            raise self._fatal

    # --- connection management ---------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        # Equal jitter: never zero (no reconnect storms), never above the cap.
        ceiling = min(self.max_backoff, self.initial_backoff * 2**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    async def _maintain(self) -> None:
        attempt = 0
        try:
            while True:
                try:
                    await self._run_connection()
                    attempt = 0  # it was up: start the backoff afresh
                except BaseException as raised:
                    # Raised inside the connection's nursery: wrapped in a group.
                    exc = _unwrap(raised)
                    if isinstance(exc, ConnectionRejected):
                        if exc.status_code in (401, 403):  # e.g. TokenReplayed: a string token
                            self._fail_all(_rejected(exc))  # cannot be used twice
                            return
                    elif isinstance(exc, RequestFailed):  # closed for good, or cursors refused
                        self._fail_all(exc)
                        return
                    elif not isinstance(exc, OSError | HandshakeError | trio.BrokenResourceError):
                        raise
                await trio.sleep(self._backoff(attempt))
                attempt += 1
        finally:
            self._send_events.close()

    def _fail_all(self, exc: Exception) -> None:
        self._fatal = exc
        self._connected.set()
        for pending in self._pending.values():
            pending.error = exc
            pending.done.set()

    async def _run_connection(self) -> None:
        token = self._token() if callable(self._token) else self._token
        headers = [(b"authorization", f"Bearer {token}".encode())]
        self._close_code: int | None = None
        async with trio.open_nursery() as nursery:
            ws = await connect_websocket_url(nursery, self.url, extra_headers=headers)
            try:
                try:
                    header, hello = _decode(await ws.get_message())  # type: ignore[arg-type]
                except ConnectionClosed as exc:
                    self._close_code = exc.reason.code if exc.reason else None
                    return
                if header.get("t") != "#hello":
                    raise HandshakeError()
                self.hello = hello
                self._generation += 1
                self.connections += 1
                self._ws = ws
                nursery.start_soon(self._read, ws, nursery.cancel_scope)
                if self._subscribe:
                    await self._resubscribe()
                for rid, pending in list(self._pending.items()):
                    await self._transmit(rid, pending)
                self._connected.set()
                await trio.sleep_forever()  # until _read sees the close and cancels us
            finally:
                self._ws = None
                self._connection_lost()
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await ws.aclose()
        if self._close_code in _FATAL_CLOSES:
            code = self._close_code
            raise RequestFailed("Closed", f"closed with code {code}", {"code": code})

    async def _resubscribe(self) -> None:
        """Subscribe with the yielded positions as explicit cursors."""
        while True:
            cursors = [{"conversation": c, "seq": s} for c, s in self._yielded.items()]
            try:
                await self.request("#subscribe", cursors=cursors)
                return
            except RequestFailed as exc:
                gone = exc.body.get("conversation")
                if exc.error != "NotMember" or gone not in self._yielded:
                    raise
                del self._yielded[gone]  # removed while away: nothing more to resume

    def _connection_lost(self) -> None:
        for pending in self._pending.values():
            if pending.t not in _IDEMPOTENT and pending.sent_on and not pending.done.is_set():
                pending.error = ConnectionLost(f"connection lost during {pending.t}")
                pending.done.set()

    async def _read(self, ws: WebSocketConnection, connection: trio.CancelScope) -> None:
        try:
            while True:
                data = await ws.get_message()
                if isinstance(data, bytes):
                    self._dispatch(*_decode(data))
        except ConnectionClosed as exc:
            self._close_code = exc.reason.code if exc.reason else None
            connection.cancel()

    def _dispatch(self, header: dict[str, Any], body: dict[str, Any]) -> None:
        rid = body.get("id")
        t = header.get("t")
        # Replies: #result, or #error for a request that failed (an op: -1
        # frame is not a reply: it ends the stream, and the close follows).
        if t in ("#result", "#error") and rid in self._pending:
            pending = self._pending[rid]
            if t == "#error":
                error = RequestFailed(body.get("error", "?"), body.get("message", ""), body)
                pending.error = error
            else:
                pending.reply = body
            pending.done.set()
        elif header.get("op") == 1 and t not in ("#result", "#error", "#hello"):
            self._send_events.send_nowait(parse_event(str(header["t"]), body))
