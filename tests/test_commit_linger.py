"""Group commit lingers for company: sends close together share one transaction."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from protocol.errors import RelayError
from relay.delivery.committer import Committer, PendingSend
from relay.delivery.fanout import LocalFanOut
from relay.delivery.hub import Hub
from relay.delivery.outbox import Flusher
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


class Outcomes(list[Appended | RelayError]):
    """The committer's answers, and a way to wait for the n-th (it calls back
    synchronously, so an event per answer; no polling on a clock)."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = trio.Event()

    def add(self, outcome: Appended | RelayError) -> None:
        self.append(outcome)
        self.changed.set()
        self.changed = trio.Event()

    async def wait(self, n: int) -> None:
        while len(self) < n:
            await self.changed.wait()


def _send(committer: Committer, i: int, outcomes: Outcomes) -> None:
    message = NewMessage(b"c", "did:x:a", "d", f"m{i}", b"x", 2)
    committer.submit(PendingSend(message, outcomes.add, lambda: False))


# The tests run on trio's MockClock (pytest-trio's mock_clock: time stands still
# until the test jumps it), so the linger is measured in virtual time and a
# slow commit on a loaded machine cannot move a send in or out of it; "the
# committer is waiting" is wait_all_tasks_blocked(), not a guess at a delay.
# The pytest timeout (conftest) bounds each test in real time.


@pytest.mark.timeout(20)
async def test_sends_within_the_linger_share_one_commit(
    tmp_path: Path, mock_clock: MockClock
) -> None:
    storage = await _storage(tmp_path)
    for linger, batches in ((0.3, 1), (0.0, 2)):
        committer = _committer(storage, linger=linger)
        outcomes = Outcomes()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(committer.run)
            first = 0 if linger else 10  # client message ids differ between rounds
            _send(committer, first, outcomes)
            await wait_all_tasks_blocked()  # lingering, or (no linger) committing alone
            mock_clock.jump(linger * 0.9)  # still inside the linger
            _send(committer, first + 1, outcomes)
            await wait_all_tasks_blocked()
            if linger:
                assert outcomes == [] and committer.batches == 0  # the first send waits
            mock_clock.jump(linger)  # past the linger: the batch goes
            await outcomes.wait(2)
            nursery.cancel_scope.cancel()
        assert all(isinstance(o, Appended) for o in outcomes)
        assert committer.batches == batches  # lingering joined them; without, two commits
    await storage.aclose()


@pytest.mark.timeout(20)
async def test_a_full_batch_does_not_wait_for_the_linger(
    tmp_path: Path, mock_clock: MockClock
) -> None:
    storage = await _storage(tmp_path)
    committer = _committer(storage, linger=30.0, max_batch=4)
    outcomes = Outcomes()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run)
        _send(committer, 0, outcomes)
        await wait_all_tasks_blocked()  # the committer is lingering now
        for i in range(1, 4):
            _send(committer, i, outcomes)  # the fourth fills the batch: commit at once
        await wait_all_tasks_blocked()
        assert committer.queued() == 0  # the batch left the queue; virtual time never moved
        await outcomes.wait(4)
        nursery.cancel_scope.cancel()
    assert trio.current_time() == start
    assert [o.seq for o in outcomes if isinstance(o, Appended)] == [1, 2, 3, 4]
    assert committer.batches == 1
    await storage.aclose()


@pytest.mark.timeout(20)
async def test_a_lone_send_waits_exactly_the_linger(tmp_path: Path, mock_clock: MockClock) -> None:
    storage = await _storage(tmp_path)
    committer = _committer(storage, linger=0.2)
    outcomes = Outcomes()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run)
        _send(committer, 0, outcomes)
        await wait_all_tasks_blocked()
        mock_clock.jump(0.199)
        await wait_all_tasks_blocked()
        assert outcomes == [] and committer.queued() == 1  # not before the linger ends
        mock_clock.jump(0.002)
        await outcomes.wait(1)  # and at once after it
        nursery.cancel_scope.cancel()
    assert committer.batches == 1 and isinstance(outcomes[0], Appended)
    await storage.aclose()
