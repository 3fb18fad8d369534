"""Ordering, resume and durability over real loopback WebSockets, on both backends."""

from __future__ import annotations

import uuid

import trio

from .harness import running_relay
from .relayclient import Client, connect

ALICE, BOB, CAROL = "did:example:alice", "did:example:bob", "did:example:carol"


async def _setup(url: str, conv: bytes, members: list[str]) -> None:
    async with connect(url, ALICE, "setup") as c:
        await c.ok("#createConversation", conversation=conv, members=members)


async def test_concurrent_senders_get_gapless_seqs(database_url):
    conv = b"busy"
    senders = [f"did:example:user{i}" for i in range(20)]
    with trio.fail_after(50):
        async with running_relay(database_url) as r:
            await _setup(r.ws_url, conv, senders)
            seqs: list[int] = []
            async with connect(r.ws_url, ALICE, "reader", subscribe=True) as reader:

                async def sender(user: str) -> None:
                    async with connect(r.ws_url, user, "d") as c:
                        for i in range(50):
                            seqs.append(await c.send(conv, f"{user}/{i}".encode()))

                async with trio.open_nursery() as nursery:
                    for user in senders:
                        nursery.start_soon(sender, user)
                received = await reader.messages(1000)
            assert sorted(seqs) == list(range(1, 1001))
            assert [m["seq"] for m in received] == list(range(1, 1001))
            # Each sender's own messages keep their send order.
            for user in senders:
                mine = [m["ciphertext"] for m in received if m["sender"] == user]
                assert mine == [f"{user}/{i}".encode() for i in range(50)]


async def test_resume_after_cut_gets_every_missed_message_once(database_url):
    conv = b"resume"
    with trio.fail_after(45):
        async with running_relay(database_url) as r:
            await _setup(r.ws_url, conv, [BOB])
            sent = trio.Event()
            total = 300

            async def keep_sending() -> None:
                async with connect(r.ws_url, ALICE, "a1") as a:
                    for i in range(total):
                        await a.send(conv, b"m%d" % i)
                        if i == 20:
                            sent.set()
                        await trio.sleep(0.002)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_sending)
                async with connect(r.ws_url, BOB, "b1", subscribe=True) as b:
                    await sent.wait()
                    first = await b.messages(10)
                    await b.ok("#ack", conversation=conv, seq=first[-1]["seq"])
                    # More arrive after the ack: they must be replayed, not lost.
                    await b.messages(5)
                # Reconnect mid-burst with the stored cursor (only the ack moved it).
                async with connect(r.ws_url, BOB, "b1", subscribe=True) as b:
                    rest = await b.messages(total - 10)
            seqs = [m["seq"] for m in rest]
            assert seqs == list(range(11, total + 1))
            assert [m["ciphertext"] for m in rest] == [b"m%d" % i for i in range(10, total)]


async def test_explicit_cursor_future_and_outdated(database_url):
    conv = b"cursors"
    with trio.fail_after(30):
        async with running_relay(database_url) as r:
            await _setup(r.ws_url, conv, [BOB])
            async with connect(r.ws_url, ALICE, "a1") as a:
                for i in range(6):
                    await a.send(conv, b"%d" % i)
            async with connect(r.ws_url, BOB, "b1") as b:
                reply = await b.request("#subscribe", cursors=[{"conversation": conv, "seq": 7}])
                assert not reply.ok and reply.body["error"] == "FutureCursor"
                await b.ok("#subscribe", cursors=[{"conversation": conv, "seq": 4}])
                assert [m["seq"] for m in await b.messages(2)] == [5, 6]
            # Retention removed everything; a cursor before it is announced.
            assert await r.relay.storage.prune_messages(2**62) == 6
            async with connect(r.ws_url, ALICE, "a1") as a:
                await a.send(conv, b"after-prune")
            async with connect(r.ws_url, BOB, "b2") as b:
                await b.ok("#subscribe", cursors=[{"conversation": conv, "seq": 2}])
                _, info = await b.next_event("#info")
                assert info["name"] == "OutdatedCursor" and info["conversation"] == conv
                [m] = await b.messages(1)
                assert (m["seq"], m["ciphertext"]) == (7, b"after-prune")


async def test_acknowledged_messages_survive_restart(database_url):
    conv = b"durable"
    with trio.fail_after(45):
        async with running_relay(database_url) as r:
            await _setup(r.ws_url, conv, [BOB])
            async with connect(r.ws_url, ALICE, "a1") as a:
                acked = [await a.send(conv, b"x%d" % i) for i in range(50)]
            async with connect(r.ws_url, BOB, "b1", subscribe=True) as b:
                got = await b.messages(20)
                await b.ok("#ack", conversation=conv, seq=got[-1]["seq"])
        async with running_relay(database_url) as r2:
            async with connect(r2.ws_url, BOB, "b1", subscribe=True) as b:
                rest = await b.messages(30)
                assert [m["seq"] for m in rest] == list(range(21, 51))
            async with connect(r2.ws_url, BOB, "b-new", subscribe=True) as b:
                everything = await b.messages(50)
                assert [m["seq"] for m in everything] == acked


async def test_retry_with_same_client_message_id_is_stored_once(database_url):
    conv = b"idem"
    with trio.fail_after(30):
        async with running_relay(database_url) as r:
            await _setup(r.ws_url, conv, [BOB])
            async with (
                connect(r.ws_url, ALICE, "a1") as a,
                connect(r.ws_url, BOB, "b1", subscribe=True) as b,
            ):
                cmid = uuid.uuid4().hex
                assert await a.send(conv, b"once", cmid) == 1
                assert await a.send(conv, b"once", cmid) == 1
                assert await a.send(conv, b"next") == 2
                got = await b.messages(2)
                assert [m["seq"] for m in got] == [1, 2]
            # The same id from another device (or user) is a different message.
            async with connect(r.ws_url, ALICE, "a2") as a2:
                assert await a2.send(conv, b"other device", cmid) == 3
            listed = await _list(r.ws_url, ALICE)
            assert listed[conv] == 3


async def _next_message_is_the_barrier(sender: Client, reader: Client) -> None:
    """Whatever the reader was wrongly sent before arrives before a message
    committed after it (one committer, delivered in commit order): the
    reader's next #message must be the barrier, in a conversation of its own."""
    barrier = b"barrier-" + reader.device.encode()
    await sender.ok("#createConversation", conversation=barrier, members=[reader.user])
    await sender.send(barrier, b"barrier")
    _, message = await reader.next_event("#message")
    assert (message["conversation"], message["ciphertext"]) == (barrier, b"barrier"), message
    await reader.ok("#leave", conversation=barrier)  # gone again: no trace in later checks


async def _list(url: str, user: str) -> dict[bytes, int]:
    async with connect(url, user, "lister") as c:
        body = await c.ok("#listConversations")
        return {x["conversation"]: x["last_seq"] for x in body["conversations"]}


async def test_non_members_are_refused(database_url):
    conv = b"private"
    with trio.fail_after(30):
        async with running_relay(database_url) as r:
            await _setup(r.ws_url, conv, [BOB])
            async with connect(r.ws_url, CAROL, "c1", subscribe=True) as carol:
                for t, body in [
                    ("#send", {"conversation": conv, "ciphertext": b"x", "client_message_id": "1"}),
                    ("#send", {"conversation": conv, "ciphertext": b"x", "ephemeral": True}),
                    ("#ack", {"conversation": conv, "seq": 0}),
                    ("#addMembers", {"conversation": conv, "members": [CAROL]}),
                    ("#removeMembers", {"conversation": conv, "members": [BOB]}),
                    ("#leave", {"conversation": conv}),
                    (
                        "#send",
                        {"conversation": b"nope", "ciphertext": b"x", "client_message_id": "2"},
                    ),
                ]:
                    reply = await carol.request(t, **body)
                    assert (reply.ok, reply.body["error"]) == (False, "NotMember"), (t, reply)
                async with connect(r.ws_url, CAROL, "c2") as c2:
                    reply = await c2.request(
                        "#subscribe", cursors=[{"conversation": conv, "seq": 0}]
                    )
                    assert reply.body["error"] == "NotMember"
                async with connect(r.ws_url, ALICE, "a1") as a:
                    await a.send(conv, b"secret")
                    assert await _list(r.ws_url, CAROL) == {}
                    with trio.move_on_after(0.3):
                        await carol.next_event("#message")
                        raise AssertionError("a non-member received a message")
                    await _next_message_is_the_barrier(a, carol)


async def test_ephemeral_goes_live_only(database_url):
    conv = b"typing"
    with trio.fail_after(30):
        async with running_relay(database_url) as r:
            await _setup(r.ws_url, conv, [BOB])
            async with (
                connect(r.ws_url, ALICE, "a1") as a,
                connect(r.ws_url, BOB, "b1", subscribe=True) as b,
            ):
                reply = await a.ok("#send", conversation=conv, ciphertext=b"...", ephemeral=True)
                assert "seq" not in reply
                _, event = await b.next_event("#ephemeral")
                assert (event["ciphertext"], event["sender"]) == (b"...", ALICE)
                assert await a.send(conv, b"real") == 1
            async with connect(r.ws_url, BOB, "b2", subscribe=True) as b2:
                assert [m["ciphertext"] for m in await b2.messages(1)] == [b"real"]


async def test_removed_member_stops_receiving(database_url):
    conv = b"kick"
    with trio.fail_after(30):
        async with running_relay(database_url) as r:
            await _setup(r.ws_url, conv, [BOB, CAROL])
            async with (
                connect(r.ws_url, ALICE, "a1", subscribe=True) as a,
                connect(r.ws_url, CAROL, "c1", subscribe=True) as carol,
            ):
                await a.send(conv, b"before")
                assert [m["ciphertext"] for m in await carol.messages(1)] == [b"before"]
                await a.ok("#removeMembers", conversation=conv, members=[CAROL])
                _, change = await carol.next_event("#membership")
                assert change["removed"] == [CAROL]
                await a.send(conv, b"after")
                with trio.move_on_after(0.3):
                    await carol.next_event("#message")
                    raise AssertionError("removed member still receives")
                await _next_message_is_the_barrier(a, carol)
                reply = await carol.request(
                    "#send", conversation=conv, ciphertext=b"x", client_message_id="z"
                )
                assert reply.body["error"] == "NotMember"


async def test_added_member_gets_messages_after_joining_only(database_url):
    conv = b"late"
    with trio.fail_after(30):
        async with running_relay(database_url) as r:
            await _setup(r.ws_url, conv, [BOB])
            async with (
                connect(r.ws_url, ALICE, "a1") as a,
                connect(r.ws_url, CAROL, "c1", subscribe=True) as carol,
            ):
                await a.send(conv, b"history")
                added = await a.ok("#addMembers", conversation=conv, members=[CAROL])
                assert added["added"] == [CAROL]
                _, change = await carol.next_event("#membership")
                assert change["added"] == [CAROL] and change["seq"] == 1
                await a.send(conv, b"welcome")
                [m] = await carol.messages(1)
                assert (m["seq"], m["ciphertext"]) == (2, b"welcome")


async def test_new_connection_for_same_device_replaces_old(database_url):
    with trio.fail_after(20):
        async with running_relay(database_url) as r, connect(r.ws_url, ALICE, "a1") as old:
            async with connect(r.ws_url, ALICE, "a1"):
                with trio.fail_after(5):
                    await old.closed.wait()
            assert old.close_code == 4409


def _unused(c: Client) -> None:  # keeps the import used for type hints in editors
    del c


async def test_two_relay_processes_share_one_sequence(pg_database_url):
    """Two nodes on one PostgreSQL: seqs stay 1..N, assigned by the database."""
    conv = b"two-nodes"
    senders = [f"did:example:n{i}" for i in range(10)]
    with trio.fail_after(50):
        async with running_relay(pg_database_url) as r1, running_relay(pg_database_url) as r2:
            await _setup(r1.ws_url, conv, senders)
            seqs: list[int] = []

            async def sender(url: str, user: str) -> None:
                async with connect(url, user, "d") as c:
                    for i in range(50):
                        seqs.append(await c.send(conv, b"%d" % i))

            async with trio.open_nursery() as nursery:
                for i, user in enumerate(senders):
                    nursery.start_soon(sender, (r1, r2)[i % 2].ws_url, user)
            assert sorted(seqs) == list(range(1, 501))
            # A reader on either node replays the same, complete history.
            async with connect(r2.ws_url, ALICE, "reader", subscribe=True) as reader:
                assert [m["seq"] for m in await reader.messages(500)] == list(range(1, 501))
