"""Group commit lingers for company: sends close together share one transaction."""

from __future__ import annotations

from pathlib import Path

import trio

from protocol.errors import RelayError
from relay.committer import Committer, PendingSend
from relay.fanout import LocalFanOut
from relay.hub import Hub
from relay.outbox import Flusher
from storage import NewMessage, open_storage
from storage.base import Appended, Storage


async def _storage(tmp_path: Path) -> Storage:
    storage = open_storage(f"sqlite:///{tmp_path}/relay.db")
    await storage.migrate()
    await storage.create_conversation(b"c", "did:x:a", [], 1)
    return storage


def _committer(storage: Storage, *, linger: float, max_batch: int = 512) -> Committer:
    flusher = Flusher()
    return Committer(
        storage, LocalFanOut(Hub(flusher)), flusher, max_batch=max_batch, linger=linger
    )


def _send(committer: Committer, i: int, outcomes: list[Appended | RelayError]) -> None:
    message = NewMessage(b"c", "did:x:a", "d", f"m{i}", b"x", 2)
    committer.submit(PendingSend(message, outcomes.append, lambda: False))


async def _until(outcomes: list[Appended | RelayError], n: int) -> None:
    while len(outcomes) < n:  # noqa: ASYNC110 (the committer calls back synchronously)
        await trio.sleep(0.005)


async def test_sends_within_the_linger_share_one_commit(tmp_path: Path) -> None:
    storage = await _storage(tmp_path)
    for linger, batches in ((0.3, 1), (0.0, 2)):
        committer = _committer(storage, linger=linger)
        outcomes: list[Appended | RelayError] = []
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(committer.run)
                first = 0 if linger else 10  # client message ids differ between rounds
                _send(committer, first, outcomes)
                await trio.sleep(0.05)  # well inside the linger, but after a lone commit
                _send(committer, first + 1, outcomes)
                await _until(outcomes, 2)
                nursery.cancel_scope.cancel()
        assert all(isinstance(o, Appended) for o in outcomes)
        assert committer.batches == batches  # lingering joined them; without, two commits
    await storage.aclose()


async def test_a_full_batch_does_not_wait_for_the_linger(tmp_path: Path) -> None:
    storage = await _storage(tmp_path)
    committer = _committer(storage, linger=30.0, max_batch=4)
    outcomes: list[Appended | RelayError] = []
    with trio.fail_after(5):  # far shorter than the linger
        async with trio.open_nursery() as nursery:
            nursery.start_soon(committer.run)
            _send(committer, 0, outcomes)
            await trio.sleep(0.05)  # the committer is lingering now
            for i in range(1, 4):
                _send(committer, i, outcomes)  # the fourth fills the batch: commit at once
            await _until(outcomes, 4)
            nursery.cancel_scope.cancel()
    assert [o.seq for o in outcomes if isinstance(o, Appended)] == [1, 2, 3, 4]
    assert committer.batches == 1
    await storage.aclose()


async def test_a_lone_send_waits_no_longer_than_the_linger(tmp_path: Path) -> None:
    storage = await _storage(tmp_path)
    committer = _committer(storage, linger=0.2)
    outcomes: list[Appended | RelayError] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run)
        started = trio.current_time()
        _send(committer, 0, outcomes)
        with trio.fail_after(5):
            await _until(outcomes, 1)
        waited = trio.current_time() - started
        nursery.cancel_scope.cancel()
    assert 0.2 <= waited < 3.0
    await storage.aclose()
