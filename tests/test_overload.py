"""Overload: a congested commit queue stops the node reading sockets, then recovers."""

from __future__ import annotations

from pathlib import Path

import trio

from protocol.errors import RelayError, Unavailable
from relay.delivery.committer import Committer, PendingSend
from relay.delivery.fanout import LocalFanOut
from relay.delivery.hub import Hub
from relay.delivery.outbox import Flusher
from storage import NewMessage, open_storage
from storage.base import Appended

from .harness import running_relay
from .relayclient import connect


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


async def test_relay_reads_again_after_congestion(database_url: str) -> None:
    """The node reader waits while the queue is congested and resumes after."""
    with trio.fail_after(30):
        async with (
            running_relay(database_url) as r,
            connect(r.ws_url, "did:example:a", "d1") as client,
        ):
            await client.ok("#createConversation", conversation=b"c", members=[])
            committer = r.relay.committer
            committer._calm = trio.Event()  # as if the queue had filled up
            with trio.move_on_after(0.5) as blocked:
                await client.send(b"c", b"held back")
            assert blocked.cancelled_caught  # not read while congested
            assert r.relay.reader.throttled == 1
            committer._calm.set()
            seq = await client.send(b"c", b"after")
            assert seq == 2  # the held-back send was read first, in order


async def test_a_full_commit_queue_holds_sends_instead_of_refusing(database_url: str) -> None:
    """Sends that find the queue full wait in their session, in order, then commit."""
    with trio.fail_after(30):
        async with (
            running_relay(database_url) as r,
            connect(r.ws_url, "did:example:a", "d1") as client,
        ):
            await client.ok("#createConversation", conversation=b"c", members=[])
            assert await client.send(b"c", b"first") == 1  # the conversation's kind is cached
            committer = r.relay.committer
            limit, committer._limit = committer._limit, 0  # as if 4,096 sends were queued
            seqs: dict[int, int] = {}

            async def send(i: int) -> None:
                seqs[i] = await client.send(b"c", b"held %d" % i)

            async with trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(send, i)
                    await trio.sleep(0.02)  # sent in this order
                await trio.sleep(0.3)
                assert seqs == {}  # held, neither stored nor refused
                assert committer.queued() == 0
                committer._limit = limit
                committer._room.set()  # as when a batch leaves the queue
            assert [seqs[i] for i in range(5)] == [2, 3, 4, 5, 6]  # every one, in order
