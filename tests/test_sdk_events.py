"""The SDK's typed ``#read`` and ``#welcome`` events (mls_relay_client.events) against
a real relay, on both storage backends.  Each test waits for the typed event
only, so it times out if the SDK still delivers these frames as ``Other``."""

from __future__ import annotations

import trio

from mls_relay_client import Read, RelayClient, Welcome
from protocol.mls import ContentType

from .harness import running_relay
from .mls_helpers import http, make_key_package, private, ref_of, welcome
from .relayclient import make_token
from .test_sdk_offline import next_event

ALICE, BOB = "did:example:alice", "did:example:bob"


async def test_mark_read_reaches_other_devices_as_read(database_url: str) -> None:
    conv = b"sdk-events-read"
    with trio.fail_after(30):
        async with (
            running_relay(database_url) as r,
            RelayClient.connect(r.ws_url, make_token(ALICE, "a1")) as alice,
            RelayClient.connect(r.ws_url, make_token(BOB, "b1")) as bob,
            RelayClient.connect(r.ws_url, make_token(BOB, "b2")) as bob_tablet,
        ):
            await alice.create_conversation(conv, [BOB])
            for i in range(3):
                await alice.send(conv, b"m-%d" % i)
            assert await bob.mark_read(conv, 2) == 2
            # Another member and the marking user's own other device both hear of it.
            expected = Read(conv, BOB, 2)
            assert await next_event(alice, Read, lambda e: e.conversation == conv) == expected
            assert await next_event(bob_tablet, Read, lambda e: True) == expected


async def test_accepted_commit_delivers_welcome_to_the_named_device(database_url: str) -> None:
    group = b"sdk-events-welcome"
    kp = make_key_package(BOB)
    with trio.fail_after(40):
        async with running_relay(database_url) as r:
            status, _, body = await http(
                r.port, "POST", "/v1/keypackages", make_token(BOB, "b1"), kp, "message/mls"
            )
            assert status == 200, body
            async with (
                RelayClient.connect(r.ws_url, make_token(BOB, "b1")) as bob,
                RelayClient.connect(r.ws_url, make_token(ALICE, "a1")) as alice,
            ):
                await alice.create_conversation(group, [], mls=True)
                claim = await alice.claim_key_packages([BOB], cipher_suite=1)
                assert [c.ref for c in claim.key_packages] == [ref_of(kp)]
                sent = welcome([ref_of(kp)])
                seq = await alice.send(group, private(group, 0, ContentType.COMMIT), welcome=sent)
                # Live, to the device already connected when it joins.
                expected = Welcome(group, seq, 1, sent)
                assert await next_event(bob, Welcome, lambda e: True) == expected
            # Not acked yet: a new connection gets it again from the inbox.
            async with RelayClient.connect(r.ws_url, make_token(BOB, "b1")) as again:
                assert await next_event(again, Welcome, lambda e: True) == expected
