"""A hostile WebSocket client for the attack tests (tests/hostile/test_ws_*.py).

Raw sockets and hand-made frames: nothing here relies on a WebSocket library
that would answer pings, reassemble fragments or refuse to send what a
well-behaved client never would.  The attacker's receive buffer is tiny
(``SO_RCVBUF`` 4 KiB) and it reads nothing while it attacks, so whatever the
relay queues for it stays queued on the relay.

The relay answers a hostile connection by closing it, and its close frame
waits behind everything the attacker never read.  The relay drains it for at
most 2 s (relay/edge/session.py) before it drops the socket, so the attack stops
as soon as the test sees the relay close it (its metrics say so), and then
:meth:`Attacker.read_close` reads everything that was queued up to the close
frame.

Every loop is bounded in bytes and every wait in time.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import cbor2
import trio

from tests.relayclient import make_token

OP_CONT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x2, 0x8, 0x9, 0xA
#: What the attacker's kernel may buffer of the relay's replies (Linux doubles it).
RCVBUF = 4096


def mask(payload: bytes, key: bytes) -> bytes:
    """XOR with the 4-byte key, as one integer operation (fast for 1 MB)."""
    n = len(payload)
    if not n:
        return b""
    stream = (key * ((n + 3) // 4))[:n]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")
    return value.to_bytes(n, "little")


def frame(payload: bytes, opcode: int = OP_BINARY, *, fin: bool = True) -> bytes:
    """A masked client frame; any opcode, any fin bit, any size."""
    key = os.urandom(4)
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + key + mask(payload, key)


def cbor_message(t: str, body: dict[str, Any]) -> bytes:
    """A frame payload: the CBOR header ``{t, op: 1}`` then the body."""
    return cbor2.dumps({"t": t, "op": 1}) + cbor2.dumps(body)


def request(t: str, body: dict[str, Any]) -> bytes:
    return frame(cbor_message(t, body))


@dataclass
class ServerFrame:
    opcode: int
    payload: bytes

    @property
    def close(self) -> tuple[int, str]:
        """(code, reason) of a close frame."""
        assert self.opcode == OP_CLOSE and len(self.payload) >= 2, self
        return int.from_bytes(self.payload[:2], "big"), self.payload[2:].decode()

    def decoded(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(header, body) of a data frame."""
        from tests.relayclient import decode

        return decode(self.payload)


def parse_frames(data: bytes | bytearray) -> tuple[list[ServerFrame], int]:
    """Whole server frames (unmasked) in ``data``; and how many bytes they took."""
    frames: list[ServerFrame] = []
    i = 0
    while len(data) - i >= 2:
        n, head = data[i + 1] & 0x7F, i + 2
        if n == 126:
            if len(data) - head < 2:
                break
            n, head = int.from_bytes(data[head : head + 2], "big"), head + 2
        elif n == 127:
            if len(data) - head < 8:
                break
            n, head = int.from_bytes(data[head : head + 8], "big"), head + 8
        if len(data) - head < n:
            break
        frames.append(ServerFrame(data[i] & 0x0F, bytes(data[head : head + n])))
        i = head + n
    return frames, i


@dataclass
class Attacker:
    stream: trio.SocketStream
    #: Bytes read after the upgrade's head and not yet parsed into frames.
    buffered: bytearray = field(default_factory=bytearray)
    sent: int = 0
    #: Set when the relay dropped the socket under a send (reset or EPIPE).
    broken: bool = False
    #: The relay's answer to the upgrade (status line and headers).
    head: bytes = b""

    async def send(self, data: bytes) -> bool:
        """Send ``data``; False once the relay dropped the connection."""
        if self.broken:
            return False
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = True
            return False
        self.sent += len(data)
        return True

    async def flood(self, data: bytes, max_bytes: int) -> None:
        """Send ``data`` again and again, never reading, until ``max_bytes``
        went out or the relay dropped the socket.  The caller bounds the
        time (the relay may stop reading: then a send blocks)."""
        while self.sent < max_bytes and await self.send(data):
            await trio.lowlevel.checkpoint()

    async def receive(self, limit: float = 10) -> list[ServerFrame]:
        """Read what has arrived (waiting at most ``limit`` s for something);
        the whole frames in it.  Empty at end of stream."""
        with trio.move_on_after(limit):
            while True:
                frames, used = parse_frames(self.buffered)
                if frames:
                    del self.buffered[:used]
                    return frames
                try:
                    chunk = await self.stream.receive_some(1 << 20)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    chunk = b""
                if not chunk:
                    return []
                self.buffered += chunk
        raise AssertionError(f"nothing from the relay in {limit} s")

    async def read_close(self, limit: float = 10) -> tuple[list[ServerFrame], tuple[int, str]]:
        """Read everything up to and including the close frame: the data
        frames before it, and its (code, reason)."""
        frames: list[ServerFrame] = []
        with trio.move_on_after(limit):
            while True:
                got = await self.receive(limit)
                assert got, f"end of stream without a close frame after {len(frames)} frames"
                for f in got:
                    if f.opcode == OP_CLOSE:
                        return frames, f.close
                    frames.append(f)
        raise AssertionError(f"no close frame in {limit} s ({len(frames)} frames before)")

    async def reply(self, limit: float = 10) -> tuple[dict[str, Any], dict[str, Any]]:
        """The next data frame, decoded (control frames skipped)."""
        while True:
            for f in await self.receive(limit):
                if f.opcode == OP_BINARY:
                    return f.decoded()
                assert f.opcode in (OP_PING, OP_PONG), f"closed: {f.close}"

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def open_attacker(
    port: int,
    user: str,
    device: str,
    *,
    host: str = "127.0.0.1",
    rcvbuf: int = RCVBUF,
    headers: str = "",
) -> Attacker:
    """A WebSocket connection from ``host`` with a ``rcvbuf``-byte receive
    buffer, upgraded with a fresh token (and ``headers``, CRLF-terminated
    lines); the relay's #hello is buffered."""
    sock = trio.socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window
        await sock.bind((host, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    stream = trio.SocketStream(sock)
    key = base64.b64encode(os.urandom(16)).decode()
    head = (
        f"GET /v1/ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {make_token(user, device)}\r\n{headers}\r\n"
    )
    data = b""
    with trio.fail_after(10):
        await stream.send_all(head.encode())
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            assert chunk, f"no upgrade answer: {data[:200]!r}"
            data += chunk
    answer, _, rest = data.partition(b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 101"), answer[:300]
    return Attacker(stream, bytearray(rest), head=answer)


async def until(
    attack: Callable[[], Awaitable[None]],
    done: Callable[[], Awaitable[bool]],
    *,
    limit: float,
    period: float = 0.05,
) -> float:
    """Run ``attack`` until it returns, ``done()`` says the relay reacted,
    or ``limit`` s passed; returns the seconds it ran."""
    started = time.monotonic()
    with trio.move_on_after(limit):
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while not await done():  # noqa: ASYNC110 (polling the relay's metrics)
                    await trio.sleep(period)
                nursery.cancel_scope.cancel()

            async def run() -> None:
                await attack()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            nursery.start_soon(run)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def attacker(port: int, user: str, device: str, **options: Any) -> AsyncIterator[Attacker]:
    """:func:`open_attacker` as a context manager that always closes the socket."""
    att = await open_attacker(port, user, device, **options)
    try:
        yield att
    finally:
        await att.aclose()


# --- what the test watches while the attack runs --------------------------------


@dataclass
class Honest:
    """Two honest users on their own connections: Alice sends to Bob every
    ``period`` s while the attack runs; every send must succeed and reach Bob."""

    port: int
    period: float = 0.02
    conversation: bytes = b"honest-room"
    seqs: list[int] = field(default_factory=list)
    delivered: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    worst_send_ms: float = 0.0
    _stop: bool = False

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Honest]:
        from tests.relayclient import ConnectionLost, connect

        url = f"ws://127.0.0.1:{self.port}/v1/ws"
        alice, bob = "did:example:honest-alice", "did:example:honest-bob"
        async with connect(url, alice, "a1") as a:
            await a.ok("#createConversation", conversation=self.conversation, members=[bob])
            async with connect(url, bob, "b1", subscribe=True) as b:
                await b.caught_up()
                async with trio.open_nursery() as nursery:

                    async def sender() -> None:
                        n = 0
                        while not self._stop:
                            n += 1
                            started = time.perf_counter()
                            try:
                                reply = await a.request(
                                    "#send",
                                    conversation=self.conversation,
                                    ciphertext=b"hello %d" % n,
                                    client_message_id=f"h{n}",
                                )
                            except ConnectionLost as exc:
                                self.errors.append(str(exc))
                                return
                            elapsed = 1000 * (time.perf_counter() - started)
                            self.worst_send_ms = max(self.worst_send_ms, elapsed)
                            if reply.ok:
                                self.seqs.append(reply.body["seq"])
                            else:
                                self.errors.append(reply.body.get("error", "?"))
                            await trio.sleep(self.period)

                    nursery.start_soon(sender)
                    try:
                        yield self
                    finally:
                        self._stop = True  # the last send finishes: nothing half done
                with trio.fail_after(15):
                    got = await b.messages(len(self.seqs), self.conversation)
                self.delivered = [m["seq"] for m in got]

    def busy(self, at_least: int = 12) -> bool:
        """Fewer than ``at_least`` honest sends so far: an attack loop goes on
        until there are enough to judge by (a loaded machine sends fewer)."""
        return len(self.seqs) < at_least

    def check(self, at_least: int = 10) -> None:
        assert self.errors == [], self.errors
        assert len(self.seqs) >= at_least, f"only {len(self.seqs)} honest sends"
        assert self.delivered == self.seqs == list(range(1, len(self.seqs) + 1))


@dataclass
class Memory:
    """Peak resident memory of the relay process while the block runs."""

    pid: int
    before: float = 0.0
    peak: float = 0.0

    def now(self) -> float:
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    @property
    def growth(self) -> float:
        return self.peak - self.before

    @contextlib.asynccontextmanager
    async def sampling(self, period: float = 0.02) -> AsyncIterator[Memory]:
        self.before = self.peak = self.now()
        async with trio.open_nursery() as nursery:

            async def sample() -> None:
                while True:
                    self.peak = max(self.peak, self.now())
                    await trio.sleep(period)

            nursery.start_soon(sample)
            try:
                yield self
            finally:
                self.peak = max(self.peak, self.now())
                nursery.cancel_scope.cancel()
