"""Single-use tokens: a jti opens one WebSocket or SSE stream, once, across nodes."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import pytest
import trio

from mls_relay_client import Message, RelayClient, RequestFailed
from relay.base.config import from_env

from .harness import running_relay
from .mls_helpers import http
from .relayclient import AUDIENCE, SECRET, connect, make_token

ALICE, BOB = "did:example:alice", "did:example:bob"


async def upgrade(port: int, token: str, path: str = "/v1/ws") -> tuple[int, dict[str, object]]:
    """A raw WebSocket upgrade: (status, JSON body of a refusal, or {} for 101)."""
    key = base64.b64encode(os.urandom(16)).decode()
    head = (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    )
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(head.encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            assert chunk, data
            data += chunk
        status = int(data.split(b" ", 2)[1])
        if status == 101:
            return status, {}
        while chunk := await stream.receive_some(65536):
            data += chunk
    return status, json.loads(data.partition(b"\r\n\r\n")[2])


async def sse_status(port: int, token: str) -> tuple[int, bytes]:
    """Open /v1/events; return the status and the first bytes (then hang up)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET /v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            assert chunk, data
            data += chunk
        status = int(data.split(b" ", 2)[1])
        while status != 200 and (chunk := await stream.receive_some(65536)):
            data += chunk  # a refusal: its JSON body, up to the close
    return status, data


async def test_replay_on_the_same_node_websocket_and_sse(database_url):
    with trio.fail_after(40):
        async with running_relay(database_url) as r:
            token = make_token(ALICE, "a1")
            async with connect(r.ws_url, ALICE, "a1", token=token):
                pass
            # Closed or not, the token is spent; the refusal comes before the upgrade.
            status, body = await upgrade(r.port, token)
            assert (status, body["error"]) == (401, "TokenReplayed")
            assert "already used" in str(body["message"])
            # A fresh token for the same device connects.
            assert (await upgrade(r.port, make_token(ALICE, "a1")))[0] == 101
            # SSE streams spend their jti the same way, and share the id space.
            sse = make_token(ALICE, "sse")
            assert (await sse_status(r.port, sse))[0] == 200
            status, data = await sse_status(r.port, sse)
            assert status == 401 and b'"TokenReplayed"' in data, data
            assert (await upgrade(r.port, sse))[0] == 401
            # The HTTP key-package routes do not spend it (several calls per token).
            for _ in range(3):
                got, _, _ = await http(r.port, "GET", "/v1/keypackages/count", token)
                assert got == 200


async def test_replay_across_two_nodes_sharing_postgresql(pg_database_url):
    with trio.fail_after(40):
        async with (
            running_relay(pg_database_url, node_id="n1") as one,
            running_relay(pg_database_url, node_id="n2") as two,
        ):
            token = make_token(ALICE, "a1")
            assert (await upgrade(one.port, token))[0] == 101
            status, body = await upgrade(two.port, token)
            assert (status, body["error"]) == (401, "TokenReplayed")
            # A race between the nodes: exactly one upgrade wins each token.
            for n in range(3):
                raced = make_token(BOB, f"b{n}")
                statuses: list[int] = []

                async def attempt(port: int, token: str = raced, out: list[int] = statuses) -> None:
                    out.append((await upgrade(port, token))[0])

                async with trio.open_nursery() as nursery:
                    for port in (one.port, two.port, one.port, two.port):
                        nursery.start_soon(attempt, port)
                assert sorted(statuses) == [101, 401, 401, 401]


async def test_single_use_off_allows_reuse(database_url):
    assert from_env({"RELAY_TOKEN_SINGLE_USE": "0"}).token_single_use is False
    assert from_env({}).token_single_use is True
    with trio.fail_after(30):
        async with running_relay(database_url, token_single_use=False) as r:
            token = make_token(ALICE, "a1")
            for _ in range(3):
                async with connect(r.ws_url, ALICE, "a1", token=token) as a:
                    assert a.hello["user"] == ALICE
            assert (await sse_status(r.port, token))[0] == 200


def _chat_example() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "examples" / "chat.py"
    spec = importlib.util.spec_from_file_location("chat_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_sdk_reconnects_need_a_token_provider(database_url):
    mint = _chat_example().token_minter(SECRET, BOB, "b1", AUDIENCE)
    with trio.fail_after(40):
        async with running_relay(database_url) as r:
            async with connect(r.ws_url, ALICE, "a1") as a:
                await a.ok("#createConversation", conversation=b"sdk", members=[BOB])
                await a.send(b"sdk", b"one")
                # examples/chat.py's provider: a fresh token per connection.
                async with RelayClient.connect(r.ws_url, mint, initial_backoff=0.05) as bob:
                    events = bob.events()
                    first = await _next_message(events)
                    r.relay.registry.sessions[(BOB, "b1")].close(1012, "test")
                    for _ in range(400):  # until the SDK is back, with a fresh token
                        if bob.connections == 2:
                            break
                        await trio.sleep(0.05)
                    await a.send(b"sdk", b"two")
                    second = await _next_message(events)
                    assert [first.ciphertext, second.ciphertext] == [b"one", b"two"]
                    assert bob.connections == 2
            # A plain string works once: the reconnect is refused as a replay.
            once = make_token(BOB, "b2")
            async with RelayClient.connect(r.ws_url, once, initial_backoff=0.05) as bob:
                r.relay.registry.sessions[(BOB, "b2")].close(1012, "test")
                with pytest.raises(RequestFailed) as failed:
                    await bob.list_conversations()
                assert failed.value.error == "AuthRejected"
                assert "TokenReplayed" in str(failed.value)


async def _next_message(events: AsyncIterator[object]) -> Message:
    while True:
        event = await events.__anext__()
        if isinstance(event, Message):
            return event
