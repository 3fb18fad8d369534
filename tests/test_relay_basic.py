"""Black-box tests of the relay core over real loopback WebSockets (SQLite)."""

from __future__ import annotations

import trio

from .harness import running_relay
from .relayclient import connect

CONV = b"group-1"


async def test_two_users_two_devices_exchange_live(database_url):
    with trio.fail_after(20):
        async with running_relay(database_url) as r:  # noqa: SIM117 (r is needed below)
            async with (
                connect(r.ws_url, "did:example:alice", "a1", subscribe=True) as a1,
                connect(r.ws_url, "did:example:alice", "a2", subscribe=True) as a2,
                connect(r.ws_url, "did:example:bob", "b1", subscribe=True) as b1,
                connect(r.ws_url, "did:example:bob", "b2", subscribe=True) as b2,
            ):
                created = await a1.ok(
                    "#createConversation", conversation=CONV, members=["did:example:bob"]
                )
                assert created["members"] == ["did:example:alice", "did:example:bob"]
                seq = await a1.send(CONV, b"hello bob")
                assert seq == 1
                for c in (a2, b1, b2):
                    [m] = await c.messages(1)
                    assert m["seq"] == 1
                    assert m["ciphertext"] == b"hello bob"
                    assert m["sender"] == "did:example:alice"
                    assert isinstance(m["time"], int)
                assert await b2.send(CONV, b"hi alice") == 2
                for c in (a1, a2, b1):
                    [m] = await c.messages(1)
                    assert (m["seq"], m["ciphertext"]) == (2, b"hi alice")
