"""Graceful shutdown (relay/ops/shutdown.py) in-process, over real sockets, on both backends.

Readiness turns 503 and new WebSockets are refused with 503 ShuttingDown while
draining; open WebSockets close with 1012; sends in flight either got their
#result (and are stored) or never got one; nothing acknowledged is lost; and
shutdown ends within RELAY_SHUTDOWN_DEADLINE_S even when a client never reads.
"""

from __future__ import annotations

import base64
import os
import uuid

import trio
from trio_websocket import ConnectionClosed

from relay.ops.shutdown import graceful_shutdown

from .harness import running_relay
from .relayclient import Client, ConnectionLost, connect, encode, make_token

ALICE, BOB = "did:example:alice", "did:example:bob"
CONV = b"drain"


async def _http_on(stream: trio.SocketStream, request: bytes) -> bytes:
    """Send a request on an already open connection; read the reply to the close."""
    await stream.send_all(request)
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


def _upgrade_head(token: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        "GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode()


async def test_drain_acknowledges_or_drops_sends_and_closes_with_1012(database_url):
    with trio.fail_after(50):
        async with running_relay(database_url, shutdown_deadline_s=15) as r:
            relay = r.relay
            async with connect(r.ws_url, ALICE, "setup") as a:
                await a.ok("#createConversation", conversation=CONV, members=[BOB])
            # Connections opened before the shutdown, used after it began.
            ready_probe = await trio.open_tcp_stream("127.0.0.1", r.port)
            late_ws = await trio.open_tcp_stream("127.0.0.1", r.port)
            acked: dict[str, int] = {}
            unanswered: list[str] = []
            refusals: list[str] = []
            async with (
                connect(r.ws_url, BOB, "b1", subscribe=True) as bob,
                connect(r.ws_url, ALICE, "a1") as a1,
                connect(r.ws_url, ALICE, "a2") as a2,
            ):
                await bob.caught_up()

                async def flood(c: Client, started: trio.Event) -> None:
                    for i in range(10_000):
                        cmid = f"{c.device}-{i}-{uuid.uuid4().hex[:6]}"
                        if i == 20:
                            started.set()
                        try:
                            reply = await c.request(
                                "#send", conversation=CONV, ciphertext=cmid.encode(),
                                client_message_id=cmid,
                            )  # fmt: skip
                        except (ConnectionLost, ConnectionClosed):  # closed under us
                            unanswered.append(cmid)
                            return
                        if not reply.ok:  # refused while closing: never stored
                            refusals.append(reply.body["error"])
                            unanswered.append(cmid)
                            continue
                        acked[cmid] = reply.body["seq"]

                async def pipeline(c: Client, started: trio.Event) -> None:
                    # Many sends in flight at once on one connection, none awaited.
                    async with trio.open_nursery() as n:
                        for _ in range(8):
                            n.start_soon(flood, c, started)

                started = [trio.Event(), trio.Event()]
                async with trio.open_nursery() as senders:
                    senders.start_soon(pipeline, a1, started[0])
                    senders.start_soon(pipeline, a2, started[1])
                    for e in started:
                        await e.wait()
                    t0 = trio.current_time()
                    await graceful_shutdown(relay)
                    took = trio.current_time() - t0
                    # Draining: readiness 503, a new upgrade refused with 503.
                    status = await _http_on(
                        ready_probe,
                        b"GET /health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    )
                    assert status.startswith(b"HTTP/1.1 503"), status[:80]
                    refused = await _http_on(late_ws, _upgrade_head(make_token(BOB, "late")))
                    assert refused.startswith(b"HTTP/1.1 503") and b"ShuttingDown" in refused
                for c in (bob, a1, a2):
                    with trio.fail_after(5):
                        await c.closed.wait()
                    assert c.close_code == 1012, (c.device, c.close_code)
            assert took < 15
            assert relay.registry.sessions == {}
            assert len(acked) > 40  # the flood really was under way
            # The only refusal while draining says where to go: elsewhere.
            assert set(refusals) <= {"ShuttingDown"}, refusals
            # Nothing acknowledged is lost; nothing unanswered was half-stored.
            stored = await relay.storage.read_messages(CONV, ALICE, 0, 100_000)
            by_cmid = {m.ciphertext.decode(): m.seq for m in stored}
            assert all(by_cmid.get(cmid) == seq for cmid, seq in acked.items())
            assert [m.seq for m in stored] == list(range(1, len(stored) + 1))
            assert set(by_cmid) - set(acked) <= set(unanswered)


async def test_deadline_holds_with_a_client_that_never_reads(database_url):
    with trio.fail_after(50):
        async with running_relay(
            database_url, shutdown_deadline_s=1.0, outbox_limit=256 * 1024 * 1024
        ) as r:
            async with connect(r.ws_url, ALICE, "a1") as a:
                await a.ok("#createConversation", conversation=CONV, members=[BOB])
                # Bob subscribes, then never reads again: his socket fills up.
                stuck = await trio.open_tcp_stream("127.0.0.1", r.port)
                await stuck.send_all(_upgrade_head(make_token(BOB, "b1")))
                head = b""
                while b"\r\n\r\n" not in head:
                    head += await stuck.receive_some(1)
                assert head.startswith(b"HTTP/1.1 101")
                sub = encode("#subscribe", {"id": 1})
                assert len(sub) < 126
                # A masked client frame; the zero mask leaves the payload as it is.
                await stuck.send_all(bytes([0x82, 0x80 | len(sub)]) + bytes(4) + sub)
                chunk = os.urandom(200_000)
                for i in range(80):  # ~16 MB towards a reader that never reads
                    await a.send(CONV, chunk, f"big-{i}")
                session = r.relay.registry.sessions[(BOB, "b1")]
                assert session.outbox.pending_bytes > 0  # type: ignore[attr-defined]
                t0 = trio.current_time()
                await graceful_shutdown(r.relay)
                took = trio.current_time() - t0
                assert took < 1.0 + 1.5, took
                # Ours closed with 1012 despite the stuck one.
                with trio.fail_after(5):
                    await a.closed.wait()
                assert a.close_code == 1012
            stuck.socket.close()
        # running_relay's exit cancelled the rest: the relay stopped too.
