"""A live WebSocket whose token expires is closed with 4401 ``TokenExpired``
(docs/PROTOCOL.md, "Close codes"), by a real relay, seen by a real client."""

from __future__ import annotations

import time

import jwt
import pytest
import trio

from protocol.closecodes import CloseCode

from .harness import running_relay
from .relayclient import SECRET, connect, make_token

ALICE, BOB = "did:example:alice", "did:example:bob"


@pytest.mark.timeout(40)
async def test_live_socket_is_closed_with_4401_when_its_token_expires(database_url: str) -> None:
    conv = b"expiry"
    # The sweeper that checks expiry runs every min(5, ping_interval / 2) s.
    async with running_relay(database_url, ping_interval_s=2.0) as r:
        with trio.fail_after(30):
            token = make_token(BOB, "b1", lifetime=3)
            expires_at = jwt.decode(token, SECRET, options={"verify_signature": False})["exp"]
            async with (
                connect(r.ws_url, ALICE, "a1") as alice,
                connect(r.ws_url, BOB, "b1", token=token, subscribe=True) as bob,
            ):
                await alice.ok("#createConversation", conversation=conv, members=[BOB])
                # Live until the token expires.
                assert await alice.send(conv, b"before") == 1
                [got] = await bob.messages(1, conv)
                assert got["ciphertext"] == b"before"

                with trio.fail_after(expires_at - time.time() + 5):
                    await bob.closed.wait()
                closed_at = time.time()
                reason = bob.ws.closed
                assert reason is not None
                assert (reason.code, reason.reason) == (CloseCode.TOKEN_EXPIRED, "TokenExpired")
                assert reason.code == 4401
                assert closed_at >= expires_at, "closed before the token expired"
                assert closed_at < expires_at + 2.5, "expiry noticed too late"

                # Only that connection: one with a valid token stays up.
                assert not alice.closed.is_set()
                assert await alice.send(conv, b"after") == 2
