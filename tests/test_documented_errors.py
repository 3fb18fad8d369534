"""The refusals docs/PROTOCOL.md documents, as a client sees them over real
sockets: AuthRequired without credentials, 400 + Sec-WebSocket-Version: 13 for
another WebSocket version, 404 BlobNotFound for a malformed blob key, `node`
in the SSE #hello, one #subscribe per connection, FutureCursor for a cursor
past the end on both transports, and ?access_token= only where documented."""

from __future__ import annotations

import json

import pytest
import trio

from relay.edge.sse import encode_cursor

from .harness import running_relay
from .relayclient import connect, make_token
from .test_relay_edges import http_request
from .test_sse import open_sse

ALICE, BOB = "did:example:alice", "did:example:bob"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def upgrade(headers: str, version: str = "13", path: str = "/v1/ws") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: {version}\r\n{headers}\r\n"
    ).encode()


def get(path: str, headers: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n".encode()


NO_CREDENTIALS = {
    "none": "",
    "empty bearer": "Authorization: Bearer \r\n",
    "basic": "Authorization: Basic YWxpY2U6cHc=\r\n",
}


@pytest.mark.parametrize("case", sorted(NO_CREDENTIALS))
async def test_no_credentials_is_auth_required_everywhere(tmp_path, case):
    headers = NO_CREDENTIALS[case]
    with trio.fail_after(20):
        async with running_relay(f"sqlite:///{tmp_path}/r.db") as r:
            for raw in (
                upgrade(headers),
                get("/v1/events", headers),
                get("/v1/keypackages/count", headers),
            ):
                status, head, body = await http_request(r.port, raw)
                assert status == 401, (raw, body)
                assert json.loads(body)["error"] == "AuthRequired", body
                assert head.get("www-authenticate", "bearer").lower().startswith("bearer")


async def test_unsupported_websocket_version_names_the_supported_one(tmp_path):
    token = make_token(ALICE, "d1")
    with trio.fail_after(20):
        async with running_relay(f"sqlite:///{tmp_path}/r.db") as r:
            for version in ("8", "14", ""):
                status, head, body = await http_request(
                    r.port, upgrade(f"Authorization: Bearer {token}\r\n", version)
                )
                assert status == 400, body
                assert head.get("sec-websocket-version") == "13", head  # RFC 6455 §4.2.2
                assert json.loads(body)["error"] == "UnsupportedWebSocketVersion"


async def test_malformed_blob_key_is_blob_not_found(tmp_path):
    conv = b"blobby"
    with trio.fail_after(20):
        async with running_relay(f"sqlite:///{tmp_path}/r.db") as r:
            async with connect(r.ws_url, ALICE, "a1") as a:
                await a.ok("#createConversation", conversation=conv, members=[], storage="blob")
            auth = f"Authorization: Bearer {make_token(ALICE, 'a1')}\r\n"
            for key in ("short", "x" * 65, "not-base64-%21%21%21-at-all"):
                status, _, body = await http_request(
                    r.port, get(f"/v1/conversations/{conv.hex()}/blobs/{key}", auth)
                )
                assert (status, json.loads(body)["error"]) == (404, "BlobNotFound"), body


async def test_sse_hello_names_the_node_like_the_websocket(tmp_path):
    with trio.fail_after(20):
        async with running_relay(f"sqlite:///{tmp_path}/r.db", node_id="node-7") as r:
            async with connect(r.ws_url, ALICE, "a1") as a:
                assert a.hello["node"] == "node-7"
            sse = await open_sse(r.port, make_token(ALICE, "s1"))
            async with sse.stream:
                hello = await sse.event()
                assert hello.name == "hello" and hello.data["node"] == "node-7"


async def test_a_second_subscribe_is_refused_and_the_first_stays(tmp_path):
    conv = b"twice"
    with trio.fail_after(20):
        async with (
            running_relay(f"sqlite:///{tmp_path}/r.db") as r,
            connect(r.ws_url, ALICE, "a1") as a,
            connect(r.ws_url, BOB, "b1", subscribe=True) as b,
        ):
            await a.ok("#createConversation", conversation=conv, members=[BOB])
            await b.caught_up()
            again = await b.request("#subscribe", cursors=[{"conversation": conv, "seq": 0}])
            assert not again.ok and again.body["error"] == "AlreadySubscribed"
            seq = await a.send(conv, b"still live")
            [m] = await b.messages(1, conv)
            assert (m["seq"], m["ciphertext"]) == (seq, b"still live")


async def test_a_cursor_past_the_end_is_future_cursor_on_both_transports(tmp_path):
    conv = b"ahead"
    with trio.fail_after(20):
        async with running_relay(f"sqlite:///{tmp_path}/r.db") as r:
            async with connect(r.ws_url, ALICE, "a1") as a:
                await a.ok("#createConversation", conversation=conv, members=[])
                await a.send(conv, b"one")
            async with connect(r.ws_url, ALICE, "a2") as ws:
                reply = await ws.request("#subscribe", cursors=[{"conversation": conv, "seq": 5}])
                assert not reply.ok and reply.body["error"] == "FutureCursor"
                assert reply.body["last_seq"] == 1
            cursor = encode_cursor({conv: 5})
            token = make_token(ALICE, "s1")
            status, _, body = await http_request(
                r.port,
                get("/v1/events", f"Authorization: Bearer {token}\r\nLast-Event-ID: {cursor}\r\n"),
            )
            error = json.loads(body)
            assert (status, error["error"], error["last_seq"]) == (400, "FutureCursor", 1), body
            # A cursor at the end is fine: the stream opens and replays nothing.
            sse = await open_sse(r.port, make_token(ALICE, "s2"), encode_cursor({conv: 1}))
            async with sse.stream:
                events = await sse.until("info", "CaughtUp")
                assert [e.name for e in events] == ["hello", "info"]


async def test_access_token_in_the_url_only_for_websocket_and_sse(tmp_path):
    with trio.fail_after(20):
        async with running_relay(f"sqlite:///{tmp_path}/r.db") as r:
            query = f"?access_token={make_token(ALICE, 'k1')}"
            status, _, body = await http_request(r.port, get("/v1/keypackages/count" + query))
            assert (status, json.loads(body)["error"]) == (401, "AuthRequired"), body
            status, _, body = await http_request(
                r.port, get(f"/v1/conversations/{'00' * 4}/groupinfo" + query)
            )
            assert (status, json.loads(body)["error"]) == (401, "AuthRequired"), body
            # The two documented places still take it.
            stream = await trio.open_tcp_stream("127.0.0.1", r.port)
            async with stream:
                token = make_token(ALICE, "w1")
                await stream.send_all(upgrade("", path=f"/v1/ws?access_token={token}"))
                head = b""
                while b"\r\n\r\n" not in head:
                    head += await stream.receive_some(4096)
                assert head.startswith(b"HTTP/1.1 101"), head
            reader_stream = await trio.open_tcp_stream("127.0.0.1", r.port)
            async with reader_stream:
                token = make_token(ALICE, "s1")
                await reader_stream.send_all(get(f"/v1/events?access_token={token}"))
                data = b""
                while b"event: hello" not in data:
                    data += await reader_stream.receive_some(4096)
                assert data.startswith(b"HTTP/1.1 200"), data[:100]
