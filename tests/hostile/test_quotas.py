"""What an authenticated user can make the relay store is bounded (both
backends): KeyPackages per device, blob bytes per user, conversations per
creator, members per conversation.  Each refusal is a clear error over the
edge the request came by, and stores nothing.

Before: an upload of 200 KeyPackages was accepted as often as sent, blobs
filled the disk, and conversations and members grew without end."""

from __future__ import annotations

import os
from pathlib import Path

import cbor2
import pytest
import trio

from protocol.mls import ContentType
from tests.harness import running_relay
from tests.mls_helpers import as_json, http, make_key_package, private, welcome
from tests.relayclient import connect, make_token

from .httpnode import open_from, parse_response

ALICE, BOB, CAROL = "did:example:alice", "did:example:bob", "did:example:carol"


async def upload(port: int, user: str, device: str, kps: list[bytes]) -> tuple[int, dict]:  # type: ignore[type-arg]
    status, _, body = await http(
        port, "POST", "/v1/keypackages", make_token(user, device), cbor2.dumps(kps),
        "application/cbor",
    )  # fmt: skip
    return status, as_json(body)


async def available(port: int, user: str, device: str) -> int:
    _, _, body = await http(port, "GET", "/v1/keypackages/count", make_token(user, device))
    return int(as_json(body)["available"])


@pytest.mark.timeout(60)
async def test_key_packages_per_device(database_url: str) -> None:
    async with running_relay(
        database_url, max_keypackages_per_device=5, max_keypackage_devices_per_user=3
    ) as r:
        assert (await upload(r.port, BOB, "b1", [make_key_package(BOB) for _ in range(3)]))[
            0
        ] == 200
        status, body = await upload(r.port, BOB, "b1", [make_key_package(BOB) for _ in range(3)])
        assert (status, body["error"], body["limit"], body["used"]) == (
            403, "TooManyKeyPackages", 5, 3,
        )  # fmt: skip
        assert await available(r.port, BOB, "b1") == 3  # the refused upload stored nothing
        # Refused before its signatures are checked: broken ones get the quota error.
        bad = [make_key_package(BOB, break_signature=True) for _ in range(3)]
        assert (await upload(r.port, BOB, "b1", bad))[1]["error"] == "TooManyKeyPackages"
        assert (await upload(r.port, BOB, "b1", [make_key_package(BOB) for _ in range(2)]))[
            0
        ] == 200
        assert await available(r.port, BOB, "b1") == 5
        # Another device has its own; a claim makes room again.
        assert (await upload(r.port, BOB, "b2", [make_key_package(BOB)]))[0] == 200
        async with connect(r.ws_url, ALICE, "a1") as alice:
            await alice.ok("#claimKeyPackages", users=[BOB], cipher_suite=1)
        assert (await upload(r.port, BOB, "b1", [make_key_package(BOB)]))[0] == 200
        assert (await upload(r.port, BOB, "b1", [make_key_package(BOB)]))[0] == 403
        # Concurrent uploads of one device: at most what fits is stored.
        batches = [[make_key_package(BOB) for _ in range(3)] for _ in range(4)]
        statuses: list[int] = []

        async def one(kps: list[bytes]) -> None:
            statuses.append((await upload(r.port, BOB, "b3", kps))[0])

        async with trio.open_nursery() as nursery:
            for kps in batches:
                nursery.start_soon(one, kps)
        assert sorted(statuses) == [200, 403, 403, 403]
        assert await available(r.port, BOB, "b3") == 3
        # Devices per user (default 100, here 3: b1, b2, b3): a fourth device is
        # refused before validation (broken signatures: still the quota error).
        status, body = await upload(r.port, BOB, "b4", bad)
        assert (status, body["error"], body["limit"]) == (403, "TooManyDevices", 3)
        assert r.relay.metrics.errors["TooManyKeyPackages"] == 6


async def raw_upload(
    port: int, conv: bytes, user: str, size: int, *, body: bool
) -> tuple[int, dict]:  # type: ignore[type-arg]
    """A blob upload; with ``body=False`` only its head is sent, so an answer
    proves the refusal came before the body was read."""
    head = (
        f"POST /v1/conversations/{conv.hex()}/blobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Authorization: Bearer {make_token(user, 'd')}\r\nContent-Length: {size}\r\n\r\n"
    ).encode()
    with trio.fail_after(20):
        stream = await open_from("127.0.0.1", port)
        async with stream:
            await stream.send_all(head + (os.urandom(size) if body else b""))
            data = b""
            while part := await stream.receive_some(65536):
                data += part
    status, _, payload = parse_response(data)
    return status, as_json(payload)


@pytest.mark.timeout(60)
async def test_blob_bytes_per_user(database_url: str, tmp_path: Path) -> None:
    quota = 200_000
    async with (
        running_relay(database_url, blob_url=f"file://{tmp_path}/b", blob_quota_bytes=quota) as r,
        connect(r.ws_url, ALICE, "a1") as alice,
    ):
        conv = b"blob-quota"
        await alice.ok("#createConversation", conversation=conv, members=[BOB], storage="blob")
        assert (await raw_upload(r.port, conv, ALICE, 120_000, body=True))[0] == 201
        status, body = await raw_upload(r.port, conv, ALICE, 120_000, body=False)
        assert (status, body["error"], body["limit"], body["used"]) == (
            403, "BlobQuotaExceeded", quota, 120_000,
        )  # fmt: skip
        # A large send the relay would store as a blob counts the same way...
        refused = await alice.request(
            "#send", conversation=conv, ciphertext=os.urandom(100_000), client_message_id="big"
        )
        assert refused.body["error"] == "BlobQuotaExceeded"
        # ...and what is left still fits, exactly; the other member's quota is its own.
        assert (await raw_upload(r.port, conv, ALICE, quota - 120_000, body=True))[0] == 201
        assert (await raw_upload(r.port, conv, ALICE, 1, body=False))[0] == 403
        assert (await raw_upload(r.port, conv, BOB, 150_000, body=True))[0] == 201
        stored = sum(f.stat().st_size for f in (tmp_path / "b").rglob("*") if f.is_file())
        assert stored == quota + 150_000
        assert r.relay.metrics.errors["BlobQuotaExceeded"] == 3


@pytest.mark.timeout(60)
async def test_conversations_per_creator_and_members(database_url: str) -> None:
    async with (
        running_relay(database_url, max_conversations_per_user=2, max_members=3) as r,
        connect(r.ws_url, ALICE, "a1") as alice,
        connect(r.ws_url, BOB, "b1") as bob,
    ):
        await alice.ok("#createConversation", conversation=b"one", members=[BOB])
        await alice.ok("#createConversation", conversation=b"two", members=[])
        refused = await alice.request("#createConversation", conversation=b"three", members=[])
        assert (refused.body["error"], refused.body["limit"]) == ("TooManyConversations", 2)
        # Bob's are his own, and being added to Alice's does not use them up.
        await bob.ok("#createConversation", conversation=b"bobs", members=[ALICE])
        # Deleting does not give one back at once: a deleted id is kept for ever,
        # so deleted ones count for a day (else create-delete loops grow them).
        await alice.ok("#deleteConversation", conversation=b"two")
        refused = await alice.request("#createConversation", conversation=b"three", members=[])
        assert refused.body["error"] == "TooManyConversations"
        await r.relay.storage.create_conversation(b"three", ALICE, [], 0)  # no quota asked
        # Members: creator + 3 is one too many, at creation and by addition.
        refused = await bob.request(
            "#createConversation", conversation=b"big", members=[ALICE, CAROL, "did:example:d"]
        )
        assert (refused.body["error"], refused.body["limit"]) == ("TooManyMembers", 3)
        refused = await alice.request(
            "#addMembers", conversation=b"one", members=[CAROL, "did:example:d"]
        )
        assert refused.body["error"] == "TooManyMembers"
        listed = await alice.ok("#listConversations")
        assert len(listed["conversations"]) == 3  # one, three, bobs
        added = await alice.ok("#addMembers", conversation=b"one", members=[CAROL])
        assert added["added"] == [CAROL]
        refused = await bob.request("#addMembers", conversation=b"one", members=["did:example:d"])
        assert refused.body["error"] == "TooManyMembers"


@pytest.mark.timeout(60)
async def test_mls_commits_cannot_pass_the_member_bound(database_url: str) -> None:
    g = b"mls-members"
    users = [f"did:example:m{i}" for i in range(3)]
    async with running_relay(database_url, max_members=3) as r:
        for user in users:
            kp = make_key_package(user)
            status, _, body = await http(
                r.port, "POST", "/v1/keypackages", make_token(user, "d"), kp, "message/mls"
            )
            assert status == 200, body
        async with connect(r.ws_url, ALICE, "a1") as alice:
            await alice.ok("#createConversation", conversation=g, members=[], mls=True)
            claimed = await alice.ok("#claimKeyPackages", users=users, cipher_suite=1)
            refs = [bytes(k["ref"]) for k in claimed["key_packages"]]

            async def commit(epoch: int, joiners: list[bytes]) -> dict:  # type: ignore[type-arg]
                reply = await alice.request(
                    "#send", conversation=g, ciphertext=private(g, epoch, ContentType.COMMIT),
                    welcome=welcome(joiners), client_message_id=f"c{epoch}-{len(joiners)}",
                )  # fmt: skip
                return {"ok": reply.ok, **reply.body}

            # Alice + 3 Welcome joiners = 4 > 3: refused, nothing applied (still epoch 0).
            refused = await commit(0, refs)
            assert (refused["error"], refused["limit"]) == ("TooManyMembers", 3)
            assert await r.relay.storage.members(g) == [ALICE]
            assert (await commit(0, refs[:2]))["epoch"] == 1
            assert len(await r.relay.storage.members(g)) == 3
            assert (await commit(1, refs[2:]))["error"] == "TooManyMembers"
