"""Epoch order in MLS conversations, over real WebSockets on both backends.

Real commits and proposals come from the passive-client vectors (one group_id,
consecutive epochs); messages needing an exact epoch are built with the
project's encoder (the relay reads only the cleartext header).
"""

from __future__ import annotations

import uuid

import trio

from protocol.mls import ContentType, parse_mls_message

from .harness import running_relay
from .mls_helpers import private, vectors
from .relayclient import Client, connect

ALICE, BOB = "did:example:alice", "did:example:bob"
COMMIT, PROPOSAL, APP = ContentType.COMMIT, ContentType.PROPOSAL, ContentType.APPLICATION


async def send(c: Client, conv: bytes, data: bytes, **extra: object) -> dict:  # type: ignore[type-arg]
    reply = await c.request(
        "#send", conversation=conv, ciphertext=data, client_message_id=uuid.uuid4().hex, **extra
    )
    return {"ok": reply.ok, **reply.body}


async def test_real_commits_and_proposals_advance_the_epoch(database_url):
    entry = vectors("mlswg-subsets/passive-client-random.first-50-epochs.json")[0]
    epochs = entry["epochs"][:8]
    first = parse_mls_message(bytes.fromhex(epochs[0]["commit"]))
    group, start = first.group_id, first.epoch
    assert group is not None and start is not None
    with trio.fail_after(40):
        async with running_relay(database_url) as r:  # noqa: SIM117 (r is needed below)
            async with connect(r.ws_url, ALICE, "a1") as a, connect(r.ws_url, BOB, "b1") as b:
                await a.ok("#createConversation", conversation=b"g", members=[BOB], mls=True,
                           group_id=group)  # fmt: skip
                await b.ok("#subscribe")
                for e in range(start):  # reach the vectors' first epoch
                    assert (await send(a, b"g", private(group, e, COMMIT)))["epoch"] == e + 1
                sent = []
                for i, epoch in enumerate(epochs):
                    for p in epoch["proposals"]:
                        raw = bytes.fromhex(p)
                        assert (await send(a, b"g", raw))["epoch"] == start + i
                        sent.append(raw)
                    commit = bytes.fromhex(epoch["commit"])
                    assert (await send(a, b"g", commit))["epoch"] == start + i + 1
                    sent.append(commit)
                    again = await send(b, b"g", commit)  # the same epoch, second time
                    assert (again["error"], again["epoch"]) == ("StaleCommit", start + i + 1)
                # Handshakes travel in the one ordered stream, after the catch-up ones.
                got = await b.messages(start + len(sent))
                assert [m["ciphertext"] for m in got[start:]] == sent
                assert [m["seq"] for m in got] == list(range(1, len(got) + 1))


async def test_epoch_rules(database_url):
    g = b"group-epochs"
    with trio.fail_after(40):
        async with running_relay(database_url, epoch_window=2) as r:  # noqa: SIM117 (r is needed below)
            async with connect(r.ws_url, ALICE, "a1") as a:
                await a.ok(
                    "#createConversation", conversation=b"e", members=[], mls=True, group_id=g
                )
                for e in range(3):
                    assert (await send(a, b"e", private(g, e, COMMIT)))["ok"]
                # Now at epoch 3.
                expect = [
                    (private(g, 4, COMMIT), "FutureEpoch"),
                    (private(g, 2, COMMIT), "StaleCommit"),
                    (private(g, 2, PROPOSAL), "StaleEpoch"),
                    (private(g, 4, PROPOSAL), "FutureEpoch"),
                    (private(g, 0, APP), "StaleEpoch"),
                    (private(g, 4, APP), "FutureEpoch"),
                    (private(b"other-group", 3, APP), "WrongGroup"),
                    (b"\x00\x01\x00\x02\x07", "MalformedMLS"),  # truncated
                ]
                for data, error in expect:
                    got = await send(a, b"e", data)
                    assert got["error"] == error, (error, got)
                for e in (1, 2, 3):  # the window: current and two before
                    assert (await send(a, b"e", private(g, e, APP)))["epoch"] == 3
                assert (await send(a, b"e", private(g, 3, PROPOSAL)))["ok"]
                # RFC 9420 §6: application data never in a PublicMessage.
                [vec] = [v for v in vectors("mlswg-subsets/messages.30-entries.json")][:1]
                pub = bytes.fromhex(vec["public_message_application"])
                got = await send(a, b"e", pub)
                assert got["error"] == "InvalidMLS" and "PrivateMessage" in got["message"]
                # Welcome only with a commit; plain conversations stay opaque.
                got = await send(a, b"e", private(g, 3, APP), welcome=b"x")
                assert got["error"] == "InvalidRequest"
                await a.ok("#createConversation", conversation=b"plain", members=[])
                assert (await send(a, b"plain", private(g, 99, COMMIT)))["seq"] == 1
                got = await send(a, b"plain", b"opaque", welcome=b"x")
                assert got["error"] == "NotMLSConversation"


async def test_racing_commits_exactly_one_wins(database_url):
    g = b"race"
    with trio.fail_after(40):
        async with running_relay(database_url) as r:  # noqa: SIM117 (r is needed below)
            async with connect(r.ws_url, ALICE, "a1") as a, connect(r.ws_url, BOB, "b1") as b:
                await a.ok("#createConversation", conversation=g, members=[BOB], mls=True)
                for epoch in range(5):
                    results: list[dict] = []  # type: ignore[type-arg]

                    async def commit(
                        c: Client,
                        epoch: int = epoch,
                        results: list[dict] = results,  # type: ignore[type-arg]
                    ) -> None:
                        results.append(await send(c, g, private(g, epoch, COMMIT)))

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(commit, a)
                        nursery.start_soon(commit, b)
                    assert sorted(bool(x["ok"]) for x in results) == [False, True]
                    [loser] = [x for x in results if not x["ok"]]
                    assert (loser["error"], loser["epoch"]) == ("StaleCommit", epoch + 1)
