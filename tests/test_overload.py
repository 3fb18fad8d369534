"""Overload: a congested commit queue stops the node reading sockets, then recovers."""

from __future__ import annotations

import base64
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from protocol.errors import RelayError, Unavailable
from relay.base.config import ConfigError, from_env
from relay.delivery.committer import Committer, PendingSend
from relay.delivery.fanout import LocalFanOut
from relay.delivery.hub import Hub
from relay.delivery.outbox import Flusher
from storage import NewMessage, open_storage
from storage.base import Appended

from .harness import running_relay
from .relayclient import connect, decode, encode, make_token
from .test_protocol_frames import client_frame
from .test_slow_consumer import server_frames


async def test_commit_queue_congestion_and_recovery(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/relay.db")
    await storage.migrate()
    await storage.create_conversation(b"c", "did:x:a", [], 1)
    flusher = Flusher()
    committer = Committer(storage, LocalFanOut(Hub(flusher)), flusher, max_batch=4, queue=16)
    outcomes: list[Appended | RelayError] = []
    for i in range(17):
        message = NewMessage(b"c", "did:x:a", "d", f"m{i}", b"x", 2)
        committer.submit(PendingSend(message, outcomes.append, lambda: False))
        assert committer.congested == (i >= 7)  # from half the queue (8 sends) on
    assert isinstance(outcomes.pop(), Unavailable)  # the 17th: queue full, refused retryably
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(committer.run)
            await committer.wait_calm()  # back under an eighth of the queue
            while len(outcomes) < 16:  # noqa: ASYNC110 (the committer calls back synchronously)
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert not committer.congested
    assert [o.seq for o in outcomes if isinstance(o, Appended)] == list(range(1, 17))
    await storage.aclose()


# --- through a relay, its queue filled for real --------------------------------
#
# Another connection holds the database's write lock (PostgreSQL: LOCK TABLE
# messages; SQLite: BEGIN IMMEDIATE), so the committer's append waits on a real
# lock and real clients' sends fill a small commit queue (RELAY_COMMIT_QUEUE
# 16, batches of 4: congested from 8, calm again under 2).  The lock is held for
# well under the shortest wait it meets (SQLite's 5 s busy timeout).

QUEUE, BATCH, PIPELINED = 16, 4, 40


@asynccontextmanager
async def write_locked(database_url: str) -> AsyncIterator[None]:
    """Hold the database's write lock from a connection of our own."""
    if database_url.startswith("sqlite:///"):
        lite = sqlite3.connect(database_url[len("sqlite:///") :], isolation_level=None)
        lite.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            lite.execute("ROLLBACK")
            lite.close()
        return
    pg = await trio.to_thread.run_sync(psycopg.connect, database_url)
    try:
        await trio.to_thread.run_sync(pg.execute, "LOCK TABLE messages IN EXCLUSIVE MODE")
        yield
    finally:
        await trio.to_thread.run_sync(pg.close)  # rolls back: the lock goes


async def raw_client(port: int, user: str, device: str) -> trio.SocketStream:
    """A WebSocket client on a plain socket: it can put many frames in one write."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
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
    assert head.startswith(b"HTTP/1.1 101"), head
    return stream


async def replies(stream: trio.SocketStream, n: int) -> list[tuple[str, dict[str, Any]]]:
    """The next ``n`` #result / #error frames, in arrival order."""
    data, out = b"", []
    while len(out) < n:
        data += await stream.receive_some(65536)
        while end := _frame_end(data):
            [(opcode, payload)] = server_frames(data[:end])
            data = data[end:]
            if opcode == 0x2:
                header, body = decode(payload)
                if header["t"] in ("#result", "#error"):
                    out.append((header["t"], body))
    return out


def _frame_end(data: bytes) -> int:
    """Length of the first unmasked server frame in ``data``; 0 while incomplete."""
    if len(data) < 2:
        return 0
    n, at = data[1] & 0x7F, 2
    if n >= 126:
        at = 4 if n == 126 else 10
        n = int.from_bytes(data[2:at], "big")
    return at + n if len(data) >= at + n else 0


def pipelined_sends(conv: bytes, first_id: int, n: int) -> bytes:
    """n #send frames in one buffer: one write, so the relay reads them at once."""
    return b"".join(
        client_frame(
            encode(
                "#send",
                {
                    "id": first_id + i,
                    "conversation": conv,
                    "ciphertext": b"held %d" % i,
                    "client_message_id": f"held-{i}",
                },
            )
        )
        for i in range(n)
    )


async def until(predicate: Callable[[], bool]) -> None:
    while not predicate():  # noqa: ASYNC110 (polling the relay's public counters)
        await trio.sleep(0.005)


@pytest.mark.timeout(60)
async def test_a_full_commit_queue_holds_sends_instead_of_refusing(database_url: str) -> None:
    """40 sends in one write, the queue takes 16: the rest wait in their
    session, and every one commits once the database moves, in order."""
    conv = b"c"
    with trio.fail_after(45):
        async with running_relay(
            database_url, commit_queue=QUEUE, commit_batch=BATCH, commit_linger_ms=0
        ) as r:
            committer = r.relay.committer
            async with connect(r.ws_url, "did:example:a", "d1") as a:
                await a.ok("#createConversation", conversation=conv, members=[])
                assert await a.send(conv, b"first") == 1  # the conversation's kind is cached
            raw = await raw_client(r.port, "did:example:a", "d2")
            async with write_locked(database_url):
                await raw.send_all(pipelined_sends(conv, 1, PIPELINED))
                with trio.fail_after(10):  # read at once; a batch of 4 waits on the lock
                    await until(lambda: committer.full)
                await wait_all_tasks_blocked(cushion=0.05)
                assert committer.full and committer.queued() == QUEUE  # nothing refused...
                assert committer.batches == 1 and committer.committed == 1  # ...or stored
                assert committer.congested
            got = await replies(raw, PIPELINED)
            assert [t for t, _ in got] == ["#result"] * PIPELINED, got  # none refused
            assert sorted((b["id"], b["seq"]) for _, b in got) == [
                (1 + i, 2 + i)
                for i in range(PIPELINED)  # every one, in the order sent
            ]
            await raw.aclose()
            assert committer.committed == 1 + PIPELINED and not committer.congested


@pytest.mark.timeout(60)
async def test_the_node_stops_reading_while_congested_and_reads_again_after(
    database_url: str,
) -> None:
    """With the queue over half full, a request on another connection is not
    even read (it waits in TCP buffers); it is answered once the queue drains."""
    conv = b"c"
    with trio.fail_after(45):
        async with (
            running_relay(
                database_url, commit_queue=QUEUE, commit_batch=BATCH, commit_linger_ms=0
            ) as r,
            connect(r.ws_url, "did:example:a", "d1") as a,
            connect(r.ws_url, "did:example:b", "d1") as b,
        ):
            committer, reader = r.relay.committer, r.relay.reader
            await a.ok("#createConversation", conversation=conv, members=[])
            assert await a.send(conv, b"first") == 1
            raw = await raw_client(r.port, "did:example:a", "d2")
            answered: list[dict[str, Any]] = []

            async def ask() -> None:
                answered.append(await b.ok("#listConversations"))

            async with trio.open_nursery() as nursery, write_locked(database_url):
                await raw.send_all(pipelined_sends(conv, 1, QUEUE))  # fills it, no more
                with trio.fail_after(10):
                    await until(lambda: committer.queued() == QUEUE - BATCH)
                assert committer.congested
                frames_in = r.relay.metrics.frames_in
                nursery.start_soon(ask)
                with trio.fail_after(10):  # the reader woke for b's bytes, and waits
                    await until(lambda: reader.throttled == 1)
                await wait_all_tasks_blocked(cushion=0.1)
                assert answered == [] and r.relay.metrics.frames_in == frames_in  # unread
                # The lock is gone: the queue drains, under an eighth the node reads on.
            assert len(answered) == 1  # answered after the drain
            got = await replies(raw, QUEUE)
            assert sorted(b["seq"] for _, b in got) == list(range(2, 2 + QUEUE))
            await raw.aclose()


@pytest.mark.parametrize("name, value", [("RELAY_COMMIT_QUEUE", "1"), ("RELAY_COMMIT_BATCH", "0")])
def test_commit_bounds_are_validated(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match="RELAY_COMMIT_QUEUE >= 2"):
        from_env({name: value})
    assert from_env({"RELAY_COMMIT_QUEUE": "16"}).commit_queue == 16
