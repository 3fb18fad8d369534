"""No user can read another user's cursors, KeyPackage inventory, Welcomes or
messages (issue #5, point 7); token lifetimes are capped.  Real sockets, both backends."""

from __future__ import annotations

import trio

from protocol.mls import ContentType

from .harness import running_relay
from .mls_helpers import as_json, http, private, welcome
from .relayclient import Client, connect, make_token
from .test_relay_delivery import _next_message_is_the_barrier
from .test_token_replay import upgrade
from .test_welcome import send, upload

ALICE, BOB, CAROL = "did:example:alice", "did:example:bob", "did:example:carol"
CONV = b"private-room"


async def _error(c: Client, t: str, **body: object) -> str:
    reply = await c.request(t, **body)
    assert not reply.ok, reply.body
    return str(reply.body["error"])


async def _no_event(c: Client, t: str, seconds: float = 0.5) -> None:
    with trio.move_on_after(seconds):
        _, body = await c.next_event(t)
        raise AssertionError(f"unexpected {t}: {body}")


async def test_cursors_are_per_user_and_device(database_url):
    with trio.fail_after(40):
        async with running_relay(database_url) as r:
            async with connect(r.ws_url, ALICE, "a1") as a:
                await a.ok("#createConversation", conversation=CONV, members=[BOB])
                for i in range(5):
                    await a.send(CONV, b"m%d" % i)
                async with connect(r.ws_url, BOB, "b1") as b:
                    assert (await b.ok("#ack", conversation=CONV, seq=2))["seq"] == 2
                # alice acks further: bob's stored cursor does not move.
                await a.ok("#ack", conversation=CONV, seq=5)
            storage = r.relay.storage
            assert await storage.get_cursors(BOB, "b1") == {CONV: 2}
            assert await storage.get_cursors(BOB, "b2") == {}
            assert await storage.get_cursors(ALICE, "a1") == {CONV: 5}
            async with connect(r.ws_url, CAROL, "c1") as c:
                # carol cannot move, probe or use anyone's cursor in that conversation.
                assert await _error(c, "#ack", conversation=CONV, seq=1) == "NotMember"
                cursors = [{"conversation": CONV, "seq": 2}]
                assert await _error(c, "#subscribe", cursors=cursors) == "NotMember"
                assert (await c.ok("#listConversations"))["conversations"] == []
            assert await storage.get_cursors(CAROL, "c1") == {}
            # bob's other device resumes from its own (absent) cursor: everything.
            async with connect(r.ws_url, BOB, "b2", subscribe=True) as b2:
                assert [m["seq"] for m in await b2.messages(5)] == [1, 2, 3, 4, 5]
            async with connect(r.ws_url, BOB, "b1", subscribe=True) as b1:
                assert [m["seq"] for m in await b1.messages(3)] == [3, 4, 5]


async def test_key_package_inventory_is_the_callers_own(database_url):
    with trio.fail_after(40):
        async with running_relay(database_url) as r:
            for _ in range(2):
                await upload(r.port, ALICE, "a1")
            for _ in range(3):
                await upload(r.port, BOB, "b1")
            token = make_token(ALICE, "a1")
            for query in ("", f"?user={BOB}&device=b1", "?device=b1", f"?sub={BOB}"):
                status, _, body = await http(r.port, "GET", "/v1/keypackages/count" + query, token)
                assert status == 200
                mine = as_json(body)
                assert (mine["user"], mine["device"], mine["available"]) == (ALICE, "a1", 2)
            # bob's is bob's; alice's other device has none.
            _, _, body = await http(r.port, "GET", "/v1/keypackages/count", make_token(BOB, "b1"))
            assert as_json(body)["available"] == 3
            _, _, body = await http(r.port, "GET", "/v1/keypackages/count", make_token(ALICE, "a2"))
            assert as_json(body)["available"] == 0
            status, _, _ = await http(r.port, "GET", "/v1/keypackages/count", None)
            assert status == 401


async def test_welcome_reaches_only_the_named_device(database_url):
    g = b"private-mls"
    with trio.fail_after(40):
        async with running_relay(database_url) as r:
            await upload(r.port, BOB, "d1")
            await upload(r.port, BOB, "d2")
            async with (
                connect(r.ws_url, ALICE, "a1") as a,
                connect(r.ws_url, BOB, "d1", subscribe=True) as d1,
                connect(r.ws_url, BOB, "d2", subscribe=True) as d2,
                connect(r.ws_url, CAROL, "c1", subscribe=True) as c,
            ):
                await a.ok("#createConversation", conversation=g, members=[CAROL], mls=True)
                claimed = await a.ok("#claimKeyPackages", users=[BOB], cipher_suite=1)
                refs = {k["device"]: k["ref"] for k in claimed["key_packages"]}
                w = welcome([refs["d1"]])
                won = await send(a, g, private(g, 0, ContentType.COMMIT), welcome=w)
                _, got = await d1.next_event("#welcome")
                assert (got["seq"], got["welcome"]) == (won["seq"], w)
                await _no_event(d2, "#welcome")
                await _no_event(c, "#welcome")  # a member, but not named
            storage = r.relay.storage
            assert await storage.welcomes_for(BOB, "d2") == []
            assert await storage.welcomes_for(CAROL, "c1") == []
            # On resume too: only d1's inbox holds it.
            async with connect(r.ws_url, BOB, "d2", subscribe=True) as d2:
                await d2.caught_up()
                await _no_event(d2, "#welcome")
            async with connect(r.ws_url, BOB, "d1", subscribe=True) as d1:
                _, again = await d1.next_event("#welcome")
                assert again["seq"] == won["seq"]


async def test_non_members_and_removed_members_read_nothing(database_url):
    with trio.fail_after(40):
        async with running_relay(database_url) as r:
            path = f"/v1/conversations/{CONV.hex()}/groupinfo"
            async with (
                connect(r.ws_url, ALICE, "a1") as a,
                connect(r.ws_url, BOB, "b1", subscribe=True) as b,
                connect(r.ws_url, CAROL, "c1", subscribe=True) as c,
            ):
                await a.ok("#createConversation", conversation=CONV, members=[BOB])
                await a.send(CONV, b"before")
                [m] = await b.messages(1)
                assert m["ciphertext"] == b"before"
                # carol: refused everywhere, and sees nothing live.
                body = {"conversation": CONV, "ciphertext": b"x"}
                assert await _error(c, "#send", client_message_id="c", **body) == "NotMember"
                assert await _error(c, "#send", ephemeral=True, **body) == "NotMember"
                assert await _error(c, "#addMembers", conversation=CONV, members=[CAROL]) == (
                    "NotMember"
                )
                async with connect(r.ws_url, CAROL, "c2") as c2:  # not yet subscribed
                    cursors = [{"conversation": CONV, "seq": 0}]
                    assert await _error(c2, "#subscribe", cursors=cursors) == "NotMember"
                status, _, _ = await http(r.port, "GET", path, make_token(CAROL, "c1"))
                assert status == 403
                await _no_event(c, "#message")
                # bob is removed: he is told, then gets nothing more.
                await a.ok("#removeMembers", conversation=CONV, members=[BOB])
                _, change = await b.next_event("#membership")
                while change["removed"] != [BOB]:
                    _, change = await b.next_event("#membership")
                await a.send(CONV, b"after")
                await a.ok("#send", conversation=CONV, ciphertext=b"typing", ephemeral=True)
                await _no_event(b, "#message")
                await _no_event(b, "#ephemeral", 0.1)
                await _no_event(c, "#message", 0.1)
                # And what was committed after, in conversations of their own, comes
                # first: nothing of CONV was on its way (nor the typing before it).
                await _next_message_is_the_barrier(a, b)
                await _next_message_is_the_barrier(a, c)
                assert [h["t"] for h, _ in b._skipped if h["t"] == "#ephemeral"] == []
            # ...also on resume, with or without his old cursor.
            async with connect(r.ws_url, BOB, "b1", subscribe=True) as b:
                await b.caught_up()
                await _no_event(b, "#message")
                assert (await b.ok("#listConversations"))["conversations"] == []
            async with connect(r.ws_url, BOB, "b1") as b:
                cursors = [{"conversation": CONV, "seq": 0}]
                assert await _error(b, "#subscribe", cursors=cursors) == "NotMember"
                assert await _error(b, "#ack", conversation=CONV, seq=1) == "NotMember"
            assert await r.relay.storage.get_cursors(BOB, "b1") == {}


async def test_token_lifetime_is_capped_by_configuration(database_url):
    with trio.fail_after(30):
        async with running_relay(database_url, max_token_lifetime_s=600) as r:
            status, body = await upgrade(r.port, make_token(ALICE, "a1", lifetime=601))
            assert (status, body["error"]) == (401, "InvalidToken")
            assert "lifetime" in str(body["message"])
            status, _, _ = await http(
                r.port, "GET", "/v1/keypackages/count", make_token(ALICE, "a1", lifetime=601)
            )
            assert status == 401
            assert (await upgrade(r.port, make_token(ALICE, "a1", lifetime=600)))[0] == 101
