"""CPU work never holds the event loop (issue 14, bug 4): ``/health/live``
answers within 20 ms while each of the three heavy jobs runs.

Two measures, per round of a job (ROUNDS rounds, each after an idle round
of the same length, which sees the same machine load):

* the slowest ``/health/live`` overlapping the round, from a probe process
  of its own (a blocking HTTP/1.1 connection, the next GET 1 ms after each
  answer), so a stall of the Trio loop shows as the latency of the probe in
  flight whenever in the stall it was sent;
* the longest task step, in CPU time of the loop's thread (a trio
  Instrument): how long one task held the loop, whatever the load, since
  time the process spends waiting for a core is not CPU time.

The MEDIAN round is asserted: one round may catch the machine busy
elsewhere (2 cores shared by several test runs), while a job that holds
the loop slows every round.  The step bound is hard: STEP_BOUND_S (the jobs
measure 2-3 ms; the old inline code 53 ms for 200 KeyPackages and 92-100
ms for the walk).  The probe bound is 20 ms plus twice the idle round's
median: on a loaded machine every hop of a request waits for a core, and a
job that keeps the loop busy two thirds of the time (2 ms slices, 1 ms
pauses) stretches those waits; the old code's stalls (94-184 ms for the
walk, 139-148 ms for the uploads) stay far above it.

Figures (sqlite / pg, this machine, loaded) are in the commit messages.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cbor2
import pytest
import trio
import trio.abc

from .harness import Running, running_relay
from .mls_helpers import http, make_key_package
from .relayclient import connect, make_token

ALICE = "did:example:alice"
#: Rounds of each job; the median round's slowest probe is asserted.
ROUNDS = 7
#: The bound of issue 14: the slowest probe of the median round (on top of
#: twice what the same probe gets with no job running: module docstring).
BOUND_S = 0.020
#: The longest task step of the median round, in CPU time of the loop.
STEP_BOUND_S = 0.010


#: The probe process: GET /health/live on one keep-alive connection, 1 ms
#: apart, printing each answer's start and end on CLOCK_MONOTONIC (the same
#: clock as time.monotonic() here, in any process).
PROBE = """
import sys, time
from http.client import HTTPConnection
conn = HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=10)
while True:
    started = time.monotonic()
    conn.request("GET", "/health/live")
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        sys.exit(f"/health/live answered {response.status}")
    print(started, time.monotonic(), flush=True)
    time.sleep(0.001)
"""


class Probe:
    """The probe's answers as (start, end), read as they come.

    A process of its own, not a thread of this one: a thread would wait for
    this process's GIL (up to the 5 ms switch interval at each hand-over),
    which is not what a client of the node sees."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.samples: list[tuple[float, float]] = []
        self.answered = trio.Event()

    async def read(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                start, end = line.split()
                self.samples.append((float(start), float(end)))
            self.answered.set()
            self.answered = trio.Event()
        code = await self.process.wait()
        raise AssertionError(f"the probe process ended (exit status {code})")

    def worst(self, start: float, end: float) -> tuple[float, int]:
        """The slowest probe overlapping [start, end], and how many did."""
        overlapping = [b - a for a, b in self.samples if a < end and b > start]
        return max(overlapping, default=0.0), len(overlapping)

    async def beyond(self, moment: float) -> None:
        """Until a probe sent after ``moment`` was answered: every probe that
        overlapped what came before is in ``samples`` by then."""
        with trio.fail_after(10):
            while not self.samples or self.samples[-1][0] <= moment:
                await self.answered.wait()


@asynccontextmanager
async def probing(port: int) -> AsyncIterator[Probe]:
    async with trio.open_nursery() as nursery:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", PROBE, str(port)], stdout=subprocess.PIPE
        )
        probe = Probe(process)
        nursery.start_soon(probe.read)
        try:
            with trio.fail_after(10):
                while len(probe.samples) < 20:  # warm: connection open, routes hot
                    await probe.answered.wait()
            yield probe
        finally:
            nursery.cancel_scope.cancel()  # the reader first: the probe's end is ours
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


class Steps(trio.abc.Instrument):
    """The CPU time (of the loop's thread) of the longest task step since
    the last reset: how long one task held the loop, whatever the machine's
    load, as preemption by other processes costs no CPU time."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._began = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._began = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.longest = max(self.longest, time.thread_time() - self._began)


@dataclass
class Rounds:
    """Per round, in milliseconds: the slowest probe, the longest task step
    (CPU time), and the round's length."""

    probes: list[float] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)
    lengths: list[float] = field(default_factory=list)


async def rounds(probe: Probe, job: Callable[[], Awaitable[object]]) -> tuple[Rounds, Rounds]:
    """Run ``job`` ROUNDS times, each after a round of the same length with
    no job running: the machine's load changes by the second, and the pairs
    see the same."""
    steps = Steps()
    trio.lowlevel.add_instrument(steps)
    during, baseline = Rounds(), Rounds()
    length = 0.1

    async def nothing() -> None:
        await trio.sleep(length)

    try:
        for _ in range(ROUNDS):
            await one(probe, steps, nothing, baseline)
            await one(probe, steps, job, during)
            length = max(0.05, during.lengths[-1] / 1000)
    finally:
        trio.lowlevel.remove_instrument(steps)
    return during, baseline


async def one(
    probe: Probe, steps: Steps, job: Callable[[], Awaitable[object]], into: Rounds
) -> None:
    await trio.sleep(0.05)  # a gap, so that rounds do not share a probe
    start = time.monotonic()
    steps.longest = 0.0
    await job()
    end = time.monotonic()
    # A job that never yields ran inside this very step: end it first.
    await trio.lowlevel.checkpoint()
    into.steps.append(round(steps.longest * 1000, 1))
    into.lengths.append(round((end - start) * 1000, 1))
    await probe.beyond(end)
    slowest, count = probe.worst(start, end)
    assert count >= 1, "no probe ran during the round: it measured nothing"
    into.probes.append(round(slowest * 1000, 1))


def check(name: str, measured: tuple[Rounds, Rounds]) -> None:
    during, baseline = measured
    print(f"{name}: {during}")
    print(f"  with no job running: {baseline}")
    # The machine's own delay is allowed on top of the bound (module docstring).
    allowed = BOUND_S * 1000 + 2 * statistics.median(baseline.probes)
    assert statistics.median(during.probes) <= allowed, (name, during, baseline)
    assert statistics.median(during.steps) <= STEP_BOUND_S * 1000, (name, during, baseline)


# --- 1. KeyPackage uploads (relay/edge/http/keypackages.py) ------------------------------


@pytest.mark.timeout(120)
async def test_health_answers_while_200_key_packages_validate(database_url: str) -> None:
    kps = [make_key_package(ALICE) for _ in range(200)]
    body = cbor2.dumps(kps)
    token = make_token(ALICE, "a1")
    with trio.fail_after(100):
        async with running_relay(database_url) as r, probing(r.port) as probe:

            async def upload() -> None:
                status, _, answer = await http(
                    r.port, "POST", "/v1/keypackages", token, body, "application/cbor"
                )
                assert status == 200, answer  # every round validates all 200

            check("200 KeyPackages", await rounds(probe, upload))


# --- 2. The delivery-state walk (relay/offline/delivery_state.py) ------------------------------

SESSIONS = 1000
CONVERSATIONS = 200
#: Conversations that get a message before the rounds.
MOVED = 5


class Sessions:
    """SESSIONS subscribed devices of one user, held open until cancelled;
    each waits for MOVED messages once they are sent."""

    def __init__(self, r: Running) -> None:
        self.r = r
        self.gate = trio.Semaphore(64)  # connecting is bounded; holding is not
        self.open = self.received = 0
        self.all_open, self.sent, self.all_received = trio.Event(), trio.Event(), trio.Event()

    async def hold(self, device: str) -> None:
        await self.gate.acquire()
        connecting = True
        try:
            async with connect(self.r.ws_url, ALICE, device, subscribe=True) as client:
                self.gate.release()
                connecting = False
                self.open += 1
                if self.open == SESSIONS:
                    self.all_open.set()
                await self.sent.wait()
                await client.messages(MOVED)
                self.received += 1
                if self.received == SESSIONS:
                    self.all_received.set()
                await trio.sleep_forever()
        finally:
            if connecting:
                self.gate.release()


@pytest.mark.timeout(300)
async def test_health_answers_while_the_delivery_state_walk_runs(database_url: str) -> None:
    unbounded = {
        "connections_per_user": 0,
        "connections_per_address": 0,
        "requests_per_user": 1e9,
        "delivery_flush_s": 3600.0,  # the rounds below are the test's own
    }
    convs = [b"walk-%d" % i for i in range(CONVERSATIONS)]
    with trio.fail_after(280):
        async with (
            running_relay(database_url, **unbounded) as r,
            connect(r.ws_url, ALICE, "creator") as creator,
            trio.open_nursery() as nursery,
        ):
            for conv in convs:
                await creator.ok("#createConversation", conversation=conv, members=[])
            sessions = Sessions(r)
            for i in range(SESSIONS):
                nursery.start_soon(sessions.hold, f"d{i}")
            setup = time.monotonic()
            await sessions.all_open.wait()
            print(f"{SESSIONS} sessions open in {time.monotonic() - setup:.1f} s")
            for conv in convs[:MOVED]:  # positions that move: rows the first round writes
                await creator.send(conv, b"moved")
            sessions.sent.set()
            await sessions.all_received.wait()
            tracker = r.relay.delivery
            written = tracker.rows_written
            async with probing(r.port) as probe:
                measured = await rounds(probe, tracker.flush)
            nursery.cancel_scope.cancel()
        assert tracker.walked == SESSIONS * CONVERSATIONS  # every round visited them all
        # Each moved position written once, in the first round; none again.
        assert tracker.rows_written - written == SESSIONS * MOVED
        check(f"walk of {tracker.walked} streams", measured)


# --- 3. #deleteConversation with many blobs (relay/offline/blobs.py) -----------------------

BLOBS = 600 * ROUNDS


@pytest.mark.timeout(300)
async def test_health_answers_while_a_conversation_with_many_blobs_goes(
    database_url: str, tmp_path: Path
) -> None:
    blob_dir = tmp_path / "blobs"
    with trio.fail_after(280):
        async with (
            running_relay(database_url, blob_url=f"file://{blob_dir}") as r,
            connect(r.ws_url, ALICE, "a1") as alice,
            probing(r.port) as probe,
        ):
            blobs = r.relay.blobs
            conversations: list[bytes] = []
            for i in range(ROUNDS):
                conv = b"blobs-%d" % i
                await alice.ok("#createConversation", conversation=conv, members=[], storage="blob")
                for _ in range(BLOBS // ROUNDS):  # the relay's own path of a large #send
                    await blobs.save(conv, ALICE, "a1", b"x" * 64)
                conversations.append(conv)
            assert sum(1 for p in blob_dir.rglob("*") if p.is_file()) == BLOBS
            collected = blobs.collected
            deletions = iter(conversations)
            replies: list[float] = []
            early = 0  # replies that came before the collector was done

            async def delete() -> None:
                nonlocal early
                started, before = time.monotonic(), blobs.collected
                await alice.ok("#deleteConversation", conversation=next(deletions))
                replies.append(round((time.monotonic() - started) * 1000, 1))
                early += blobs.collected - before < BLOBS // ROUNDS
                await blobs.settled()  # the round lasts until its blobs are gone

            measured = await rounds(probe, delete)
            print(f"#deleteConversation answered in (ms) {replies}, {early} before the collector")
            assert blobs.collected - collected == BLOBS
            assert not any(p.is_file() for p in blob_dir.rglob("*"))
            check(f"deletion of {BLOBS // ROUNDS} blobs", measured)
            # The request only wakes the collector: the reply is not held for
            # it (in most rounds it comes well before the collector is done).
            assert early > ROUNDS // 2, replies
