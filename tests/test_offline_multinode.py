"""Blob messages, read events and push across relay nodes sharing PostgreSQL and Redis."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import trio

from .conftest import RedisTarget
from .harness import running_relay
from .mls_helpers import http
from .pushreceiver import push_receiver
from .relayclient import connect, make_token

ALICE, BOB = "did:example:alice", "did:example:bob"
CONV = b"multi-offline"


def _prefix(redis: RedisTarget) -> str:
    return f"{redis.prefix}{secrets.token_hex(4)}:"


async def test_blob_messages_and_read_events_cross_nodes(
    pg_database_url: str, redis_url: RedisTarget, tmp_path: Path
) -> None:
    common = {
        "redis_url": redis_url.url,
        "redis_prefix": _prefix(redis_url),
        "blob_url": f"file://{tmp_path}/shared-blobs",  # every node needs the same store
        "blob_threshold": 100,
    }
    big = os.urandom(1000)
    with trio.fail_after(40):
        async with (
            running_relay(pg_database_url, node_id="a", **common) as a,
            running_relay(pg_database_url, node_id="b", **common) as b,
            connect(a.ws_url, ALICE, "a1", subscribe=True) as alice,
            connect(b.ws_url, BOB, "b1", subscribe=True) as bob,
        ):
            await alice.ok("#createConversation", conversation=CONV, members=[BOB], storage="blob")
            sent = await alice.ok("#send", conversation=CONV, ciphertext=big, client_message_id="1")
            (event,) = await bob.messages(1)
            assert (event["blob"], event["size"], event["ciphertext"]) == (sent["blob"], 1000, b"")
            path = f"/v1/conversations/{CONV.hex()}/blobs/{sent['blob']}"
            status, _, body = await http(b.port, "GET", path, make_token(BOB, "b1"))
            assert (status, body) == (200, big)
            await bob.ok("#markRead", conversation=CONV, seq=sent["seq"])
            _, read = await alice.next_event("#read")
            assert read == {"conversation": CONV, "user": BOB, "seq": sent["seq"]}


async def test_push_skips_devices_connected_to_another_node(
    pg_database_url: str, redis_url: RedisTarget
) -> None:
    prefix = _prefix(redis_url)
    with trio.fail_after(40):
        async with push_receiver() as receiver:
            hook = {"push_providers": f"hook={receiver.url()}", "redis_url": redis_url.url}
            async with (
                running_relay(pg_database_url, node_id="a", redis_prefix=prefix, **hook) as a,
                running_relay(pg_database_url, node_id="b", redis_prefix=prefix, **hook) as b,
            ):
                async with connect(b.ws_url, BOB, "b-tablet") as tablet:
                    await tablet.ok("#registerPush", provider="hook", token="tok-tablet")
                async with (
                    connect(b.ws_url, BOB, "b-phone", subscribe=True) as phone,
                    connect(a.ws_url, ALICE, "a1") as alice,
                ):
                    await phone.ok("#registerPush", provider="hook", token="tok-phone")
                    await alice.ok("#createConversation", conversation=CONV, members=[BOB])
                    await alice.send(CONV, b"hello")
                    await phone.messages(1)
                    await receiver.wait_requests(1)
                    with trio.fail_after(10):  # both nodes' pushers resolved everything
                        while any(n.relay.pusher and n.relay.pusher.pending() for n in (a, b)):  # noqa: ASYNC110
                            await trio.sleep(0.02)
                    await trio.sleep(1.0)  # a push for the phone would have arrived by now
            tokens = [req.json()["token"] for req in receiver.requests]
            assert tokens == ["tok-tablet"]  # the phone is online, on the other node
