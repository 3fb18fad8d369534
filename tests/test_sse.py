"""GET /v1/events: a receive-only client over a raw TCP stream (no SSE library)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionRejected

from .harness import running_relay
from .relayclient import connect, make_token
from .test_relay_edges import http_request

ALICE, BOB = "did:example:alice", "did:example:bob"
C1, C2 = b"sse-one", b"sse-two"


@dataclass
class Event:
    name: str
    data: dict[str, Any]
    id: str | None


@dataclass
class SseReader:
    """Reads an HTTP/1.1 chunked text/event-stream response, event by event."""

    stream: trio.SocketStream
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    comments: list[str] = field(default_factory=list)
    _raw: bytes = b""
    _text: str = ""

    async def _more(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError("server closed the stream")
        self._raw += data

    async def open(self, path: str, headers: dict[str, str]) -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        await self.stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        while b"\r\n\r\n" not in self._raw:
            await self._more()
        head, _, self._raw = self._raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        assert self.headers.get("transfer-encoding") == "chunked", self.headers

    async def _chunk(self) -> None:
        while b"\r\n" not in self._raw:
            await self._more()
        size_line, _, rest = self._raw.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            raise EOFError("end of stream")
        while len(rest) < size + 2:
            await self._more()
            rest = self._raw.partition(b"\r\n")[2]
        self._text += rest[:size].decode()
        self._raw = rest[size + 2 :]

    async def _block(self) -> Event | None:
        """The next block: an event, or None for one of comments only."""
        while "\n\n" not in self._text:
            await self._chunk()
        block, _, self._text = self._text.partition("\n\n")
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            key, _, val = line.partition(": ")
            fields[key] = val
        if "event" in fields:
            return Event(fields["event"], json.loads(fields["data"]), fields.get("id"))
        return None

    async def event(self) -> Event:
        while True:
            ev = await self._block()
            if ev is not None:
                return ev

    async def idle_until_comment(self, text: str) -> None:
        """Read until the comment ``text`` arrives; no event may come first."""
        while text not in self.comments:
            ev = await self._block()
            assert ev is None, f"an event while idle: {ev}"

    async def until(self, name: str, info: str | None = None) -> list[Event]:
        """Events up to and including the first `name` (with data.name == info)."""
        seen = []
        while True:
            ev = await self.event()
            seen.append(ev)
            if ev.name == name and (info is None or ev.data.get("name") == info):
                return seen


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def messages(events: list[Event]) -> list[tuple[bytes, int, bytes]]:
    return [
        (
            base64.b64decode(e.data["conversation"]),
            e.data["seq"],
            base64.b64decode(e.data["ciphertext"]),
        )
        for e in events
        if e.name == "message"
    ]


async def open_sse(port: int, token: str, last_id: str | None = None) -> SseReader:
    reader = SseReader(await trio.open_tcp_stream("127.0.0.1", port))
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    if last_id:
        headers["Last-Event-ID"] = last_id
    await reader.open("/v1/events", headers)
    return reader


async def wait_for(predicate: Any) -> None:
    with trio.fail_after(10):
        while not predicate():  # noqa: ASYNC110 (polling a relay counter)
            await trio.sleep(0.02)


async def test_sse_live_then_resume_exactly_the_missed_ones(database_url):
    with trio.fail_after(45):
        async with (
            running_relay(database_url, sse_keepalive_s=0.3) as r,
            connect(r.ws_url, ALICE, "a1") as alice,
        ):
            await alice.ok("#createConversation", conversation=C1, members=[BOB])
            await alice.ok("#createConversation", conversation=C2, members=[BOB])
            token = make_token(BOB, "sse")
            bob = await open_sse(r.port, token)
            assert bob.status == 200
            assert bob.headers["content-type"].startswith("text/event-stream")
            first = await bob.until("info", "CaughtUp")
            assert first[0].name == "hello" and first[0].data["device"] == "sse"
            for i in range(1, 6):
                await alice.send(C1, b"one-%d" % i)
            await alice.send(C2, b"two-1")
            live = await bob.until("message")
            while len(messages(live)) < 6:
                live.append(await bob.event())
            got = messages(live)
            assert got == [(C1, i, b"one-%d" % i) for i in range(1, 6)] + [(C2, 1, b"two-1")]
            assert all(e.id for e in live if e.name == "message")
            # Idle: keep-alive comments flow (every 0.3 s; seen before anything is sent).
            bob.comments.clear()
            with trio.fail_after(10):
                await bob.idle_until_comment("keep-alive")
            await alice.send(C1, b"one-6")
            [six] = [e for e in await bob.until("message") if e.name == "message"]
            assert messages([six]) == [(C1, 6, b"one-6")] and six.id
            await bob.stream.aclose()
            await wait_for(lambda: r.relay.metrics.connections()["sse"] == 0)

            # Missed while away: C1 7..9 and C2 2..3 (stored cursors are still 0:
            # only the Last-Event-ID knows what this client has seen).
            for i in range(7, 10):
                await alice.send(C1, b"one-%d" % i)
            await alice.send(C2, b"two-2")
            await alice.send(C2, b"two-3")
            last_id = six.id
            # A fresh token: each one opens one stream (RELAY_TOKEN_SINGLE_USE).
            bob = await open_sse(r.port, make_token(BOB, "sse"), last_id)
            replay = await bob.until("info", "CaughtUp")
            assert sorted(messages(replay)) == sorted(
                [(C1, i, b"one-%d" % i) for i in range(7, 10)]
                + [(C2, 2, b"two-2"), (C2, 3, b"two-3")]
            )
            await alice.send(C2, b"two-4")
            tail = await bob.until("message")
            assert messages(tail) == [(C2, 4, b"two-4")]
            await bob.stream.aclose()


async def test_sse_refuses_bad_requests(tmp_path):
    with trio.fail_after(20):
        async with running_relay(f"sqlite:///{tmp_path}/r.db") as r:
            req = b"GET /v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            status, _, body = await http_request(r.port, req)
            assert (status, json.loads(body)["error"]) == (401, "AuthRequired")  # no token
            forged = make_token(BOB, "sse", secret="another-secret-0123456789-abcdefghijklmnop")
            req = (
                f"GET /v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                f"Authorization: Bearer {forged}\r\n\r\n"
            ).encode()
            status, _, body = await http_request(r.port, req)
            assert (status, json.loads(body)["error"]) == (401, "InvalidToken")  # a bad one
            token = make_token(BOB, "sse")
            req = (
                f"GET /v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                f"Authorization: Bearer {token}\r\nLast-Event-ID: garbage\r\n\r\n"
            ).encode()
            status, _, body = await http_request(r.port, req)
            assert status == 400 and json.loads(body)["error"] == "InvalidRequest"
            assert r.relay.metrics.connections()["sse"] == 0


async def test_sse_streams_count_as_connections_and_as_online(database_url):
    """An SSE stream holds a connection lease like a WebSocket: counted in the
    per-user limit (429 TooManyConnections beyond it, on either transport),
    its device online (no push), and its slot freed when it ends."""
    sse_request = (
        "GET /v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        "Authorization: Bearer {token}\r\n\r\n"
    )
    with trio.fail_after(30):
        async with running_relay(database_url, connections_per_user=1) as r:
            reader = await open_sse(r.port, make_token(ALICE, "a1"))
            assert reader.status == 200
            assert await r.relay.presence.online([(ALICE, "a1")]) == {(ALICE, "a1")}
            token = make_token(ALICE, "a2")
            status, _, body = await http_request(r.port, sse_request.format(token=token).encode())
            assert (status, json.loads(body)["error"]) == (429, "TooManyConnections")
            with pytest.raises(ConnectionRejected) as refused:  # a WebSocket of another device
                async with connect(r.ws_url, ALICE, "a2"):
                    pass
            assert refused.value.status_code == 429
            async with connect(r.ws_url, BOB, "b1"):  # other users are not affected
                pass
            await reader.stream.aclose()
            await wait_for(lambda: r.relay.metrics.connections()["sse"] == 0)
            assert await r.relay.presence.online([(ALICE, "a1")]) == set()
            async with connect(r.ws_url, ALICE, "a2"):  # the slot is free again
                pass
