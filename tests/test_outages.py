"""Database outage: sends fail fast with a retryable error, connections stay
up, readiness goes 503, and everything continues once it is back."""

from __future__ import annotations

import json
from urllib.parse import urlsplit, urlunsplit

import trio

from .harness import running_relay
from .relayclient import connect
from .tcpproxy import tcp_proxy
from .test_relay_edges import http_request

ALICE, BOB = "did:example:alice", "did:example:bob"
READY = b"GET /health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def _via(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    netloc = f"{parts.username + '@' if parts.username else ''}127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def test_postgres_outage_fails_fast_and_recovers(pg_database_url):
    conv = b"outage"
    target = urlsplit(pg_database_url).port or 5432
    with trio.fail_after(50):
        async with (
            tcp_proxy(target) as proxy,
            running_relay(_via(pg_database_url, proxy.port)) as r,
            connect(r.ws_url, ALICE, "a1") as a,
            connect(r.ws_url, BOB, "b1", subscribe=True) as b,
        ):
            await a.ok("#createConversation", conversation=conv, members=[BOB])
            assert await a.send(conv, b"before") == 1
            assert [m["seq"] for m in await b.messages(1)] == [1]

            await proxy.cut()
            started = trio.current_time()
            reply = await a.request(
                "#send", conversation=conv, ciphertext=b"during", client_message_id="during-1"
            )
            assert not reply.ok and reply.body["error"] == "Unavailable"
            assert reply.body["retryable"] is True
            assert trio.current_time() - started < 5, "send did not fail fast"
            status, _, body = await http_request(r.port, READY)
            assert status == 503 and json.loads(body)["checks"]["database"] == "unhealthy"

            proxy.restore()
            with trio.fail_after(15):
                while True:
                    reply = await a.request(
                        "#send",
                        conversation=conv,
                        ciphertext=b"during",
                        client_message_id="during-1",
                    )
                    if reply.ok:
                        break
                    assert reply.body["error"] == "Unavailable"
                    await trio.sleep(0.2)
            assert reply.body["seq"] == 2
            assert [m["seq"] for m in await b.messages(1)] == [2]
            status, _, _ = await http_request(r.port, READY)
            assert status == 200
