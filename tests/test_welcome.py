"""Welcome and GroupInfo: delivered only when the commit wins, only to the named
devices, live or on resume; members follow commits (add, remove, external join)."""

from __future__ import annotations

import os
import uuid

import trio

from protocol.mls import (
    ContentType,
    parse_mls_message,
)

from .harness import running_relay
from .mls_helpers import group_info, http, make_key_package, private, ref_of, vectors, welcome
from .relayclient import Client, connect, make_token

ALICE, BOB, CAROL, DAN = (
    "did:example:alice",
    "did:example:bob",
    "did:example:carol",
    "did:example:dan",
)
COMMIT, APP = ContentType.COMMIT, ContentType.APPLICATION


async def send(c: Client, conv: bytes, data: bytes, **extra: object) -> dict:  # type: ignore[type-arg]
    reply = await c.request(
        "#send", conversation=conv, ciphertext=data, client_message_id=uuid.uuid4().hex, **extra
    )
    return {"ok": reply.ok, **reply.body}


async def upload(port: int, user: str, device: str) -> bytes:
    kp = make_key_package(user)
    status, _, body = await http(
        port, "POST", "/v1/keypackages", make_token(user, device), kp, "message/mls"
    )
    assert status == 200, body
    return kp


async def test_welcome_goes_to_named_devices_after_the_commit_wins(database_url):
    g = b"welcome-live"
    with trio.fail_after(40):
        async with running_relay(database_url) as r:
            await upload(r.port, BOB, "b1")
            await upload(r.port, BOB, "b2")
            async with (
                connect(r.ws_url, ALICE, "a1") as a,
                connect(r.ws_url, BOB, "b1", subscribe=True) as b1,
                connect(r.ws_url, BOB, "b2", subscribe=True) as b2,
            ):
                await a.ok("#createConversation", conversation=g, members=[], mls=True)
                claimed = await a.ok("#claimKeyPackages", users=[BOB], cipher_suite=1)
                refs = {k["device"]: k["ref"] for k in claimed["key_packages"]}
                w = welcome([refs["b1"]])
                # A losing commit never delivers its Welcome.
                await send(a, g, private(g, 0, COMMIT))
                lost = await send(a, g, private(g, 0, COMMIT), welcome=w)
                assert lost["error"] == "StaleCommit"
                assert await r.relay.storage.welcomes_for(BOB, "b1") == []
                assert BOB not in await r.relay.storage.members(g)
                # An unclaimed ref is refused before anything happens.
                bad = await send(a, g, private(g, 1, COMMIT), welcome=welcome([os.urandom(32)]))
                assert bad["error"] == "UnknownKeyPackage"
                won = await send(
                    a, g, private(g, 1, COMMIT), welcome=w, group_info=group_info(g, 2)
                )
                assert (won["ok"], won["epoch"]) == (True, 2)
                _, event = await b1.next_event("#welcome")
                assert event == {"conversation": g, "seq": won["seq"], "epoch": 2, "welcome": w}
                _, m2 = await b2.next_event("#membership")
                assert m2["added"] == [BOB]
                assert BOB in await r.relay.storage.members(g)
                # Bob is a member from the commit on: he sends, alice's other device gets it.
                app = private(g, 2, APP)
                assert (await send(b1, g, app))["seq"] == won["seq"] + 1
                # Only b1 was named; b2 got the membership change, never a Welcome.
                assert await r.relay.storage.welcomes_for(BOB, "b2") == []
                await b1.ok("#ack", conversation=g, seq=won["seq"])
                assert await r.relay.storage.welcomes_for(BOB, "b1") == []
                # GroupInfo of the newest epoch, for members.
                path = f"/v1/conversations/{g.hex()}/groupinfo"
                status, headers, body = await http(r.port, "GET", path, make_token(BOB, "b1"))
                assert (status, headers["mls-epoch"], headers["content-type"]) == (
                    200, "2", "message/mls",
                )  # fmt: skip
                assert parse_mls_message(body).epoch == 2
                status, _, _ = await http(r.port, "GET", path, make_token(CAROL, "c1"))
                assert status == 403
                # Removing works the same way, through a commit.
                gone = await send(a, g, private(g, 2, COMMIT), removes=[BOB])
                assert gone["epoch"] == 3
                _, m3 = await b1.next_event("#membership")
                while m3["removed"] != [BOB]:
                    _, m3 = await b1.next_event("#membership")
                assert BOB not in await r.relay.storage.members(g)


async def test_offline_device_gets_its_welcome_on_resume(database_url):
    g = b"welcome-offline"
    with trio.fail_after(40):
        async with running_relay(database_url) as r:
            kp = await upload(r.port, BOB, "b1")
            async with connect(r.ws_url, ALICE, "a1") as a:
                await a.ok("#createConversation", conversation=g, members=[], mls=True)
                claimed = await a.ok("#claimKeyPackages", users=[BOB], cipher_suite=1)
                assert claimed["key_packages"][0]["ref"] == ref_of(kp)
                w = welcome([ref_of(kp)])
                won = await send(a, g, private(g, 0, COMMIT), welcome=w)
                await send(a, g, private(g, 1, APP))
            async with connect(r.ws_url, BOB, "b1", subscribe=True) as b:
                _, event = await b.next_event("#welcome")
                assert (event["seq"], event["welcome"]) == (won["seq"], w)
                [m] = await b.messages(1)  # only what follows the commit
                assert m["seq"] == won["seq"] + 1
                await b.ok("#ack", conversation=g, seq=m["seq"])
            assert await r.relay.storage.welcomes_for(BOB, "b1") == []  # the ack consumed it
            async with connect(r.ws_url, BOB, "b1", subscribe=True) as b:
                await b.caught_up()
                await b.ok("#listConversations")  # what came before its reply is queued
                queued = [h for h, _ in b._skipped]  # passed over on the way to CaughtUp
                while True:
                    try:
                        queued.append(b.events.receive_nowait()[0])
                    except trio.WouldBlock:
                        break
                assert [h["t"] for h in queued if h.get("t") == "#welcome"] == []


async def test_external_commit_adds_its_sender(database_url):
    entry = vectors("mlswg/interop-passive-external_join.json")[0]
    commit = bytes.fromhex(entry["epochs"][0]["commit"])
    msg = parse_mls_message(commit)
    group, epoch = msg.group_id, msg.epoch
    assert group is not None and epoch is not None
    with trio.fail_after(40):
        async with running_relay(database_url) as r:  # noqa: SIM117 (r is needed below)
            async with connect(r.ws_url, ALICE, "a1", subscribe=True) as a:
                await a.ok("#createConversation", conversation=b"closed", members=[], mls=True,
                           group_id=group)  # fmt: skip
                await a.ok("#createConversation", conversation=b"open", members=[], mls=True,
                           group_id=group, external_join=True)  # fmt: skip
                for conv in (b"closed", b"open"):
                    for e in range(epoch):
                        await send(
                            a, conv, private(group, e, COMMIT), group_info=group_info(group, e + 1)
                        )
                async with connect(r.ws_url, DAN, "d1") as d:
                    path = f"/v1/conversations/{b'open'.hex()}/groupinfo"
                    status, headers, _ = await http(r.port, "GET", path, make_token(DAN, "d1"))
                    assert (status, headers["mls-epoch"]) == (200, str(epoch))
                    refused = await send(d, b"closed", commit)
                    assert refused["error"] == "NotMember"
                    joined = await send(d, b"open", commit)
                    assert joined["epoch"] == epoch + 1
                    assert DAN in await r.relay.storage.members(b"open")
                    assert (await send(d, b"open", private(group, epoch + 1, APP)))["ok"]
