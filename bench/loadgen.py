"""Load generator: many real WebSocket clients per process, loopback only.

Each generator process (:func:`worker_main`, started by ``bench/run.py`` via
multiprocessing) runs one Trio loop.  Connections are set up with ordinary
Trio socket calls (RFC 6455 handshake with a checked ``Sec-WebSocket-Accept``,
then ``#createConversation`` / ``#subscribe`` request-reply).  After setup
every socket is registered in ONE private ``epoll`` object whose own fd is
awaited with ``trio.lowlevel.wait_readable``: a single task then reads every
ready connection per wake-up.  That keeps the generator's cost per received
frame at a few microseconds instead of one Trio task switch per frame, so the
generator is not the bottleneck on a 2-core machine (see README: ceiling).

Frames sent are real client frames (masked with a fresh key per frame);
frames received are parsed from the WebSocket framing.  Only the header of
each CBOR payload is looked at (``#message`` / ``#result`` / error) and the
send timestamp is found inside the ciphertext, which starts with ``MAGIC``
followed by ``time.monotonic_ns()`` at send time (monotonic is system-wide on
Linux, so latencies are comparable across processes).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import random
import resource
import select
import socket
import time
import uuid
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import cbor2
import jwt
import trio

SECRET = "bench-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
AUDIENCE = "did:web:relay.bench"
WS_PATH = "/v1/ws"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
LOOPBACK = "127.0.0.1"

#: Marks the start of a benchmark ciphertext; followed by 8 bytes of send time.
MAGIC = b"\xb3NCHts\x00\x01"


def _header(t: str | None, op: int = 1) -> bytes:
    # Same bytes as protocol.frames.encode_header (DAG-CBOR key order: t, op).
    return cbor2.dumps({"op": op} if op == -1 else {"t": t, "op": op})


MSG_HDR = _header("#message")
RESULT_HDR = _header("#result")
ERROR_HDR = _header("#error")  # a request's error reply (docs/PROTOCOL.md)
HELLO_HDR = _header("#hello")
INFO_HDR = _header("#info")


def user_did(i: int) -> str:
    return f"did:bench:u{i}"


def conversation_id(c: int) -> bytes:
    return b"bench-conv-" + c.to_bytes(4, "big")


def make_token(user: str, device: str, lifetime: int = 3600) -> str:
    now = int(time.time())
    claims = {
        "sub": user,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + lifetime,
        "jti": uuid.uuid4().hex,
        "device": device,
    }
    return jwt.encode(claims, SECRET, algorithm="HS256")


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- WebSocket framing (client side) ---------------------------------------------


def client_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """One FIN client frame, masked with a fresh random key (RFC 6455 5.3)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = random.getrandbits(32).to_bytes(4, "little")
    if n:
        mask = (key * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "little") ^ int.from_bytes(mask, "little")).to_bytes(
            n, "little"
        )
    else:
        masked = b""
    return head + key + masked


def request_frame(t: str, body: dict[str, Any]) -> bytes:
    return client_frame(_header(t) + cbor2.dumps(body))


def parse_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Split unmasked server frames: ([(opcode, payload)], leftover)."""
    out: list[tuple[int, bytes]] = []
    i, n = 0, len(data)
    while n - i >= 2:
        ln = data[i + 1] & 0x7F
        h = 2
        if ln == 126:
            if n - i < 4:
                break
            ln = int.from_bytes(data[i + 2 : i + 4], "big")
            h = 4
        elif ln == 127:
            if n - i < 10:
                break
            ln = int.from_bytes(data[i + 2 : i + 10], "big")
            h = 10
        end = i + h + ln
        if end > n:
            break
        out.append((data[i] & 0x0F, data[i + h : end]))
        i = end
    return out, data[i:]


def decode_payload(payload: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    import io

    stream = io.BytesIO(payload)
    dec = cbor2.CBORDecoder(stream)
    return dec.decode(), dec.decode()


def ciphertext(size: int) -> bytes:
    """A ciphertext carrying the current monotonic time after MAGIC."""
    return MAGIC + time.monotonic_ns().to_bytes(8, "big") + bytes(max(0, size - 16))


# --- one connection ------------------------------------------------------------


@dataclass(eq=False)
class Conn:
    index: int
    user: str
    device: str
    sock: trio.socket.SocketType
    fd: int = -1
    buf: bytes = b""
    out: bytes = b""
    next_id: int = 1
    conversation: bytes | None = None
    closed: bool = False
    frames: list[tuple[int, bytes]] = field(default_factory=list)


class HandshakeError(Exception):
    pass


async def ws_connect(port: int, index: int, user: str, device: str) -> Conn:
    """TCP connect to 127.0.0.1:port and complete the WebSocket handshake."""
    sock = trio.socket.socket()
    try:
        # Like any interactive WebSocket client: no Nagle delay on small frames.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await sock.connect((LOOPBACK, port))
        key = base64.b64encode(os.urandom(16))
        head = (
            f"GET {WS_PATH} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {make_token(user, device)}\r\n\r\n"
        ).encode()
        await sock.send(head)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await sock.recv(65536)
            if not chunk:
                raise HandshakeError(f"connection closed during handshake: {data[:200]!r}")
            data += chunk
        resp, _, rest = data.partition(b"\r\n\r\n")
        lines = resp.split(b"\r\n")
        if b" 101 " not in lines[0] + b" ":
            raise HandshakeError(f"handshake refused: {resp[:300]!r}")
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (x.partition(b":") for x in lines[1:])
        }
        if headers.get(b"sec-websocket-accept") != accept:
            raise HandshakeError("bad Sec-WebSocket-Accept")
    except BaseException:
        sock.close()
        raise
    conn = Conn(index, user, device, sock, fd=sock.fileno(), buf=rest)
    return conn


async def next_frame(conn: Conn) -> tuple[int, bytes]:
    """Setup-time read of the next complete frame (before epoll takes over)."""
    while not conn.frames:
        frames, conn.buf = parse_frames(conn.buf)
        conn.frames.extend(frames)
        if conn.frames:
            break
        chunk = await conn.sock.recv(262144)
        if not chunk:
            raise ConnectionError("server closed the connection")
        conn.buf += chunk
    return conn.frames.pop(0)


async def request(conn: Conn, t: str, **body: Any) -> dict[str, Any]:
    """Send a request and wait for its reply (setup only); raises on error replies."""
    rid = conn.next_id
    conn.next_id += 1
    await conn.sock.send(request_frame(t, {"id": rid, **body}))
    while True:
        op, payload = await next_frame(conn)
        if op == 0x8:
            raise ConnectionError(f"closed by server: {payload!r}")
        if op == 0x9:  # the relay closes connections that do not answer pings
            await conn.sock.send(client_frame(payload, 0xA))
            continue
        if op != 0x2:
            continue
        header, reply = decode_payload(payload)
        if reply.get("id") != rid:
            continue
        if header.get("op") != 1:
            raise RuntimeError(f"{t} failed: {reply}")
        return reply


async def expect_hello(conn: Conn) -> None:
    op, payload = await next_frame(conn)
    if op != 0x2 or not payload.startswith(HELLO_HDR):
        raise HandshakeError(f"expected #hello, got opcode {op}: {payload[:80]!r}")


# --- the generator process --------------------------------------------------------


class Generator:
    """All connections of one generator process, pumped by one epoll task."""

    def __init__(self, port: int, worker: int) -> None:
        self.port = port
        self.worker = worker
        self.conns: dict[int, Conn] = {}
        self.senders: list[Conn] = []
        self.epoll = select.epoll()
        self.rate = 0.0
        self.t0 = 0.0
        self.sent = 0
        self.k = worker << 40
        self.size = 0
        self.active: list[Conn] = []
        self.reset()
        self.closed_by_server = 0

    def reset(self) -> None:
        self.delivered = 0
        self.results = 0
        self.errors = 0
        self.latencies_us = array("q")

    # --- setup ---

    async def open_many(
        self, indices: list[int], concurrency: int, job: Callable[[Conn], Any] | None = None
    ) -> list[Conn]:
        opened: list[Conn] = []
        limiter = trio.CapacityLimiter(concurrency)

        async def one(i: int) -> None:
            async with limiter:
                conn = await ws_connect(self.port, i, user_did(i), "d1")
                await expect_hello(conn)
                opened.append(conn)

        async with trio.open_nursery() as nursery:
            for i in indices:
                nursery.start_soon(one, i)
        opened.sort(key=lambda c: c.index)
        return opened

    async def each(self, conns: list[Conn], concurrency: int, fn: Callable[[Conn], Any]) -> None:
        limiter = trio.CapacityLimiter(concurrency)

        async def one(conn: Conn) -> None:
            async with limiter:
                await fn(conn)

        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(one, conn)

    def adopt(self, conns: list[Conn]) -> None:
        """Hand connections to the epoll pump (no more setup reads on them)."""
        for conn in conns:
            if conn.frames or conn.buf:
                data, conn.buf = conn.buf, b""
                conn.frames.clear()
                if data:
                    self._on_data(conn, data, time.monotonic_ns())
            self.conns[conn.fd] = conn
            self.epoll.register(conn.fd, select.EPOLLIN)

    async def setup_fanout(
        self, indices: list[int], group: int, subscribe: bool, concurrency: int
    ) -> None:
        conns = await self.open_many(indices, concurrency)
        by_conv: dict[int, list[Conn]] = {}
        for conn in conns:
            by_conv.setdefault(conn.index // group, []).append(conn)

        async def create(c: int) -> None:
            members = by_conv[c]
            await request(
                members[0],
                "#createConversation",
                conversation=conversation_id(c),
                members=[m.user for m in members[1:]],
            )
            for m in members:
                m.conversation = conversation_id(c)

        async with trio.open_nursery() as nursery:
            for c in by_conv:
                nursery.start_soon(create, c)
        if subscribe:
            await self.each(conns, concurrency, lambda conn: request(conn, "#subscribe"))
        self.senders = [c for c in conns if c.conversation is not None]
        self.adopt(conns)

    async def setup_idle(self, indices: list[int], subscribe: bool, concurrency: int) -> None:
        conns = await self.open_many(indices, concurrency)
        if subscribe:
            await self.each(conns, concurrency, lambda conn: request(conn, "#subscribe"))
        self.adopt(conns)

    def close_all(self) -> None:
        for fd, conn in list(self.conns.items()):
            with contextlib.suppress(OSError):
                self.epoll.unregister(fd)
            with contextlib.suppress(OSError):
                os.write(fd, client_frame(b"\x03\xe8", 0x8))
            conn.sock.close()
        self.conns.clear()
        self.senders = []

    # --- hot path ---

    async def pump(self) -> None:
        """Forever: read every ready connection, parse frames, count and time them.

        Trio wakes this task when the private epoll has something ready (or
        every 2 ms while a step is sending); it then stays in a tight
        poll/read/send loop for up to 20 ms before yielding back to Trio.  The
        process has no other hot task, so blocking briefly in ``poll`` is
        harmless and batches many frames per wake-up."""
        epfd = self.epoll.fileno()
        poll = self.epoll.poll
        conns = self.conns
        mask_in = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
        while True:
            with trio.move_on_after(0.002 if self.rate else 0.05):
                await trio.lowlevel.wait_readable(epfd)
            until = time.monotonic() + 0.02
            while True:
                if self.rate:
                    self._send_due()
                events = poll(0.002 if self.rate else 0)
                now = time.monotonic_ns()
                for fd, ev in events:
                    conn = conns.get(fd)
                    if conn is None:
                        continue
                    if ev & select.EPOLLOUT:
                        self._flush(conn)
                    if ev & mask_in:
                        try:
                            data = os.read(fd, 262144)
                        except BlockingIOError:
                            continue
                        except OSError:
                            data = b""
                        if not data:
                            self._drop(conn)
                            continue
                        self._on_data(conn, data, now)
                if time.monotonic() >= until or not (events or self.rate):
                    break

    def _send_due(self) -> None:
        due = int(self.rate * (time.monotonic() - self.t0)) - self.sent
        if due <= 0:
            return
        senders = self.active
        n = len(senders)
        if not n:
            return
        for _ in range(due):
            conn = senders[self.k % n]
            self.k += 1
            self.send_message(conn, self.size, self.k)
        self.sent += due

    def _drop(self, conn: Conn) -> None:
        if not conn.closed:
            conn.closed = True
            self.closed_by_server += 1
            with contextlib.suppress(OSError):
                self.epoll.unregister(conn.fd)

    def _on_data(self, conn: Conn, data: bytes, now: int) -> None:
        if conn.buf:
            data = conn.buf + data
            conn.buf = b""
        i, n = 0, len(data)
        lat = self.latencies_us
        while n - i >= 2:
            ln = data[i + 1] & 0x7F
            h = 2
            if ln == 126:
                if n - i < 4:
                    break
                ln = (data[i + 2] << 8) | data[i + 3]
                h = 4
            elif ln == 127:
                if n - i < 10:
                    break
                ln = int.from_bytes(data[i + 2 : i + 10], "big")
                h = 10
            start = i + h
            end = start + ln
            if end > n:
                break
            op = data[i] & 0x0F
            if op == 0x2:
                if data.startswith(MSG_HDR, start):
                    self.delivered += 1
                    j = data.find(MAGIC, start, end)
                    if j >= 0:
                        lat.append((now - int.from_bytes(data[j + 8 : j + 16], "big")) // 1000)
                elif data.startswith(RESULT_HDR, start):
                    self.results += 1
                elif data.startswith(ERROR_HDR, start):
                    self.errors += 1
            elif op == 0x9:
                self._write(conn, client_frame(data[start:end], 0xA))
            elif op == 0x8:
                self._drop(conn)
                return
            i = end
        if i < n:
            conn.buf = data[i:]

    def _write(self, conn: Conn, frame: bytes) -> None:
        if conn.closed:
            return
        if conn.out:
            conn.out += frame
            return
        try:
            sent = os.write(conn.fd, frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(conn)
            return
        if sent < len(frame):
            conn.out = frame[sent:]
            self.epoll.modify(conn.fd, select.EPOLLIN | select.EPOLLOUT)

    def _flush(self, conn: Conn) -> None:
        data, conn.out = conn.out, b""
        if data:
            self._write(conn, data)
        if not conn.out and not conn.closed:
            self.epoll.modify(conn.fd, select.EPOLLIN)

    def send_message(self, conn: Conn, size: int, seq: int) -> None:
        assert conn.conversation is not None
        rid = conn.next_id
        conn.next_id += 1
        body = {
            "id": rid,
            "ciphertext": ciphertext(size),
            "conversation": conn.conversation,
            "client_message_id": f"m{seq}",
        }
        self._write(conn, client_frame(SEND_HDR + cbor2.dumps(body)))

    async def run_step(
        self, rate: float, warm: float, duration: float, size: int
    ) -> dict[str, Any]:
        """Open-loop sends at ``rate`` msgs/s (round robin over the senders,
        done by :meth:`pump`); counters cover only the last ``duration``."""
        self.active = [c for c in self.senders if not c.closed]
        self.size = size
        self.sent = 0
        self.t0 = time.monotonic()
        self.rate = rate
        try:
            await trio.sleep(warm)
            self.reset()
            sent0 = self.sent
            cpu0 = time.process_time()
            m0 = time.monotonic()
            await trio.sleep(duration)
        finally:
            self.rate = 0.0
        return {
            "elapsed_s": time.monotonic() - m0,
            "sent": self.sent - sent0,
            "delivered": self.delivered,
            "results": self.results,
            "errors": self.errors,
            "latencies_us": self.latencies_us.tobytes(),
            "cpu_s": time.process_time() - cpu0,
            "closed_by_server": self.closed_by_server,
        }


SEND_HDR = _header("#send")


def describe(exc: BaseException) -> str:
    """The distinct leaf exceptions of a (possibly grouped) error, with counts."""
    leaves: dict[str, int] = {}

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            key = f"{type(e).__name__}: {e}"
            leaves[key] = leaves.get(key, 0) + 1

    walk(exc)
    return "; ".join(f"{k} (x{n})" for k, n in leaves.items())


async def _pipe_recv(pipe: Connection) -> Any:
    while not pipe.poll():
        await trio.lowlevel.wait_readable(pipe.fileno())
    return pipe.recv()


async def _serve_commands(pipe: Connection, port: int, worker: int) -> None:
    gen = Generator(port, worker)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gen.pump)
        while True:
            cmd, args = await _pipe_recv(pipe)
            try:
                if cmd == "fanout":
                    t = time.monotonic()
                    await gen.setup_fanout(**args)
                    pipe.send(("ok", {"setup_s": time.monotonic() - t, "conns": len(gen.conns)}))
                elif cmd == "idle":
                    t = time.monotonic()
                    await gen.setup_idle(**args)
                    pipe.send(("ok", {"setup_s": time.monotonic() - t, "conns": len(gen.conns)}))
                elif cmd == "step":
                    pipe.send(("ok", await gen.run_step(**args)))
                elif cmd == "settle":
                    await trio.sleep(args["seconds"])
                    gen.reset()
                    pipe.send(("ok", {}))
                elif cmd == "close":
                    gen.close_all()
                    pipe.send(("ok", {}))
                elif cmd == "exit":
                    gen.close_all()
                    pipe.send(("ok", {}))
                    nursery.cancel_scope.cancel()
                    return
                else:
                    pipe.send(("error", f"unknown command {cmd}"))
            except Exception as exc:  # reported to the runner, which aborts
                pipe.send(("error", describe(exc)))


def worker_main(pipe: Connection, port: int, worker: int) -> None:
    """Entry point of a generator process (multiprocessing target)."""
    raise_nofile()
    trio.run(_serve_commands, pipe, port, worker)


# --- catch-up client ------------------------------------------------------------------


async def catch_up(port: int, index: int, expected: int) -> dict[str, float]:
    """Connect as device ``index``, #subscribe, and time until ``expected`` messages."""
    conn = await ws_connect(port, index, user_did(index), "d1")
    await expect_hello(conn)
    cpu0 = time.process_time()
    t0 = time.monotonic()
    await conn.sock.send(request_frame("#subscribe", {"id": 1}))
    count = 0
    t_result = 0.0
    buf = conn.buf
    conn.buf = b""
    while True:
        frames, buf = parse_frames(buf)
        for op, payload in frames:
            if op == 0x2:
                if payload.startswith(MSG_HDR):
                    count += 1
                elif payload.startswith(RESULT_HDR) and not t_result:
                    t_result = time.monotonic() - t0
                elif payload.startswith(ERROR_HDR):
                    raise RuntimeError(f"subscribe failed: {decode_payload(payload)}")
            elif op == 0x8:
                raise ConnectionError(f"closed by server after {count}: {payload!r}")
        if count >= expected:
            break
        more = await conn.sock.recv(1 << 20)
        if not more:
            raise ConnectionError(f"closed after {count} messages")
        buf += more
    elapsed = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    conn.sock.close()
    return {
        "messages": count,
        "seconds": elapsed,
        "messages_per_s": count / elapsed,
        "first_result_s": t_result,
        "client_cpu_s": cpu,
    }
