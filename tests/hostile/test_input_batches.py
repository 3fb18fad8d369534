"""A bad item fails alone: honest senders never see an error caused by an
attacker's items in their group-commit batch (issue 12 point 2).

Measured before: on PostgreSQL one send whose client_message_id held a NUL
failed its whole batch (four honest senders got 576-819 InternalError each in
10 s); an MLS header epoch of 2^64-1 failed the batch on PostgreSQL and, on
SQLite, raised OverflowError out of the committer, which took the node down.
"""

from __future__ import annotations

import logging
import uuid

import pytest
import trio

from protocol.mls import ContentType

from ..harness import Running, running_relay
from ..mls_helpers import private
from ..relayclient import Client, Reply
from .inputs import clients, count_rows, install_refusal

HONEST = [f"did:example:honest{i}" for i in range(4)]
MALLORY = "did:example:mallory"
ROOM = b"room-shared"

# A batch needs company: senders that arrive within 20 ms share one commit.
LINGER_MS = 20


async def _room(r: Running, clients: list[Client]) -> None:
    members = [c.user for c in clients]
    await clients[0].ok("#createConversation", conversation=ROOM, members=members)


async def _honest_sender(
    client: Client, stop: trio.Event, sent: list[str], errors: list[Reply]
) -> None:
    while not stop.is_set():
        cmid = uuid.uuid4().hex
        reply = await client.request(
            "#send", conversation=ROOM, ciphertext=b"hello", client_message_id=cmid
        )
        if reply.ok:
            sent.append(cmid)
        else:
            errors.append(reply)


def _stored(database_url: str, cmids: list[str]) -> int:
    """How many rows hold these client message ids (each must be stored once)."""
    placeholders = ",".join("?" for _ in cmids)
    sql = f"SELECT count(*) FROM messages WHERE client_message_id IN ({placeholders})"
    return count_rows(database_url, sql, tuple(cmids))


@pytest.mark.timeout(60)
async def test_bad_text_is_refused_at_the_edge_and_honest_senders_see_no_error(database_url):
    """Mallory floods sends and requests carrying NUL (and over-long text) for
    3 s while four honest users send into the same conversation: every bad
    request gets InvalidRequest naming its field, the honest users 0 errors,
    and each honest message is stored exactly once."""
    async with (
        # Request rates unlimited: refused requests count against them
        # (tests/hostile/test_ws_floods.py), and this test is about their text.
        running_relay(
            database_url,
            commit_linger_ms=LINGER_MS,
            requests_per_connection=0,
            requests_per_user=0,
        ) as r,
        clients(r.ws_url, *HONEST, MALLORY) as everyone,
    ):
        *honest, mallory = everyone
        await _room(r, [*honest, mallory])
        bad_requests = [
            ("#send", {"conversation": ROOM, "ciphertext": b"x",
                       "client_message_id": "a\x00b"}, "client_message_id"),
            ("#send", {"conversation": ROOM, "ciphertext": b"x",
                       "client_message_id": "c" * 129}, "client_message_id"),
            ("#send", {"conversation": ROOM, "blob": "A" * 20 + "\x00"}, "blob"),
            ("#send", {"conversation": ROOM, "ciphertext": b"x", "client_message_id": "r",
                       "removes": ["did:example:\x00"]}, "removes"),
            ("#addMembers", {"conversation": ROOM, "members": ["did:x:\x00"]}, "members"),
            ("#removeMembers", {"conversation": ROOM, "members": ["did:\x00"]}, "members"),
            ("#createConversation", {"conversation": b"evil",
                                     "members": ["did:plc:\x00"]}, "members"),
            ("#registerPush", {"provider": "p", "token": "t\x00"}, "token"),
            ("#registerPush", {"provider": "p", "zone": "z\x00", "token": "t"}, "zone"),
            ("#registerPush", {"provider": "p\x00", "token": "t"}, "provider"),
            ("#claimKeyPackages", {"users": ["did:x\x00y"], "cipher_suite": 1}, "users"),
        ]  # fmt: skip
        stop = trio.Event()
        sent: list[list[str]] = [[] for _ in honest]
        errors: list[Reply] = []
        refused: dict[str, int] = {}
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for client, mine in zip(honest, sent, strict=True):
                    nursery.start_soon(_honest_sender, client, stop, mine, errors)
                deadline = trio.current_time() + 3
                while trio.current_time() < deadline:
                    for t, body, field in bad_requests:
                        reply = await mallory.request(t, **body)
                        assert not reply.ok, (t, body)
                        assert reply.body["error"] == "InvalidRequest", reply.body
                        assert reply.body["field"] == field, reply.body
                        refused[field] = refused.get(field, 0) + 1
                stop.set()
        print(
            f"bad text: {sum(refused.values())} refused, honest sends "
            f"{[len(m) for m in sent]}, honest errors {len(errors)}"
        )
        assert errors == []
        assert all(len(mine) > 10 for mine in sent), [len(m) for m in sent]
        everything = [c for mine in sent for c in mine]
        assert _stored(database_url, everything) == len(everything)
        assert sum(refused.values()) > 100, refused
        # The connection that sent all that is still usable.
        assert (await mallory.request("#listConversations")).ok


async def _expect_mls_refusal(client: Client, group: bytes, epoch: int) -> None:
    reply = await client.request(
        "#send",
        conversation=group,
        ciphertext=private(group, epoch, ContentType.APPLICATION),
        client_message_id=uuid.uuid4().hex,
    )
    assert not reply.ok
    assert reply.body["error"] == "InvalidMLS", reply.body
    assert reply.body["field"] == "epoch", reply.body
    assert reply.body["max_epoch"] == 2**63 - 2


@pytest.mark.timeout(60)
async def test_an_mls_epoch_storage_cannot_hold_fails_alone(database_url):
    """Header epochs of 2^64-1 and 2^63-1 are refused as the one send they
    are (InvalidMLS, field epoch); 2^63-2 reaches storage and is a plain
    FutureEpoch.  Honest sends sharing the batches all commit."""
    group = b"mls-group-mallory"
    async with (
        running_relay(database_url, commit_linger_ms=LINGER_MS) as r,
        clients(r.ws_url, HONEST[0], HONEST[1], MALLORY) as (h0, h1, mallory),
    ):
        await _room(r, [h0, h1])
        await mallory.ok("#createConversation", conversation=group, members=[], mls=True)
        stop = trio.Event()
        sent: list[list[str]] = [[], []]
        errors: list[Reply] = []
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for client, mine in zip((h0, h1), sent, strict=True):
                    nursery.start_soon(_honest_sender, client, stop, mine, errors)
                for _ in range(30):
                    await _expect_mls_refusal(mallory, group, 2**64 - 1)
                    await _expect_mls_refusal(mallory, group, 2**63 - 1)
                    reply = await mallory.request(
                        "#send",
                        conversation=group,
                        ciphertext=private(group, 2**63 - 2, ContentType.APPLICATION),
                        client_message_id=uuid.uuid4().hex,
                    )
                    assert reply.body["error"] == "FutureEpoch", reply.body
                stop.set()
        print(f"MLS epochs: honest sends {[len(m) for m in sent]}, honest errors {len(errors)}")
        assert errors == []
        assert all(len(mine) > 5 for mine in sent), [len(m) for m in sent]
        everything = [c for mine in sent for c in mine]
        assert _stored(database_url, everything) == len(everything)
        # The epoch itself is fine: a send at the group's epoch commits.
        await mallory.ok(
            "#send",
            conversation=group,
            ciphertext=private(group, 0, ContentType.APPLICATION),
            client_message_id="fine",
        )


async def _sends(
    client: Client, prefix: str, rounds: int, out: list[Reply], go: trio.Event
) -> None:
    for i in range(rounds):
        await go.wait()
        reply = await client.request(
            "#send", conversation=ROOM, ciphertext=b"x", client_message_id=f"{prefix}-{i}"
        )
        out.append(reply)


@pytest.mark.timeout(90)
async def test_an_item_storage_refuses_fails_alone_in_its_batch(database_url, caplog):
    """Behind the edge: storage refuses one item of a batch (a trigger that
    raises on it, as a constraint would).  The batch is split until that item
    is alone: the others commit, each exactly once and with gapless seqs, and
    only the refused one gets InternalError, retryable, with an incident id
    that its log line carries."""
    rounds = 15
    caplog.set_level(logging.ERROR, logger="relay.base.incidents")
    async with running_relay(database_url, commit_linger_ms=LINGER_MS) as r:
        install_refusal(database_url, "messages", "NEW.client_message_id LIKE 'poison-%'")
        async with clients(r.ws_url, *HONEST, MALLORY) as everyone:
            *honest, mallory = everyone
            h0 = honest[0]
            await _room(r, [*honest, mallory])
            honest_replies: list[list[Reply]] = [[] for _ in honest]
            poison: list[Reply] = []
            with trio.fail_after(60):
                for i in range(rounds):  # one send of each per round: they share a batch
                    go = trio.Event()
                    async with trio.open_nursery() as nursery:
                        for n, (client, out) in enumerate(zip(honest, honest_replies, strict=True)):
                            nursery.start_soon(_sends, client, f"h{n}-{i}", 1, out, go)
                        nursery.start_soon(_sends, mallory, f"poison-{i}", 1, poison, go)
                        await trio.sleep(0.01)
                        go.set()
            for out in honest_replies:
                assert [x.ok for x in out] == [True] * rounds, [x.body for x in out if not x.ok]
            committer = r.relay.committer
            honest_errors = sum(not x.ok for out in honest_replies for x in out)
            print(f"poisoned batches: {committer.splits} splits, honest errors {honest_errors}")
            assert committer.splits >= rounds  # every round's batch held the poison
            assert len(poison) == rounds
            incidents = set()
            for reply in poison:
                assert not reply.ok
                assert reply.body["error"] == "InternalError", reply.body
                assert reply.body["retryable"] is True
                incidents.add(reply.body["incident"])
            assert len(incidents) == rounds
            logged = "\n".join(rec.getMessage() for rec in caplog.records)
            assert all(i in logged for i in incidents), logged
            seqs = sorted(x.body["seq"] for out in honest_replies for x in out)
            assert seqs == list(range(1, 4 * rounds + 1))  # gapless: a failed try stored nothing
            assert count_rows(database_url, "SELECT count(*) FROM messages") == 4 * rounds
            # Resending an acknowledged send is answered from the stored copy.
            again = await h0.request(
                "#send", conversation=ROOM, ciphertext=b"x", client_message_id="h0-0-0"
            )
            assert again.ok and again.body["seq"] == honest_replies[0][0].body["seq"]
            assert count_rows(database_url, "SELECT count(*) FROM messages") == 4 * rounds
            scrape = r.relay.metrics.exposition().decode()
            assert f'relay_incidents_total{{where="committer"}} {float(rounds)}' in scrape
            assert f"relay_commit_splits_total {float(committer.splits)}" in scrape
