"""A small test client speaking the wire protocol over a real WebSocket.

Uses trio-websocket (a third-party client) so the tests exercise the relay
exactly as an outside client would.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import cbor2
import jwt
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
AUDIENCE = "did:web:relay.test"


def make_token(
    user: str, device: str, *, secret: str = SECRET, lifetime: int = 600, **overrides: Any
) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": user,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + lifetime,
        "jti": uuid.uuid4().hex,
        "device": device,
    }
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, secret, algorithm="HS256")


def decode(data: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    stream = io.BytesIO(data)
    dec = cbor2.CBORDecoder(stream)
    header = dec.decode()
    body = dec.decode()
    assert stream.tell() == len(data), "trailing bytes in frame"
    return header, body


def encode(t: str, body: dict[str, Any]) -> bytes:
    return cbor2.dumps({"t": t, "op": 1}, canonical=True) + cbor2.dumps(body, canonical=True)


class ConnectionLost(Exception):
    """The connection closed while a request was waiting for its reply."""


@dataclass
class Reply:
    ok: bool
    body: dict[str, Any]


@dataclass
class Client:
    ws: WebSocketConnection
    user: str
    device: str
    hello: dict[str, Any]
    events_send: trio.MemorySendChannel[tuple[dict[str, Any], dict[str, Any]]]
    events: trio.MemoryReceiveChannel[tuple[dict[str, Any], dict[str, Any]]]
    _waiting: dict[int, tuple[trio.Event, list[Reply]]] = field(default_factory=dict)
    _next_id: int = 1
    close_code: int | None = None
    closed: trio.Event = field(default_factory=trio.Event)
    _skipped: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)

    async def _reader(self) -> None:
        try:
            while True:
                data = await self.ws.get_message()
                assert isinstance(data, bytes)
                header, body = decode(data)
                rid = body.get("id")
                t = header.get("t")
                if t in ("#result", "#error") and rid is not None:
                    event, slot = self._waiting.pop(rid)
                    slot.append(Reply(t == "#result", body))
                    event.set()
                else:
                    await self.events_send.send((header, body))
        except ConnectionClosed as exc:
            self.close_code = exc.reason.code if exc.reason else None
        finally:
            self.closed.set()
            for event, _slot in self._waiting.values():
                event.set()  # an empty slot means: no reply will ever come
            self._waiting.clear()
            await self.events_send.aclose()

    async def send_raw(self, data: bytes) -> None:
        await self.ws.send_message(data)

    async def request(self, t: str, **body: Any) -> Reply:
        rid = self._next_id
        self._next_id += 1
        event = trio.Event()
        slot: list[Reply] = []
        self._waiting[rid] = (event, slot)
        await self.ws.send_message(encode(t, {"id": rid, **body}))
        await event.wait()
        if not slot:
            raise ConnectionLost(f"connection closed before the reply to {t}")
        return slot[0]

    async def ok(self, t: str, **body: Any) -> dict[str, Any]:
        reply = await self.request(t, **body)
        assert reply.ok, reply.body
        return reply.body

    async def send(self, conversation: bytes, ciphertext: bytes, cmid: str | None = None) -> int:
        body = await self.ok(
            "#send",
            conversation=conversation,
            ciphertext=ciphertext,
            client_message_id=cmid or uuid.uuid4().hex,
        )
        return int(body["seq"])

    async def next_event(self, t: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The next event of type ``t``; events of other types stay queued, in order."""
        for i, (header, body) in enumerate(self._skipped):
            if t is None or header.get("t") == t:
                del self._skipped[i]
                return header, body
        while True:
            header, body = await self.events.receive()
            if t is None or header.get("t") == t:
                return header, body
            self._skipped.append((header, body))

    async def caught_up(self) -> None:
        while True:
            _, body = await self.next_event("#info")
            if body["name"] == "CaughtUp":
                return

    async def messages(self, n: int, conversation: bytes | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while len(out) < n:
            _, body = await self.next_event("#message")
            if conversation is None or body["conversation"] == conversation:
                out.append(body)
        return out


@asynccontextmanager
async def connect(
    url: str, user: str, device: str = "d1", *, token: str | None = None, subscribe: bool = False
) -> AsyncIterator[Client]:
    token = token or make_token(user, device)
    async with (
        open_websocket_url(
            url,
            extra_headers=[(b"authorization", f"Bearer {token}".encode())],
            message_queue_size=0,
        ) as ws,
        trio.open_nursery() as nursery,
    ):
        header, hello = decode(await ws.get_message())  # type: ignore[arg-type]
        assert header["t"] == "#hello", header
        send, receive = trio.open_memory_channel[tuple[dict[str, Any], dict[str, Any]]](100000)
        client = Client(ws, user, device, hello, send, receive)
        nursery.start_soon(client._reader)
        if subscribe:
            await client.ok("#subscribe")
        yield client
        nursery.cancel_scope.cancel()
