"""The SDK's MLS delivery-service requests (mls_relay_client.requests) against a real
relay, on both storage backends: MLS conversation options, KeyPackage claims
and commits that carry a Welcome, a GroupInfo and removals."""

from __future__ import annotations

import pytest
import trio

from mls_relay_client import ClaimedKeyPackage, RelayClient, RequestFailed
from protocol.mls import (
    ContentType,
)

from .harness import running_relay
from .mls_helpers import group_info, http, make_key_package, private, ref_of, welcome
from .relayclient import make_token

ALICE, BOB, CAROL, DAN = (
    "did:example:alice",
    "did:example:bob",
    "did:example:carol",
    "did:example:dan",
)
COMMIT, APP = ContentType.COMMIT, ContentType.APPLICATION


async def test_claim_then_commit_with_welcome_group_info_and_removes(database_url: str) -> None:
    g = b"sdk-mls"
    kp = make_key_package(BOB)
    with trio.fail_after(40):
        async with running_relay(database_url) as r:
            status, _, body = await http(
                r.port, "POST", "/v1/keypackages", make_token(BOB, "b1"), kp, "message/mls"
            )
            assert status == 200, body
            async with RelayClient.connect(r.ws_url, make_token(ALICE, "a1")) as alice:
                await alice.create_conversation(g, [CAROL], mls=True, external_join=True)
                with pytest.raises(RequestFailed) as opaque:  # MLS conversations take MLS only
                    await alice.send(g, b"\x00\x01\x00\x02")  # a PrivateMessage cut short
                assert opaque.value.error == "MalformedMLS"

                claim = await alice.claim_key_packages([BOB, DAN], cipher_suite=1)
                assert claim.key_packages == (ClaimedKeyPackage(BOB, "b1", ref_of(kp), kp, False),)
                assert claim.missing == ((DAN, None),)
                seq = await alice.send(
                    g,
                    private(g, 0, COMMIT),
                    welcome=welcome([ref_of(kp)]),
                    group_info=group_info(g, 1),
                    removes=[CAROL],
                )
                assert await r.relay.storage.members(g) == [ALICE, BOB]
                [inbox] = await r.relay.storage.welcomes_for(BOB, "b1")
                assert (inbox.conversation, inbox.seq, inbox.epoch) == (g, seq, 1)
                assert await alice.send(g, private(g, 1, APP)) == seq + 1
            # external_join: a non-member may fetch the newest GroupInfo.
            path = f"/v1/conversations/{g.hex()}/groupinfo"
            status, headers, _ = await http(r.port, "GET", path, make_token(DAN, "d1"))
            assert (status, headers["mls-epoch"]) == (200, "1")


async def test_group_id_names_the_mls_group(database_url: str) -> None:
    conv, group = b"sdk-mls-conv", b"sdk-mls-group"
    with trio.fail_after(30):
        async with (
            running_relay(database_url) as r,
            RelayClient.connect(r.ws_url, make_token(ALICE, "a1")) as alice,
        ):
            await alice.create_conversation(conv, [], mls=True, group_id=group)
            with pytest.raises(RequestFailed) as wrong:
                await alice.send(conv, private(conv, 0, COMMIT))
            assert wrong.value.error == "WrongGroup"
            assert await alice.send(conv, private(group, 0, COMMIT)) == 1
            # Without external_join, non-members get no GroupInfo.
            path = f"/v1/conversations/{conv.hex()}/groupinfo"
            status, _, _ = await http(r.port, "GET", path, make_token(DAN, "d1"))
            assert status == 403
