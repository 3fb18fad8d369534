"""The outbox counts every byte queued for a connection (relay/delivery/outbox.py):
replies, pongs and events as well as live messages; replays wait for room;
a connection closed for not reading loses nothing acknowledged."""

from __future__ import annotations

import socket

import pytest
import trio

from protocol.websocket import binary_frame, close_frame
from relay.delivery.outbox import Flusher, Outbox
from tests.harness import running_relay
from tests.relayclient import connect, encode
from tests.test_protocol_frames import client_frame
from tests.test_slow_consumer import _stalled_subscriber

ALICE, BOB = "did:example:alice", "did:example:bob"


def _pair(limit: int) -> tuple[Outbox, socket.socket, socket.socket, list[bool]]:
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ours.setblocking(False)
    outbox = Outbox(ours.fileno(), Flusher(), limit)
    backlog: list[bool] = []
    outbox.on_backlog = backlog.append
    return outbox, ours, theirs, backlog


def _read_frames(sock: socket.socket, data: bytes = b"") -> list[bytes]:
    """Server frames (unmasked) from what ``sock`` has, until it would block."""
    sock.setblocking(False)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except BlockingIOError:
        pass
    frames = []
    while data:
        n, head = data[1] & 0x7F, 2
        if n == 126:
            n, head = int.from_bytes(data[2:4], "big"), 4
        elif n == 127:
            n, head = int.from_bytes(data[2:10], "big"), 10
        frames.append(data[: head + n])
        data = data[head + n :]
    return frames


def test_replies_count_against_the_bound_and_close_frame_goes_past_it() -> None:
    outbox, ours, theirs, backlog = _pair(limit=20_000)
    failed: list[bool] = []
    outbox.on_fail = lambda: failed.append(outbox.overflowed)
    reply = binary_frame(b"r" * 1000)
    written = 0
    while outbox.write_control(reply):  # replies are bounded like live messages
        written += 1
        outbox.flush()  # the kernel takes some, then pushes back
        assert written < 1000, "the bound never held"
    assert failed == [True] and outbox.pending_bytes <= 20_000
    assert backlog == [True]  # the owner was told to stop reading at 3/4
    assert not outbox.write(reply)
    outbox.write_final(close_frame(4008, "ConsumerTooSlow"))
    assert outbox.pending_bytes > 20_000 - len(reply)
    ours.close()
    theirs.close()


def test_discard_keeps_frame_boundaries() -> None:
    outbox, ours, theirs, _ = _pair(limit=1 << 20)
    frames = [binary_frame(bytes([i]) * 3000) for i in range(200)]
    for f in frames:
        outbox.write(f)
    outbox.flush()  # partly sent: the kernel took some tens of KB
    assert outbox.pending_bytes
    outbox.discard()
    outbox.write_final(close_frame(4008, "ConsumerTooSlow"))
    got: list[bytes] = []
    data = b""
    for _ in range(100):
        outbox._blocked = False
        outbox.flush()
        try:
            data += theirs.recv(1 << 20)
        except BlockingIOError:
            break
        theirs.setblocking(False)
    got = _read_frames(theirs, data)
    # Whole frames in order, then the close frame: no frame was cut short.
    assert got[:-1] == frames[: len(got) - 1]
    assert got[-1] == close_frame(4008, "ConsumerTooSlow")
    assert 0 < len(got) - 1 < len(frames)
    ours.close()
    theirs.close()


async def test_replay_waits_for_room_and_never_passes_half() -> None:
    outbox, ours, theirs, _ = _pair(limit=64_000)
    frame = binary_frame(b"m" * 5000)
    most = 0

    async def replay() -> None:
        nonlocal most
        for _ in range(200):  # 1 MB through a 64 KB bound
            await outbox.wait_room_for(len(frame))
            assert outbox.write(frame)
            most = max(most, outbox.pending_bytes)
        outbox._flusher.flush()

    async def reader() -> None:
        theirs.setblocking(False)
        received = 0
        while received < 200 * len(frame):
            await trio.lowlevel.wait_readable(theirs)
            received += len(theirs.recv(65536))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            outbox.nursery = nursery
            nursery.start_soon(reader)
            nursery.start_soon(replay)
    assert not outbox.has_failed and most <= 32_000
    ours.close()
    theirs.close()


@pytest.mark.timeout(60)
async def test_a_result_lost_to_the_bound_is_durable_and_its_retry_gets_the_same_seq(
    database_url: str,
) -> None:
    """The #result of a send cannot be queued (the outbox is full): the
    connection is closed 4008, the send is stored anyway, and the retry with
    the same client_message_id gets the same seq, stored once."""
    conv = b"durable"
    with trio.fail_after(40):
        async with running_relay(database_url) as r:
            async with connect(r.ws_url, ALICE, "a1") as a:
                await a.ok("#createConversation", conversation=conv, members=[BOB])
                for i in range(40):  # 2.6 MB of history: more than the kernel buffers hold
                    await a.send(conv, b"%02d" % i + b"h" * 65536, f"m{i}")
            stalled = await _stalled_subscriber(r.port, BOB, "b1")
            while (BOB, "b1") not in r.relay.registry.sessions:  # noqa: ASYNC110 (polling the relay)
                await trio.sleep(0.01)
            outbox = r.relay.registry.sessions[(BOB, "b1")].outbox
            while outbox.pending_bytes < 65536:  # noqa: ASYNC110 (the replay is stuck)
                await trio.sleep(0.01)
            outbox.limit = outbox.pending_bytes  # at the bound: nothing more fits
            send = {"id": 2, "conversation": conv, "ciphertext": b"lost", "client_message_id": "x"}
            await stalled.send_all(client_frame(encode("#send", send)))
            with trio.fail_after(10):
                while (BOB, "b1") in r.relay.registry.sessions:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            assert r.relay.metrics_slow_consumers == 1
            await stalled.aclose()
            async with connect(r.ws_url, BOB, "b1", subscribe=True) as bob:
                replay = await bob.messages(41)
                await bob.caught_up()
                assert [m["seq"] for m in replay] == list(range(1, 42))
                assert replay[-1]["ciphertext"] == b"lost"  # stored, though never acknowledged
                retry = await bob.ok(
                    "#send", conversation=conv, ciphertext=b"lost", client_message_id="x"
                )
                assert retry["seq"] == 41
                assert await bob.send(conv, b"after", "y") == 42  # the retry stored nothing new
