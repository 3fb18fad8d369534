"""Delivery state, read events and blob storage end to end (issue #7), both backends.

Real relays over loopback, real WebSocket clients, real HTTP requests; the
blob store is the default filesystem one here (tests/test_blobs_s3.py runs
the same flows on an S3-compatible server).
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from relay.offline.blobs import store_path

from .harness import running_relay
from .mls_helpers import as_json, http
from .relayclient import connect, make_token

ALICE, BOB, CAROL = "did:example:alice", "did:example:bob", "did:example:carol"
CONV = b"offline-conv"


async def test_delivery_state_delivered_then_acknowledged(database_url: str) -> None:
    with trio.fail_after(30):
        async with running_relay(database_url, delivery_flush_s=0.05) as r:
            async with connect(r.ws_url, BOB, "b2"):
                pass  # b2 is known to the relay, then offline
            async with (
                connect(r.ws_url, ALICE, "a1") as alice,
                connect(r.ws_url, BOB, "b1", subscribe=True) as bob,
            ):
                await alice.ok("#createConversation", conversation=CONV, members=[BOB])
                await bob.next_event("#membership")
                seq = await alice.send(CONV, b"hello")
                assert [m["seq"] for m in await bob.messages(1)] == [seq]
                with trio.fail_after(10):  # the tracker flushes every 0.05 s
                    while True:
                        state = await alice.ok("#deliveryState", conversation=CONV, seqs=[seq])
                        if state["states"] and state["states"][0]["delivered"]:
                            break
                        await trio.sleep(0.02)
                assert state["states"] == [
                    {"seq": seq, "devices": 2, "delivered": 1, "acknowledged": 0}
                ]
                await bob.ok("#ack", conversation=CONV, seq=seq)
                state = await alice.ok("#deliveryState", conversation=CONV, seqs=[seq])
                assert state["states"][0]["acknowledged"] == 1
                # Bob learns nothing about Alice's messages' delivery.
                assert (await bob.ok("#deliveryState", conversation=CONV, seqs=[seq]))[
                    "states"
                ] == []
                async with connect(r.ws_url, CAROL, "c1") as carol:
                    reply = await carol.request("#deliveryState", conversation=CONV, seqs=[seq])
                    assert not reply.ok and reply.body["error"] == "NotMember"


async def test_read_events_reach_other_members_live(database_url: str) -> None:
    with trio.fail_after(30):
        async with (
            running_relay(database_url) as r,
            connect(r.ws_url, ALICE, "a1", subscribe=True) as alice,
            connect(r.ws_url, BOB, "b1", subscribe=True) as bob,
            connect(r.ws_url, BOB, "b2", subscribe=True) as bob2,
        ):
            await alice.ok("#createConversation", conversation=CONV, members=[BOB])
            for _ in range(3):
                await alice.send(CONV, b"m")
            reply = await bob.ok("#markRead", conversation=CONV, seq=2)
            assert reply["seq"] == 2
            _, event = await alice.next_event("#read")
            assert event == {"conversation": CONV, "user": BOB, "seq": 2}
            _, event = await bob2.next_event("#read")  # Bob's other device syncs too
            assert event["seq"] == 2
            assert (await bob.ok("#markRead", conversation=CONV, seq=1))["seq"] == 2
            bad = await bob.request("#markRead", conversation=CONV, seq=99)
            assert bad.body["error"] == "FutureCursor"
            reads = await alice.ok("#readPositions", conversation=CONV)
            assert reads["reads"] == [{"user": BOB, "seq": 2}]


def _blob_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]


async def test_large_ciphertext_goes_to_blob_store(database_url: str, tmp_path: Path) -> None:
    blob_dir = tmp_path / "blobs"
    big = os.urandom(5000)
    with trio.fail_after(30):
        async with (
            running_relay(database_url, blob_url=f"file://{blob_dir}", blob_threshold=1024) as r,
            connect(r.ws_url, ALICE, "a1") as alice,
            connect(r.ws_url, BOB, "b1", subscribe=True) as bob,
        ):
            await alice.ok("#createConversation", conversation=CONV, members=[BOB], storage="blob")
            small_seq = await alice.send(CONV, b"small stays inline")
            reply = await alice.ok(
                "#send", conversation=CONV, ciphertext=big, client_message_id="big-1"
            )
            key = reply["blob"]
            small, large = await bob.messages(2)
            assert (small["seq"], small["ciphertext"]) == (small_seq, b"small stays inline")
            assert "blob" not in small
            assert (large["blob"], large["size"], large["ciphertext"]) == (key, 5000, b"")
            assert (blob_dir / store_path(CONV, key)).read_bytes() == big
            path = f"/v1/conversations/{CONV.hex()}/blobs/{key}"
            status, _, body = await http(r.port, "GET", path, make_token(BOB, "b1"))
            assert (status, body) == (200, big)
            status, _, body = await http(r.port, "GET", path, make_token(CAROL, "c1"))
            assert status == 404 and as_json(body)["error"] == "BlobNotFound"
            # A replay carries the blob reference too.
            async with connect(r.ws_url, BOB, "b3", subscribe=True) as late:
                replayed = await late.messages(2)
                assert replayed[1]["blob"] == key


async def test_upload_over_http_then_send_by_key(database_url: str, tmp_path: Path) -> None:
    payload = os.urandom(300_000)  # larger than a WebSocket ciphertext may be
    with trio.fail_after(30):
        async with (
            running_relay(database_url, blob_url=f"file://{tmp_path}/b") as r,
            connect(r.ws_url, ALICE, "a1") as alice,
            connect(r.ws_url, BOB, "b1", subscribe=True) as bob,
        ):
            await alice.ok("#createConversation", conversation=CONV, members=[BOB], storage="blob")
            await alice.ok("#createConversation", conversation=b"inline", members=[BOB])
            base = f"/v1/conversations/{CONV.hex()}/blobs"
            status, _, body = await http(
                    r.port, "POST", base, make_token(ALICE, "a1"), payload,
                    "application/octet-stream",
                )  # fmt: skip
            assert status == 201, body
            key = as_json(body)["blob"]
            # Unsent: only its uploader can read it, and only its uploader can send it.
            status, _, _ = await http(r.port, "GET", f"{base}/{key}", make_token(BOB, "b1"))
            assert status == 404
            stolen = await bob.request(
                "#send", conversation=CONV, blob=key, client_message_id="steal"
            )
            assert stolen.body["error"] == "BlobNotFound"
            sent = await alice.ok("#send", conversation=CONV, blob=key, client_message_id="x")
            (event,) = await bob.messages(1)
            assert (event["seq"], event["blob"], event["size"]) == (sent["seq"], key, 300_000)
            status, _, body = await http(r.port, "GET", f"{base}/{key}", make_token(BOB, "b1"))
            assert (status, body) == (200, payload)
            # Inline conversations take no blobs; non-members upload nothing.
            status, _, body = await http(
                    r.port, "POST", f"/v1/conversations/{b'inline'.hex()}/blobs",
                    make_token(ALICE, "a1"), b"x",
                )  # fmt: skip
            assert (status, as_json(body)["error"]) == (409, "BlobsDisabled")
            status, _, body = await http(r.port, "POST", base, make_token(CAROL, "c"), b"x")
            assert (status, as_json(body)["error"]) == (403, "NotMember")
            status, _, _ = await http(r.port, "POST", base, None, b"x")
            assert status == 401


async def test_deleted_conversation_leaves_no_blobs(database_url: str, tmp_path: Path) -> None:
    blob_dir = tmp_path / "blobs"
    with trio.fail_after(30):
        async with (
            running_relay(database_url, blob_url=f"file://{blob_dir}", blob_threshold=10) as r,
            connect(r.ws_url, ALICE, "a1") as alice,
            connect(r.ws_url, BOB, "b1", subscribe=True) as bob,
        ):
            await alice.ok("#createConversation", conversation=CONV, members=[BOB], storage="blob")
            for i in range(5):
                await alice.send(CONV, os.urandom(100), f"c{i}")
            await http(
                r.port, "POST", f"/v1/conversations/{CONV.hex()}/blobs",
                make_token(ALICE, "a1"), b"never sent",
            )  # fmt: skip
            assert len(_blob_files(blob_dir)) == 6
            denied = await bob.request("#deleteConversation", conversation=CONV)
            assert denied.body["error"] == "Forbidden"
            await alice.ok("#deleteConversation", conversation=CONV)
            _, change = await bob.next_event("#membership")
            while BOB not in change["removed"]:
                _, change = await bob.next_event("#membership")
            await r.relay.blobs.settled()  # the delete woke the collector
            assert _blob_files(blob_dir) == []
            again = await alice.request("#createConversation", conversation=CONV, members=[])
            assert again.body["error"] == "ConversationExists"


async def test_retention_deletes_blobs_of_pruned_messages(
    database_url: str, tmp_path: Path
) -> None:
    blob_dir = tmp_path / "blobs"
    with trio.fail_after(30):
        async with (
            running_relay(
                database_url,
                blob_url=f"file://{blob_dir}",
                blob_threshold=10,
                retention_days=1.0,
                retention_interval_s=3600.0,
            ) as r,
            connect(r.ws_url, ALICE, "a1") as alice,
        ):
            await alice.ok("#createConversation", conversation=CONV, members=[], storage="blob")
            for i in range(4):
                await alice.send(CONV, os.urandom(64), f"r{i}")
            assert len(_blob_files(blob_dir)) == 4
            r.relay.retention.clock = lambda: 10**10  # far in the future
            run = await r.relay.retention.run_once()
            assert run.messages == 4 and run.blobs == 4
            assert _blob_files(blob_dir) == []
