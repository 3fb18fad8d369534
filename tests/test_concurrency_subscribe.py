"""Pipelined ``#subscribe`` (issue 14, bug 1), over real loopback WebSockets.

Three ``#subscribe`` sent at once used to give one ``#result`` and two
``InternalError``; the failed ones' clean-up deregistered the successful one
from the hub, so conversations the user joined later never reached that
connection.  Any number of concurrent subscribes must give one success and
clear refusals (``AlreadySubscribed``), and leave the connection fully live.
"""

from __future__ import annotations

import pytest
import trio

from .harness import running_relay
from .relayclient import Client, Reply, connect

ALICE, BOB = "did:example:alice", "did:example:bob"


async def _pipelined_subscribes(client: Client, n: int) -> list[Reply]:
    """``n`` #subscribe requests written back to back, before any reply."""
    replies: list[Reply] = []

    async def one() -> None:
        replies.append(await client.request("#subscribe"))

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return replies


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", [2, 3, 8])
async def test_pipelined_subscribes_one_success_and_the_connection_stays_live(
    database_url: str, n: int
) -> None:
    old, new = b"sub-race-old", b"sub-race-new"
    with trio.fail_after(40):
        async with (
            running_relay(database_url) as r,
            connect(r.ws_url, ALICE, "a1") as alice,
        ):
            await alice.ok("#createConversation", conversation=old, members=[BOB])
            async with connect(r.ws_url, BOB, "b1") as bob:
                replies = await _pipelined_subscribes(bob, n)
                ok = [rep for rep in replies if rep.ok]
                refused = [rep for rep in replies if not rep.ok]
                assert len(ok) == 1, replies
                assert ok[0].body["conversations"] == 1
                assert len(refused) == n - 1, replies
                for rep in refused:
                    assert rep.body["error"] == "AlreadySubscribed", rep.body
                    assert not rep.body.get("retryable"), rep.body
                # A later one is refused the same way.
                late = await bob.request("#subscribe")
                assert not late.ok and late.body["error"] == "AlreadySubscribed"
                await bob.caught_up()
                # Exactly one registration of the connection on the node.
                assert len(r.relay.hub.sessions_of(BOB)) == 1

                # Live in the conversation it had, and in one it is added to
                # afterwards (a lost registration shows as a wait here).
                with trio.fail_after(10):
                    assert await alice.send(old, b"one") == 1
                    [got] = await bob.messages(1, old)
                    assert got["ciphertext"] == b"one"
                    await alice.ok("#createConversation", conversation=new, members=[BOB])
                    _, change = await bob.next_event("#membership")
                    assert change["conversation"] == new and BOB in change["added"]
                    assert await alice.send(new, b"two") == 1
                    [got] = await bob.messages(1, new)
                    assert got["ciphertext"] == b"two" and got["seq"] == 1


@pytest.mark.timeout(60)
async def test_a_failed_subscribe_can_be_sent_again(database_url: str) -> None:
    """A refused subscribe (here FutureCursor) subscribed nothing: the next
    one succeeds, and pipelined ones behind a failing one do not break it."""
    conv = b"sub-retry"
    with trio.fail_after(40):
        async with (
            running_relay(database_url) as r,
            connect(r.ws_url, ALICE, "a1") as alice,
        ):
            await alice.ok("#createConversation", conversation=conv, members=[BOB])
            async with connect(r.ws_url, BOB, "b1") as bob:
                bad = [{"conversation": conv, "seq": 5}]
                first = await bob.request("#subscribe", cursors=bad)
                assert not first.ok and first.body["error"] == "FutureCursor"
                assert r.relay.hub.sessions_of(BOB) == []
                await bob.ok("#subscribe")
                await bob.caught_up()
                assert len(r.relay.hub.sessions_of(BOB)) == 1
                assert await alice.send(conv, b"live") == 1
                [got] = await bob.messages(1, conv)
                assert got["ciphertext"] == b"live"
