"""The edges: authentication before the upgrade, bad frames on a live
connection, the HTTP surface on the same port, and a third-party client."""

from __future__ import annotations

import json
import time
import uuid

import cbor2
import jwt
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from .harness import running_relay
from .relayclient import AUDIENCE, SECRET, connect, decode, encode, make_token

ALICE, BOB = "did:example:alice", "did:example:bob"


async def http_request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send a raw HTTP/1.1 request; read until the server closes the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def upgrade_request(path: str, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
    return (
        f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\n{auth}\r\n"
    ).encode()


def _claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": ALICE,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "device": "d1",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


BAD_TOKENS = {
    "missing": None,
    "garbage": "not-a-jwt",
    "expired": jwt.encode(
        _claims(iat=int(time.time()) - 900, exp=int(time.time()) - 600), SECRET, algorithm="HS256"
    ),
    "not-yet-valid": jwt.encode(_claims(nbf=int(time.time()) + 600), SECRET, algorithm="HS256"),
    "issued-in-future": jwt.encode(
        _claims(iat=int(time.time()) + 600, exp=int(time.time()) + 900), SECRET, algorithm="HS256"
    ),
    "wrong-audience": jwt.encode(_claims(aud="did:web:other"), SECRET, algorithm="HS256"),
    "alg-none": jwt.encode(_claims(), None, algorithm="none"),
    "bad-signature": jwt.encode(_claims(), SECRET + "x", algorithm="HS256"),
    "wrong-algorithm": jwt.encode(_claims(), SECRET, algorithm="HS512"),
    "no-jti": jwt.encode(_claims(jti=None), SECRET, algorithm="HS256"),
    "no-device": jwt.encode(_claims(device=None), SECRET, algorithm="HS256"),
    "no-sub": jwt.encode(_claims(sub=None), SECRET, algorithm="HS256"),
    "no-exp": jwt.encode(_claims(exp=None), SECRET, algorithm="HS256"),
}


#: Each case's documented error (docs/PROTOCOL.md, "Authentication"); the rest: InvalidToken.
EXPECTED_ERROR = {"missing": "AuthRequired", "expired": "ExpiredToken"}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_bad_tokens_are_refused_before_upgrade(tmp_path, case):
    with trio.fail_after(20):
        async with running_relay(f"sqlite:///{tmp_path}/r.db") as r:
            status, headers, body = await http_request(
                r.port, upgrade_request("/v1/ws", BAD_TOKENS[case])
            )
            assert status == 401
            assert headers["content-type"] == "application/json"
            error = json.loads(body)
            assert set(error) == {"error", "message"}
            assert error["error"] == EXPECTED_ERROR.get(case, "InvalidToken"), error
            # A good token on the same relay still works.
            stream = await trio.open_tcp_stream("127.0.0.1", r.port)
            async with stream:
                await stream.send_all(upgrade_request("/v1/ws", make_token(ALICE, "d1")))
                head = b""
                while b"\r\n\r\n" not in head:
                    head += await stream.receive_some(4096)
                assert head.startswith(b"HTTP/1.1 101 ")


async def test_token_in_query_parameter_is_accepted(tmp_path):
    with trio.fail_after(20):
        async with running_relay(f"sqlite:///{tmp_path}/r.db") as r:
            url = f"{r.ws_url}?access_token={make_token(ALICE, 'q1')}"
            async with open_websocket_url(url) as ws:
                header, hello = decode(await ws.get_message())  # type: ignore[arg-type]
                assert header == {"op": 1, "t": "#hello"}
                assert (hello["user"], hello["device"], hello["protocol"]) == (ALICE, "q1", 1)


async def test_bad_frames_get_errors_or_close_and_others_keep_going(tmp_path):
    conv = b"edge"
    with trio.fail_after(30):
        async with running_relay(
            f"sqlite:///{tmp_path}/r.db", max_frame=4096, max_ciphertext=2048
        ) as r:
            async with (
                connect(r.ws_url, ALICE, "a1") as a,
                connect(r.ws_url, BOB, "b1", subscribe=True) as b,
            ):
                await a.ok("#createConversation", conversation=conv, members=[BOB])
                # Unknown request type: an error reply with the id; still connected.
                reply = await a.request("#frobnicate", x=1)
                assert (reply.ok, reply.body["error"]) == (False, "UnknownRequest")
                reply = await a.request(
                    "#send", conversation=conv, ciphertext=b"x" * 3000, client_message_id="big"
                )
                assert reply.body["error"] == "PayloadTooLarge"
                reply = await a.request(
                    "#send", conversation="not-bytes", ciphertext=b"x", client_message_id="m"
                )
                assert reply.body["error"] == "InvalidRequest"
                # A request without an id: an error without id.
                await a.send_raw(encode("#listConversations", {}))
                _, err = await a.next_event()
                assert err["error"] == "InvalidRequest" and "id" not in err
                assert await a.send(conv, b"still fine") == 1
                assert [m["seq"] for m in await b.messages(1)] == [1]

            for payload, code in [
                (b"\xff\xfe garbage", 4400),
                (encode("#x", {"pad": b"y" * 5000}), 1009),
                (cbor2.dumps({"op": 1, "t": "#x"}), 4400),
            ]:
                async with open_websocket_url(
                    r.ws_url,
                    extra_headers=[(b"authorization", f"Bearer {make_token(ALICE, 'z')}".encode())],
                ) as ws:
                    await ws.get_message()  # hello
                    await ws.send_message(payload)
                    with pytest.raises(ConnectionClosed) as closed:
                        await ws.get_message()
                    assert closed.value.reason.code == code
            async with connect(r.ws_url, ALICE, "a1") as a:
                assert await a.send(conv, b"after abuse") == 2


async def test_health_endpoints_share_the_port_and_close(tmp_path):
    with trio.fail_after(20):
        async with running_relay(f"sqlite:///{tmp_path}/r.db") as r:
            req = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            status, headers, body = await http_request(r.port, req)
            assert status == 200 and headers["content-type"] == "application/json"
            health = json.loads(body)
            assert health["status"] == "healthy" and health["version"] == "0.1.0"
            assert health["checks"] == {"database": "healthy", "memory": "healthy"}
            assert abs(health["timestamp"] - time.time()) < 5
            for path, expected, what in [
                ("/health/live", 200, ("status", "alive")),
                ("/health/ready", 200, ("status", "ready")),
                ("/nope", 404, ("error", "NotFound")),
                ("/v1/ws", 400, ("error", "ProtocolError")),  # only upgrades
            ]:
                req = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
                status, _, body = await http_request(r.port, req)
                assert status == expected, path
                key, value = what
                assert json.loads(body)[key] == value, (path, body)
            r.relay.state.shutting_down = True
            status, _, body = await http_request(
                r.port, b"GET /health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert status == 503


async def test_keep_alive_http_connection_is_closed_by_server(tmp_path):
    """Quart-Trio on Hypercorn used to keep idle connections open forever."""
    with trio.fail_after(20):
        async with running_relay(f"sqlite:///{tmp_path}/r.db") as r:
            # The frontend's keep-alive timeout is 5 s: the server must hang up.
            stream = await trio.open_tcp_stream("127.0.0.1", r.port)
            await stream.send_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            with trio.fail_after(12):
                while chunk := await stream.receive_some(65536):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 200")


async def test_third_party_websockets_client_speaks_the_protocol(database_url):
    """The `websockets` library (asyncio) in a thread, from docs/PROTOCOL.md alone."""
    conv = bytes.fromhex("00112233")
    async with (
        running_relay(database_url) as r,
        connect(r.ws_url, BOB, "b1", subscribe=True) as bob,
    ):
        result = await trio.to_thread.run_sync(_websockets_client, r.ws_url, conv)
        assert result == {"created": True, "seq": 1}
        with trio.fail_after(10):
            [m] = await bob.messages(1)
        assert m["ciphertext"] == b"\x00\x01ciphertext"


def _websockets_client(url: str, conv: bytes) -> dict[str, object]:
    import asyncio

    import websockets

    def frame(t: str, body: dict[str, object]) -> bytes:
        return cbor2.dumps({"t": t, "op": 1}, canonical=True) + cbor2.dumps(body, canonical=True)

    async def main() -> dict[str, object]:
        token = make_token(ALICE, "third-party")
        async with (
            asyncio.timeout(10),
            websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws,
        ):
            assert decode(await ws.recv())[0]["t"] == "#hello"
            await ws.send(
                frame("#createConversation", {"id": 1, "conversation": conv, "members": [BOB]})
            )
            created = decode(await ws.recv())[1]
            await ws.send(
                frame(
                    "#send",
                    {
                        "id": 2,
                        "conversation": conv,
                        "ciphertext": b"\x00\x01ciphertext",
                        "client_message_id": "c-1",
                    },
                )
            )
            while True:
                header, body = decode(await ws.recv())
                if header.get("t") == "#result" and body["id"] == 2:
                    return {"created": created["id"] == 1, "seq": body["seq"]}

    return asyncio.run(main())


async def test_connection_and_request_limits(tmp_path):
    with trio.fail_after(20):
        async with running_relay(
            f"sqlite:///{tmp_path}/r.db",
            connections_per_user=2,
            requests_per_connection=5,
            requests_per_user=1000,
        ) as r:
            async with connect(r.ws_url, ALICE, "d1"), connect(r.ws_url, ALICE, "d2") as c:
                status, _, body = await http_request(
                    r.port, upgrade_request("/v1/ws", make_token(ALICE, "d3"))
                )
                assert status == 429 and json.loads(body)["error"] == "TooManyConnections"
                # Another user is not affected.
                async with connect(r.ws_url, BOB, "b1"):
                    pass
                replies = [await c.request("#listConversations") for _ in range(15)]
                limited = [x for x in replies if not x.ok]
                assert limited and all(x.body["error"] == "RateLimited" for x in limited)
                assert all(x.body["retryable"] and x.body["retry_after_ms"] > 0 for x in limited)
                assert r.relay.node_limits.rejected["TooManyConnections"] == 1
                scraped = r.relay.metrics.exposition().decode()
                assert 'relay_errors_total{type="TooManyConnections"} 1.0' in scraped
                assert 'relay_errors_total{type="RateLimited"}' in scraped
            # Closing a connection frees its slot.
            async with connect(r.ws_url, ALICE, "d3") as c3:
                assert (await c3.request("#listConversations")).ok


async def test_a_bug_in_one_connection_closes_only_that_connection(tmp_path):
    """Fault injection: one session's input handling raises.  The node-wide
    reader must close that connection (1011) and keep serving the others."""
    conv = b"isolated"
    with trio.fail_after(20):
        async with (
            running_relay(f"sqlite:///{tmp_path}/r.db") as r,
            connect(r.ws_url, ALICE, "good") as good,
            connect(r.ws_url, BOB, "bad") as bad,
        ):
            await good.ok("#createConversation", conversation=conv, members=[BOB])

            def broken(data: bytes) -> None:
                raise RuntimeError("injected fault")

            r.relay.registry.sessions[(BOB, "bad")]._on_message = broken  # type: ignore[attr-defined]
            await bad.send_raw(encode("#listConversations", {"id": 99}))
            with trio.fail_after(5):
                await bad.closed.wait()
            assert bad.close_code == 1011
            assert await good.send(conv, b"still served") == 1
