"""The retention job (relay/offline/retention.py) through a running relay, on both backends.

LESSONS: the service we replace deleted commits after 30 days, so a client that
came back later could not rebuild its group state.  Here a client returning after
the retention period still gets the commit that brought the group to its current
epoch (and the epoch before it), its pending Welcome, and the newest GroupInfo.
"""

from __future__ import annotations

import time

import pytest
import trio

from protocol.errors import Unavailable
from protocol.mls import ContentType
from relay.offline.retention import DAY_MS

from .harness import running_relay
from .mls_helpers import http, private, welcome
from .relayclient import connect, make_token
from .test_welcome import group_info, send, upload

ALICE, BOB, CAROL = "did:example:alice", "did:example:bob", "did:example:carol"
COMMIT, PROPOSAL, APP = ContentType.COMMIT, ContentType.PROPOSAL, ContentType.APPLICATION


def days_later(days: float) -> float:
    return time.time() + days * DAY_MS / 1000


async def test_returning_client_can_still_process_the_current_epoch(database_url):
    g, p = b"ret-mls", b"ret-plain"
    with trio.fail_after(50):
        async with running_relay(database_url, retention_days=30, retention_interval_s=0.2) as r:
            job = r.relay.retention
            await upload(r.port, CAROL, "c1")
            sent: dict[int, bytes] = {}
            async with connect(r.ws_url, ALICE, "a1") as a:
                await a.ok("#createConversation", conversation=g, members=[BOB], mls=True)
                await a.ok("#createConversation", conversation=p, members=[BOB])
                claimed = await a.ok("#claimKeyPackages", users=[CAROL], cipher_suite=1)
                w = welcome([claimed["key_packages"][0]["ref"]])
                steps = [
                    (private(g, 0, APP), {}),  # 1
                    (private(g, 0, COMMIT), {"group_info": group_info(g, 1)}),  # 2: -> epoch 1
                    (private(g, 1, APP), {}),  # 3
                    (private(g, 1, PROPOSAL), {}),  # 4
                    (private(g, 1, COMMIT), {"group_info": group_info(g, 2), "welcome": w}),  # 5
                    (private(g, 2, APP), {}),  # 6
                ]
                for data, extra in steps:
                    out = await send(a, g, data, **extra)
                    assert out["ok"], out
                    sent[out["seq"]] = data
                for i in range(3):
                    await a.send(p, b"plain-%d" % i)
            assert sorted(sent) == [1, 2, 3, 4, 5, 6]

            # Nothing is old yet: a run deletes nothing.
            first = await job.next_run()
            assert (first.messages, first.group_infos) == (0, 0)
            # 31 days later (the job's clock moves; nobody waits a month).
            job.clock = lambda: days_later(31)
            run = await job.next_run()
            while run.cutoff_ms is None or run.cutoff_ms < time.time() * 1000:
                run = await job.next_run()  # that one had started before the clock moved
            # g loses seq 1 (epoch 0) and commit 2; everything from epoch 1 on stays,
            # however old.  The opaque conversation loses everything.
            assert (run.messages, run.group_infos) == (2 + 3, 1)
            assert (await job.next_run()).messages == 0  # idempotent

            # Bob comes back with his cursor at 0.
            async with connect(r.ws_url, BOB, "b1", subscribe=True) as b:
                outdated = {}
                while len(outdated) < 2:
                    _, info = await b.next_event("#info")
                    if info["name"] == "OutdatedCursor":
                        outdated[info["conversation"]] = info["first_seq"]
                assert outdated == {g: 3, p: 4}
                got = await b.messages(4, g)
                assert [(m["seq"], m["ciphertext"]) for m in got] == [
                    (s, sent[s]) for s in (3, 4, 5, 6)
                ]
                await b.caught_up()
            # Carol's Welcome (commit 5) was not consumed: it and what follows stay.
            async with connect(r.ws_url, CAROL, "c1", subscribe=True) as c:
                _, event = await c.next_event("#welcome")
                assert (event["seq"], event["epoch"], event["welcome"]) == (5, 2, w)
                [m] = await c.messages(1, g)
                assert (m["seq"], m["ciphertext"]) == (6, sent[6])
                await c.ok("#ack", conversation=g, seq=6)
            assert await r.relay.storage.welcomes_for(CAROL, "c1") == []
            # The newest GroupInfo survives (an external joiner or a lost device needs it).
            path = f"/v1/conversations/{g.hex()}/groupinfo"
            status, headers, _ = await http(r.port, "GET", path, make_token(BOB, "b1"))
            assert (status, headers["mls-epoch"]) == (200, "2")


@pytest.mark.parametrize("failure", ["outage", "bug"])
async def test_job_survives_a_failed_run_and_purges_used_tokens(database_url, monkeypatch, failure):
    """A run that fails, with an outage (Unavailable, logged) or with a bug
    (any other exception: one incident each), is retried at the next interval;
    the node and its job live on."""
    with trio.fail_after(40):
        async with running_relay(database_url, retention_days=1, retention_interval_s=0.2) as r:
            job = r.relay.retention
            storage = r.relay.storage
            async with connect(r.ws_url, ALICE, "a1"):
                pass
            real = storage.prune_messages
            runs_at_failure: list[int] = []  # job.runs as each failing run began
            failed_twice = trio.Event()

            async def failing(older_than_ms: int) -> int:
                runs_at_failure.append(job.runs)
                if len(runs_at_failure) == 2:
                    failed_twice.set()
                if failure == "bug":
                    raise KeyError("a bug in a retention run (test)")
                raise Unavailable("database unavailable (test)")

            await job.next_run()  # none in flight: the failing calls below are all of a run
            monkeypatch.setattr(storage, "prune_messages", failing)
            await failed_twice.wait()  # the job went on to its next interval after a failure
            monkeypatch.setattr(storage, "prune_messages", real)
            first, second = runs_at_failure[:2]
            assert second == first  # the failed run in between was not counted as one
            incidents = r.relay.metrics.incidents.counts["retention"]
            assert incidents == (len(runs_at_failure) if failure == "bug" else 0)
            # Past every token's lifetime: the used jti is forgotten.
            job.clock = lambda: days_later(2)
            run = await job.next_run()
            while run.token_uses == 0:
                run = await job.next_run()
            assert run.token_uses == 1 and run.cutoff_ms is not None


async def test_job_off_without_retention_or_single_use(tmp_path, database_url):
    """Off, the job never runs; the same relay with single-use tokens runs it
    (purge only).  Side by side, with one short interval: by the time the one
    that is on has run three times, the one that is off would have run too."""
    with trio.fail_after(30):
        async with (
            running_relay(
                f"sqlite:///{tmp_path}/off.db", token_single_use=False, retention_interval_s=0.05
            ) as off,
            running_relay(database_url, retention_interval_s=0.05) as on,
        ):
            assert not off.relay.retention.enabled
            job = on.relay.retention
            assert job.enabled  # single-use tokens (the default): the purge runs
            first = await job.next_run() if job.runs == 0 else job.last
            assert first is not None and first.cutoff_ms is None  # no retention
            while job.runs < 3:
                await job.next_run()
            assert off.relay.retention.runs == 0 and off.relay.retention.last is None


async def test_blob_collector_survives_a_bug(tmp_path, monkeypatch):
    """The collector's own loop (every max(1 s, RELAY_BLOB_ORPHAN_TTL_S / 4)):
    a round that raises an unexpected exception is an incident, and the next
    round comes; the node serves on."""
    with trio.fail_after(30):
        async with running_relay(
            f"sqlite:///{tmp_path}/r.db", token_single_use=False, blob_orphan_ttl_s=1.0
        ) as r:
            assert not r.relay.retention.enabled  # only the collector collects
            calls: list[int] = []
            twice = trio.Event()

            async def broken(cutoff_ms: int, limit: int) -> list[tuple[bytes, str]]:
                calls.append(cutoff_ms)
                if len(calls) == 2:
                    twice.set()
                raise KeyError("a bug in blob collection (test)")

            monkeypatch.setattr(r.relay.storage, "collect_blobs", broken)
            await twice.wait()
            assert r.relay.metrics.incidents.counts["blobs"] == len(calls)
            async with connect(r.ws_url, ALICE, "a1") as a:  # the node lives on
                await a.ok("#listConversations")
