"""Push for offline devices through a running relay, to a real local HTTP receiver."""

from __future__ import annotations

import trio

from .harness import running_relay
from .pushreceiver import Reply, push_receiver
from .relayclient import connect
from .test_metrics import scrape, value

ALICE, BOB, CAROL = "did:example:alice", "did:example:bob", "did:example:carol"
CONV = b"push-conv"
SECRET_TEXT = b"ciphertext-that-must-never-reach-a-push-provider"


async def test_offline_devices_get_content_free_pushes(database_url: str) -> None:
    with trio.fail_after(40):
        async with (
            push_receiver() as receiver,
            running_relay(database_url, push_providers=f"hook={receiver.url()}") as r,
        ):
            async with connect(r.ws_url, BOB, "b-phone") as phone:
                reply = await phone.request("#registerPush", provider="nope", token="t")
                assert reply.body["error"] == "UnknownPushProvider"
                await phone.ok("#registerPush", provider="hook", zone="eu", token="tok-phone")
            async with connect(r.ws_url, CAROL, "c1") as carol:  # registered, stays online
                await carol.ok("#registerPush", provider="hook", zone="us", token="tok-carol")
                async with connect(r.ws_url, ALICE, "a1") as alice:
                    await alice.ok("#registerPush", provider="hook", token="tok-alice")
                    await alice.ok("#createConversation", conversation=CONV, members=[BOB, CAROL])
                    seqs = [await alice.send(CONV, SECRET_TEXT) for _ in range(3)]
                    (first,) = await receiver.wait_requests(1)
                    pusher = r.relay.pusher
                    assert pusher is not None
                    with trio.fail_after(10):  # every offer resolved, every push answered
                        while pusher.pending():  # noqa: ASYNC110 (polling the pusher)
                            await trio.sleep(0.02)
                    await trio.sleep(0.3)  # and nothing comes after that
            bodies = [req.json() for req in receiver.requests]
            assert sum(b["count"] for b in bodies) == 3, bodies
            assert {b["token"] for b in bodies} == {"tok-phone"}  # not Carol, not the sender
            assert bodies[-1]["seq"] == seqs[-1]
            assert set(bodies[0]) == {
                "provider", "zone", "token", "device", "conversation", "seq", "count"
            }  # fmt: skip
            assert (bodies[0]["device"], bodies[0]["zone"]) == ("b-phone", "eu")
            assert bodies[0]["conversation"] == CONV.hex()
            for req in receiver.requests:
                assert SECRET_TEXT not in req.body and BOB.encode() not in req.body
            assert r.relay.pusher is not None and r.relay.pusher.stats.sent == len(bodies)
            assert first.headers["content-type"].startswith("application/json")
            samples = await scrape(r.port)
            assert value(samples, "relay_push_total", outcome="sent") == len(bodies)
            assert value(samples, "relay_push_total", outcome="online") >= 1  # Carol


async def test_dead_token_is_dropped(database_url: str) -> None:
    with trio.fail_after(40):
        async with (
            push_receiver() as receiver,
            running_relay(database_url, push_providers=f"hook={receiver.url()}") as r,
        ):
            receiver.default = Reply(status=410)
            async with connect(r.ws_url, BOB, "b1") as bob:
                await bob.ok("#registerPush", provider="hook", token="dead")
            async with connect(r.ws_url, ALICE, "a1") as alice:
                await alice.ok("#createConversation", conversation=CONV, members=[BOB])
                await alice.send(CONV, b"x")
                await receiver.wait_requests(1)
                with trio.fail_after(5):
                    while (await r.relay.storage.push_registrations([CONV]))[CONV]:  # noqa: ASYNC110 (polling storage)
                        await trio.sleep(0.05)
                await alice.send(CONV, b"y")
                await trio.sleep(1.0)
            assert len(receiver.requests) == 1  # no push to a token known to be dead
