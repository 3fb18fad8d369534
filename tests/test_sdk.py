"""mls_relay_client.RelayClient against a real relay, on both storage backends."""

from __future__ import annotations

import pytest
import trio

from mls_relay_client import Ephemeral, Info, Membership, Message, RelayClient, RequestFailed

from .harness import running_relay
from .relayclient import make_token

ALICE, BOB, CAROL = "did:example:alice", "did:example:bob", "did:example:carol"
CONV = b"sdk-room"


async def test_send_receive_and_requests(database_url):
    with trio.fail_after(30):
        async with (
            running_relay(database_url) as r,
            RelayClient.connect(r.ws_url, make_token(ALICE, "a1")) as alice,
            RelayClient.connect(r.ws_url, make_token(BOB, "b1")) as bob,
        ):
            assert await alice.create_conversation(CONV, [BOB]) == sorted([ALICE, BOB])
            assert [await alice.send(CONV, b"hello-%d" % i) for i in range(3)] == [1, 2, 3]
            assert await alice.add_members(CONV, [CAROL]) == [CAROL]
            assert await alice.remove_members(CONV, [CAROL]) == [CAROL]
            [listed] = await bob.list_conversations()
            assert listed["conversation"] == CONV and listed["last_seq"] == 3
            for n in range(4):
                await bob.create_conversation(b"sdk-%d" % n, [])
            everything = await bob.list_conversations(page_size=2)  # three pages
            assert [c["conversation"] for c in everything] == sorted(
                [CONV] + [b"sdk-%d" % n for n in range(4)]
            )
            assert await bob.list_conversations() == everything  # one page
            page, after = await bob.list_conversations_page(limit=2)
            assert [c["conversation"] for c in page] == [b"sdk-0", b"sdk-1"] and after == b"sdk-1"
            page, after = await bob.list_conversations_page(b"sdk-2", limit=2)
            assert [c["conversation"] for c in page] == [b"sdk-3", CONV] and after is None
            with pytest.raises(RequestFailed) as failed:
                await bob.send(b"not-a-member-here", b"x")
            assert failed.value.error in ("NotMember", "ConversationNotFound")

            seen: list[object] = []
            async for event in bob.events():
                seen.append(event)
                if isinstance(event, Message) and event.seq == 3:
                    break
            assert any(isinstance(e, Info) and e.name == "CaughtUp" for e in seen)
            assert any(isinstance(e, Membership) and BOB in e.added for e in seen)
            got = [(e.seq, e.sender, e.ciphertext) for e in seen if isinstance(e, Message)]
            assert got == [(i + 1, ALICE, b"hello-%d" % i) for i in range(3)]
            assert await bob.ack(CONV, 3) == 3


async def test_ephemeral_send_and_leave(database_url):
    with trio.fail_after(30):
        async with (
            running_relay(database_url) as r,
            RelayClient.connect(r.ws_url, make_token(ALICE, "a1")) as alice,
            RelayClient.connect(r.ws_url, make_token(BOB, "b1")) as bob,
        ):
            await alice.create_conversation(CONV, [BOB])
            await alice.send_ephemeral(CONV, b"typing")
            async for event in bob.events():
                if isinstance(event, Ephemeral):
                    break
            assert isinstance(event, Ephemeral)
            assert (event.conversation, event.sender, event.ciphertext) == (CONV, ALICE, b"typing")
            assert await alice.send(CONV, b"stored") == 1  # the ephemeral took no seq

            assert await bob.leave(CONV) == [BOB]
            assert await bob.list_conversations() == []
            with pytest.raises(RequestFailed) as gone:
                await bob.send(CONV, b"x")
            assert gone.value.error == "NotMember"
            async for event in alice.events():
                if isinstance(event, Membership) and event.removed:
                    break
            assert isinstance(event, Membership) and (event.actor, event.removed) == (BOB, (BOB,))


async def test_forced_disconnects_lose_and_duplicate_nothing(database_url):
    total = 60
    with trio.fail_after(50):
        async with (
            running_relay(database_url) as r,
            # Token providers: every reconnect needs a fresh single-use token.
            RelayClient.connect(
                r.ws_url, lambda: make_token(ALICE, "a1"), initial_backoff=0.05
            ) as alice,
            RelayClient.connect(
                r.ws_url, lambda: make_token(BOB, "b1"), initial_backoff=0.05
            ) as bob,
        ):
            await alice.create_conversation(CONV, [BOB])
            acked: list[int] = []

            async def produce() -> None:
                for i in range(total):
                    acked.append(await alice.send(CONV, b"m-%d" % i, f"cmid-{i}"))
                    if i == total // 2:
                        # Mid-send: the relay drops Alice; in-flight sends are re-sent.
                        r.relay.registry.sessions[(ALICE, "a1")].close(1012, "test")
                    await trio.sleep(0.005)

            received: list[Message] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                async for event in bob.events():
                    if not isinstance(event, Message):
                        continue
                    received.append(event)
                    if len(received) in (15, 40):
                        # Mid-stream: the relay drops Bob, twice.
                        r.relay.registry.sessions[(BOB, "b1")].close(1012, "test")
                    if len(received) == total:
                        break
            assert [m.seq for m in received] == list(range(1, total + 1))
            assert [m.ciphertext for m in received] == [b"m-%d" % i for i in range(total)]
            assert sorted(acked) == list(range(1, total + 1))  # each send stored once
            assert bob.connections >= 3 and alice.connections >= 2
            # Bob's stored cursor never moved (no acks): the resume used the SDK's cursors.
            [listed] = await bob.list_conversations()
            assert listed["last_seq"] == total
