"""The committer is supervised (issue 14 point 2): an unexpected exception in
a batch fails that batch's sends with a logged, retryable InternalError that
carries an incident id, the committer keeps running, and it is counted.

Before, only RelayError was caught and the committer ran in the node's
nursery: one exception of any other kind took the whole node down.  The
faults are injected through real things: the committer's push hook (the
node's own callback after a fan-out) and a database trigger.
"""

from __future__ import annotations

import logging

import pytest
import trio

from relay.delivery.hub import Published

from ..harness import running_relay
from ..relayclient import Reply, connect
from .inputs import clients, count_rows, install_refusal, remove_refusal

ALICE, BOB = "did:example:alice", "did:example:bob"
CONV = b"conv-supervised"


def _incident(reply: Reply) -> str:
    assert not reply.ok, reply.body
    assert reply.body["error"] == "InternalError", reply.body
    assert reply.body["retryable"] is True, reply.body
    incident = reply.body["incident"]
    assert isinstance(incident, str) and len(incident) == 16
    return incident


@pytest.mark.timeout(60)
async def test_the_committer_survives_an_exception_in_a_batch(database_url, caplog):
    caplog.set_level(logging.ERROR, logger="relay.base.incidents")
    async with running_relay(database_url) as r, connect(r.ws_url, ALICE) as alice:
        await alice.ok("#createConversation", conversation=CONV, members=[BOB])
        committer = r.relay.committer
        real_hook = committer.on_published
        assert real_hook is not None
        calls = 0

        def failing_once(messages: list[Published]) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("injected: the push hook broke")
            real_hook(messages)

        committer.on_published = failing_once
        with trio.fail_after(20):
            first = await alice.request(
                "#send", conversation=CONV, ciphertext=b"one", client_message_id="m1"
            )
            incident = _incident(first)
            # The committer is still running: the next batch commits.
            assert await alice.send(CONV, b"two", "m2") == 2
            # The failed send was stored before the hook broke: its resend is
            # answered from the stored copy (retryable, idempotent), not stored twice.
            assert await alice.send(CONV, b"one", "m1") == 1
        assert count_rows(database_url, "SELECT count(*) FROM messages") == 2
        lines = [rec for rec in caplog.records if incident in rec.getMessage()]
        assert len(lines) == 1, [rec.getMessage() for rec in caplog.records]
        assert "RuntimeError: injected" in lines[0].getMessage()
        assert lines[0].exc_info is not None  # the traceback is in the log line
        scrape = r.relay.metrics.exposition().decode()
        assert 'relay_incidents_total{where="committer"} 1.0' in scrape
        assert 'relay_errors_total{type="InternalError"} 1.0' in scrape


@pytest.mark.timeout(60)
async def test_a_database_refusing_every_row_gives_retryable_incidents(database_url):
    """Storage refuses every row for a while (a trigger raising on each):
    every sender gets its own retryable InternalError with an incident id;
    once the trigger is gone the next batch commits."""
    users = [f"did:example:u{i}" for i in range(4)]
    async with (
        running_relay(database_url, commit_linger_ms=20) as r,
        clients(r.ws_url, *users) as everyone,
    ):
        await everyone[0].ok("#createConversation", conversation=CONV, members=users)
        install_refusal(database_url, "messages", "1 = 1")
        replies: list[Reply] = []

        async def send(i: int) -> None:
            reply = await everyone[i].request(
                "#send", conversation=CONV, ciphertext=b"x", client_message_id=f"c{i}"
            )
            replies.append(reply)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(len(users)):
                    nursery.start_soon(send, i)
            assert len({_incident(reply) for reply in replies}) == len(users)
            remove_refusal(database_url, "messages")
            seqs = sorted([await c.send(CONV, b"y", f"c{i}") for i, c in enumerate(everyone)])
        assert seqs == [1, 2, 3, 4]
        counts = r.relay.metrics.incidents.counts
        assert counts["committer"] == len(users)
