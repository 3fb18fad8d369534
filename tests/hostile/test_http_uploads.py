"""Uploads are bounded before they are read; every HTTP error is JSON.

Before: 20 concurrent 15 MB KeyPackage uploads peaked at 552 MB RSS (all 413
in the end); 20 x 15 MB blob uploads by a non-member peaked at 742 MB (all
403); blobs over 16 MiB got the framework's HTML 413 although RELAY_MAX_BLOB
is 64 MiB; claims with bad JSON answered 500 HTML."""

from __future__ import annotations

import json
import os

import pytest
import trio

from tests.relayclient import connect, make_token

from .httpnode import (
    Node,
    Prober,
    check_live,
    during,
    error_of,
    exchange,
    open_from,
    relay_node,
    request,
)

ALICE, BOB = "did:example:alice", "did:example:bob"
CONV = b"upload-conv"
BIG = 15 * 1024 * 1024


async def _flood(
    node: Node, make: list[bytes], body_size: int, chunked: bool = False
) -> list[tuple[int, str]]:
    """Send each request head, then up to ``body_size`` bytes of body while
    the server takes them; returns each (status, error)."""
    answers: list[tuple[int, str]] = []
    chunk = b"x" * 65536
    if chunked:
        chunk = b"10000\r\n" + chunk + b"\r\n"

    async def one(head: bytes) -> None:
        with trio.fail_after(60):
            stream = await open_from("127.0.0.3", node.port)
            async with stream:
                data = b""

                async def reader() -> None:
                    nonlocal data
                    # Until the whole answer is in (the relay may keep the
                    # socket open while the client is still sending).
                    try:
                        while part := await stream.receive_some(65536):
                            data += part
                            head, sep, body = data.partition(b"\r\n\r\n")
                            length = [
                                int(line.split(b":")[1])
                                for line in head.lower().split(b"\r\n")
                                if line.startswith(b"content-length:")
                            ]
                            if sep and length and len(body) >= length[0]:
                                break
                    except trio.BrokenResourceError:
                        pass
                    writer.cancel()

                with trio.CancelScope() as writer:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(reader)
                        try:
                            await stream.send_all(head)
                            sent = 0
                            while sent < body_size:
                                await stream.send_all(chunk)
                                sent += len(chunk)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
                        await trio.sleep_forever()
                from .httpnode import parse_response

                answers.append(error_of(parse_response(data)))

    async with trio.open_nursery() as nursery:
        for head in make:
            nursery.start_soon(one, head)
    return answers


def _head(method: str, path: str, token: str, length: int | None, ctype: str = "") -> bytes:
    return request(method, path, token, content_type=ctype or None, length=length)


async def _peak_rss(node: Node, work) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    before, peak = node.rss_mb(), node.rss_mb()

    async def sample(*, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
        nonlocal peak
        task_status.started()
        while True:
            peak = max(peak, node.rss_mb())
            await trio.sleep(0.02)

    async with trio.open_nursery() as nursery:
        await nursery.start(sample)
        result = await work()
        nursery.cancel_scope.cancel()
    return peak - before, result


@pytest.mark.timeout(150)
async def test_oversized_uploads_cost_no_memory(tmp_path) -> None:
    with trio.fail_after(140):
        async with relay_node(tmp_path, RELAY_HANDSHAKE_TIMEOUT_S="3") as node:
            url = f"ws://127.0.0.1:{node.port}/v1/ws"
            async with connect(url, ALICE, "a1") as alice:
                await alice.ok(
                    "#createConversation", conversation=CONV, members=[BOB], storage="blob"
                )
            blobs = f"/v1/conversations/{CONV.hex()}/blobs"
            kp_ctype = "application/cbor"
            users = [f"did:example:u{i}" for i in range(20)]
            cases = [
                # 20 KeyPackage uploads announcing 15 MB: refused before any byte is read.
                (
                    [
                        _head("POST", "/v1/keypackages", make_token(u, "d"), BIG, kp_ctype)
                        for u in users
                    ],
                    (413, "PayloadTooLarge"),
                ),
                # 20 x 15 MB blob uploads by non-members: refused before the body.
                (
                    [_head("POST", blobs, make_token(u, "d"), BIG) for u in users],
                    (403, "NotMember"),
                ),
                # The same without Content-Length (chunked): the read stops at 1 MiB.
                (
                    [
                        _head("POST", "/v1/keypackages", make_token(u, "d"), None, kp_ctype)[:-2]
                        + b"Transfer-Encoding: chunked\r\n\r\n"
                        for u in users
                    ],
                    (413, "PayloadTooLarge"),
                ),
            ]
            prober = Prober(node.port)
            for n, (heads, expected) in enumerate(cases):
                growth, answers = await _peak_rss(
                    node,
                    lambda heads=heads, n=n: during(
                        prober, lambda: _flood(node, heads, BIG, chunked=n == 2)
                    ),
                )
                print(f"uploads case {n} {expected}: RSS peak +{growth:.1f} MB")
                assert answers == [expected] * 20, answers
                assert growth < 50, f"RSS grew {growth:.0f} MB"
            print(f"uploads: /health/live worst {prober.worst_ms:.1f} ms, {prober.failures} failed")
            check_live(prober, min_samples=1)
            assert "Traceback" not in node.log_text()


@pytest.mark.timeout(120)
async def test_large_blob_streams_both_ways_within_the_configured_limit(tmp_path) -> None:
    data = os.urandom(20 * 1024 * 1024)  # over Quart's 16 MiB default, under RELAY_MAX_BLOB
    with trio.fail_after(110):
        async with relay_node(tmp_path, RELAY_MAX_BLOB=str(24 * 1024 * 1024)) as node:
            url = f"ws://127.0.0.1:{node.port}/v1/ws"
            async with connect(url, ALICE, "a1") as alice:
                await alice.ok(
                    "#createConversation", conversation=CONV, members=[BOB], storage="blob"
                )
            path = f"/v1/conversations/{CONV.hex()}/blobs"
            token = make_token(ALICE, "a1")

            async def up() -> tuple[int, dict[str, str], bytes]:
                return await exchange(node.port, request("POST", path, token, data), limit=60)

            growth, (status, _, body) = await _peak_rss(node, up)
            print(f"20 MB blob upload: RSS peak +{growth:.1f} MB")
            assert status == 201, body
            assert growth < 50, f"upload grew RSS {growth:.0f} MB"
            key = json.loads(body)["blob"]

            async def down() -> tuple[int, dict[str, str], bytes]:
                get = request("GET", f"{path}/{key}", make_token(ALICE, "a1"))
                return await exchange(node.port, get, limit=60)

            growth, (status, headers, got) = await _peak_rss(node, down)
            print(f"20 MB blob download: RSS peak +{growth:.1f} MB")
            assert (status, headers.get("content-length")) == (200, str(len(data)))
            assert got == data
            assert growth < 50, f"download grew RSS {growth:.0f} MB"
            too_big = request("POST", path, token, length=25 * 1024 * 1024)
            answer = await exchange(node.port, too_big)
            assert error_of(answer) == (413, "PayloadTooLarge")
            assert json.loads(answer[2])["limit"] == 24 * 1024 * 1024
            no_length = request("POST", path, token, length=None)
            assert error_of(await exchange(node.port, no_length)) == (411, "LengthRequired")


@pytest.mark.timeout(60)
async def test_every_http_error_is_json(tmp_path) -> None:
    token = make_token(ALICE, "a1")
    claim = "/v1/keypackages/claim"
    cases = [
        (request("POST", claim, token, b"\xff\xfe{"), (400, "InvalidRequest")),
        (request("POST", claim, token, b"[" * 100_000 + b"]" * 100_000), (400, "InvalidRequest")),
        (
            request("POST", claim, token, b'{"users": ["did:\\ud800x"], "cipher_suite": 1}'),
            (400, "InvalidRequest"),
        ),
        (
            request("POST", claim, token, b'{"users": ["did:a\\u0000"], "cipher_suite": 1}'),
            (400, "InvalidRequest"),
        ),
        (request("POST", claim, token, b"{" * 300_000), (413, "PayloadTooLarge")),
        (request("GET", "/nowhere"), (404, "NotFound")),
        (request("DELETE", "/health/live"), (405, "MethodNotAllowed")),
        (request("POST", "/v1/keypackages", None, b"x"), (401, "AuthRequired")),
        # A body that stops half way: 408 after RELAY_HANDSHAKE_TIMEOUT_S.
        (request("POST", claim, token, b'{"users"', length=100), (408, "RequestTimeout")),
    ]
    with trio.fail_after(50):
        async with relay_node(tmp_path, RELAY_HANDSHAKE_TIMEOUT_S="1") as node:
            for raw, expected in cases:
                assert error_of(await exchange(node.port, raw)) == expected, raw[:80]
            assert "Traceback" not in node.log_text()


@pytest.mark.timeout(60)
async def test_concurrent_requests_per_user_are_capped(tmp_path) -> None:
    with trio.fail_after(50):
        async with relay_node(
            tmp_path, RELAY_HTTP_REQUESTS_PER_USER="3", RELAY_HANDSHAKE_TIMEOUT_S="5"
        ) as node:
            held: list[trio.SocketStream] = []
            try:
                for _ in range(3):  # three claims whose bodies never finish
                    stream = await open_from("127.0.0.4", node.port)
                    head = request(
                        "POST", "/v1/keypackages/claim", make_token(ALICE, "a"), length=50
                    )
                    await stream.send_all(head + b"{")
                    held.append(stream)
                await trio.sleep(0.3)
                fourth = request("GET", "/v1/keypackages/count", make_token(ALICE, "a"))
                assert error_of(await exchange(node.port, fourth)) == (429, "TooManyRequests")
                other = request("GET", "/v1/keypackages/count", make_token(BOB, "b"))
                assert (await exchange(node.port, other))[0] == 200
            finally:
                for s in held:
                    await trio.aclose_forcefully(s)
            with trio.fail_after(10):
                while (await exchange(node.port, fourth))[0] != 200:  # noqa: ASYNC110
                    await trio.sleep(0.1)
