"""The SDK's requests for offline devices and blobs (mls_relay_client.requests) against
a real relay, on both storage backends: read positions, delivery state, push
registration, sends by blob key and conversation deletion."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from mls_relay_client import DeliveryState, Membership, Message, Read, RelayClient, RequestFailed

from .harness import running_relay
from .mls_helpers import as_json, http
from .pushreceiver import push_receiver
from .relayclient import make_token

ALICE, BOB, CAROL = "did:example:alice", "did:example:bob", "did:example:carol"
CONV = b"sdk-offline"

E = TypeVar("E")


async def next_event(client: RelayClient, kind: type[E], match: Callable[[E], bool]) -> E:
    """The next event of ``kind`` that ``match`` accepts (others are skipped)."""
    async for event in client.events():
        if isinstance(event, kind) and match(event):
            return event
    raise AssertionError("the event stream ended")


async def test_mark_read_then_read_positions(database_url: str) -> None:
    with trio.fail_after(30):
        async with (
            running_relay(database_url) as r,
            RelayClient.connect(r.ws_url, make_token(ALICE, "a1")) as alice,
            RelayClient.connect(r.ws_url, make_token(BOB, "b1")) as bob,
        ):
            await alice.create_conversation(CONV, [BOB])
            for i in range(3):
                await alice.send(CONV, b"m-%d" % i)
            assert await alice.read_positions(CONV) == {}
            assert await bob.mark_read(CONV, 2) == 2
            assert await next_event(alice, Read, lambda e: True) == Read(CONV, BOB, 2)
            assert await bob.mark_read(CONV, 1) == 2  # never moves back
            with pytest.raises(RequestFailed) as future:
                await bob.mark_read(CONV, 99)
            assert future.value.error == "FutureCursor"
            assert await alice.read_positions(CONV) == {BOB: 2}
            assert await alice.mark_read(CONV, 3) == 3
            assert await bob.read_positions(CONV) == {ALICE: 3, BOB: 2}


async def test_delivery_state_of_own_messages(database_url: str) -> None:
    with trio.fail_after(30):
        async with (
            running_relay(database_url, delivery_flush_s=0.05) as r,
            RelayClient.connect(r.ws_url, make_token(ALICE, "a1")) as alice,
            RelayClient.connect(r.ws_url, make_token(BOB, "b1")) as bob,
        ):
            await alice.create_conversation(CONV, [BOB])
            seq = await alice.send(CONV, b"hello")
            got = await next_event(bob, Message, lambda m: m.conversation == CONV)
            assert got.seq == seq
            # Delivered positions are recorded in batches: wait for a flush.
            flushed = [DeliveryState(seq, devices=1, delivered=1, acknowledged=0)]
            while await alice.delivery_state(CONV, [seq]) != flushed:  # noqa: ASYNC110 (polling)
                await trio.sleep(0.05)
            assert await bob.ack(CONV, seq) == seq
            assert await alice.delivery_state(CONV, [seq, seq + 1]) == [
                DeliveryState(seq, devices=1, delivered=1, acknowledged=1)
            ]
            # Only the sender learns how its messages travel.
            assert await bob.delivery_state(CONV, [seq]) == []
            async with RelayClient.connect(r.ws_url, make_token(CAROL, "c1")) as carol:
                with pytest.raises(RequestFailed) as outsider:
                    await carol.delivery_state(CONV, [seq])
                assert outsider.value.error == "NotMember"


async def test_register_push_then_unregister(database_url: str) -> None:
    with trio.fail_after(40):
        async with (
            push_receiver() as receiver,
            running_relay(database_url, push_providers=f"hook={receiver.url()}") as r,
        ):
            async with RelayClient.connect(r.ws_url, make_token(BOB, "b-phone")) as phone:
                with pytest.raises(RequestFailed) as unknown:
                    await phone.register_push("nope", "t")
                assert unknown.value.error == "UnknownPushProvider"
                await phone.register_push("hook", "tok-phone", zone="eu")
            async with RelayClient.connect(r.ws_url, make_token(ALICE, "a1")) as alice:
                await alice.create_conversation(CONV, [BOB])
                seq = await alice.send(CONV, b"while the phone is offline")
                (push,) = await receiver.wait_requests(1)
                body = push.json()
                assert (body["token"], body["zone"], body["device"]) == (
                    "tok-phone",
                    "eu",
                    "b-phone",
                )
                assert (body["conversation"], body["seq"]) == (CONV.hex(), seq)
            [registered] = (await r.relay.storage.push_registrations([CONV]))[CONV]
            assert (registered.device, registered.token) == ("b-phone", "tok-phone")
            async with RelayClient.connect(r.ws_url, make_token(BOB, "b-phone")) as phone:
                await phone.unregister_push()
            assert (await r.relay.storage.push_registrations([CONV]))[CONV] == []


async def test_send_by_blob_key_then_delete_conversation(database_url: str, tmp_path: Path) -> None:
    payload = os.urandom(300_000)  # larger than a WebSocket ciphertext may be
    blobs = f"/v1/conversations/{CONV.hex()}/blobs"
    with trio.fail_after(30):
        async with (
            running_relay(database_url, blob_url=f"file://{tmp_path}/blobs") as r,
            RelayClient.connect(r.ws_url, make_token(ALICE, "a1")) as alice,
            RelayClient.connect(r.ws_url, make_token(BOB, "b1")) as bob,
        ):
            await alice.create_conversation(CONV, [BOB], storage="blob")
            status, _, body = await http(
                r.port, "POST", blobs, make_token(ALICE, "a1"), payload, "application/octet-stream"
            )
            assert status == 201, body
            key = as_json(body)["blob"]
            with pytest.raises(RequestFailed) as stolen:  # only its uploader may send it
                await bob.send_blob(CONV, key)
            assert stolen.value.error == "BlobNotFound"
            seq = await alice.send_blob(CONV, key)
            received = await next_event(bob, Message, lambda m: m.conversation == CONV)
            assert (received.seq, received.blob, received.size) == (seq, key, len(payload))
            assert received.ciphertext == b""  # out of line: fetched by key below
            status, _, body = await http(r.port, "GET", f"{blobs}/{key}", make_token(BOB, "b1"))
            assert (status, body) == (200, payload)

            with pytest.raises(RequestFailed) as denied:  # its creator only
                await bob.delete_conversation(CONV)
            assert denied.value.error == "Forbidden"
            await alice.delete_conversation(CONV)
            await next_event(bob, Membership, lambda m: BOB in m.removed)
            with pytest.raises(RequestFailed) as refused:
                await alice.send(CONV, b"after the deletion")
            assert refused.value.error == "NotMember"
            assert await alice.list_conversations() == []
            status, _, _ = await http(r.port, "GET", f"{blobs}/{key}", make_token(ALICE, "a1"))
            assert status == 404
            with pytest.raises(RequestFailed) as reused:
                await alice.create_conversation(CONV, [])
            assert reused.value.error == "ConversationExists"
