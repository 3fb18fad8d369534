"""A client that stops reading is cut off (4008) without slowing anyone else,
and loses nothing: it resumes from its cursor."""

from __future__ import annotations

import base64
import os
import socket

import trio

from .harness import running_relay
from .relayclient import connect, encode, make_token
from .test_protocol_frames import client_frame

ALICE, BOB, CAROL = "did:example:alice", "did:example:bob", "did:example:carol"


async def _stalled_subscriber(port: int, user: str, device: str) -> trio.SocketStream:
    """A raw WebSocket client with a tiny receive buffer that subscribes and
    then never reads again."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    key = base64.b64encode(os.urandom(16)).decode()
    await stream.send_all(
        (
            f"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {make_token(user, device)}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(1)
    assert head.startswith(b"HTTP/1.1 101")
    await stream.send_all(client_frame(encode("#subscribe", {"id": 1})))
    return stream


async def test_slow_consumer_is_cut_off_and_resumes_without_loss(database_url):
    conv = b"firehose"
    n, size = 400, 16 * 1024
    with trio.fail_after(50):
        async with running_relay(database_url, outbox_limit=256 * 1024) as r:
            async with connect(r.ws_url, ALICE, "a1") as a:
                await a.ok("#createConversation", conversation=conv, members=[BOB, CAROL])
            stalled = await _stalled_subscriber(r.port, BOB, "b1")
            async with connect(r.ws_url, CAROL, "c1", subscribe=True) as carol:
                await carol.caught_up()

                async def send_part(k: int) -> None:
                    async with connect(r.ws_url, ALICE, f"a{k}") as a:
                        for i in range(k, n, 4):
                            await a.send(conv, i.to_bytes(4, "big") + b"x" * size, f"m{i}")

                async with trio.open_nursery() as nursery:
                    for k in range(4):
                        nursery.start_soon(send_part, k)
                # Carol, reading normally, got everything in order meanwhile.
                got = await carol.messages(n)
                assert [m["seq"] for m in got] == list(range(1, n + 1))
            assert r.relay.metrics_slow_consumers == 1
            assert (BOB, "b1") not in r.relay.registry.sessions
            await stalled.aclose()
            # Bob resumes from his (never acknowledged) cursor: nothing lost.
            async with connect(r.ws_url, BOB, "b1", subscribe=True) as bob:
                replay = await bob.messages(n)
                assert [m["seq"] for m in replay] == list(range(1, n + 1))
                assert len({m["ciphertext"][:4] for m in replay}) == n


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each unmasked server frame in ``data``, in order."""
    frames: list[tuple[int, bytes]] = []
    while data:
        opcode, n, at = data[0] & 0x0F, data[1] & 0x7F, 2
        if n == 126:
            n, at = int.from_bytes(data[2:4], "big"), 4
        elif n == 127:
            n, at = int.from_bytes(data[2:10], "big"), 10
        assert len(data) >= at + n, "the stream ended inside a frame"
        frames.append((opcode, data[at : at + n]))
        data = data[at + n :]
    return frames


async def test_silent_connection_is_closed_by_heartbeat(tmp_path):
    """A client that never answers pings is closed 1001 PingTimeout after two
    intervals of silence; one that answers them (trio-websocket pongs by
    itself), connected longer and otherwise just as silent, stays."""
    with trio.fail_after(20):
        async with (
            running_relay(f"sqlite:///{tmp_path}/r.db", ping_interval_s=0.3) as r,
            connect(r.ws_url, CAROL, "c1", subscribe=True) as answering,
        ):
            await answering.caught_up()
            stalled = await _stalled_subscriber(r.port, BOB, "b1")
            async with stalled:
                received = b""
                while chunk := await stalled.receive_some(65536):  # to the relay's EOF
                    received += chunk
                assert (BOB, "b1") not in r.relay.registry.sessions
            frames = server_frames(received)
            opcodes = [opcode for opcode, _ in frames]
            assert opcodes.count(0x9) >= 1  # pinged before being given up
            assert opcodes[-1] == 0x8 and opcodes.count(0x8) == 1  # ends with one close
            close = frames[-1][1]
            assert (int.from_bytes(close[:2], "big"), close[2:]) == (1001, b"PingTimeout")
            # Silent as long (longer: it connected first), but it answered the pings.
            assert (CAROL, "c1") in r.relay.registry.sessions and not answering.closed.is_set()
            assert (await answering.ok("#listConversations"))["conversations"] == []
