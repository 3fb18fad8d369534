"""WebSocket attacks against a relay process on loopback: what one hostile
connection may cost the node, and that nobody else notices.

Each test runs one attack from tests/hostile/wsattack.py (raw frames, a 4 KiB
receive buffer, nothing read while attacking) against ``mls-relay serve``
while two honest users send to each other on their own connections and
``/health/live`` is asked every 20 ms.  Each asserts the bound with a number:
the node's peak RSS growth, how the attacker was closed, the honest users'
errors (0) and deliveries (all), the worst ``/health/live`` latency.

Before (issue 12): 1 MB frames of an unknown request type, never read, took
a node from 97 MB to 2.2 GB RSS in 26 s; a 520 MB ping flood grew it by
630 MB; valid ``#listConversations`` never read grew it by 85 MB in 30 s.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio

from tests.relayclient import connect, make_token

from .httpnode import Node, Prober, check_live, live, metric, relay_node
from .wsattack import (
    OP_PING,
    OP_PONG,
    Honest,
    Memory,
    attacker,
    cbor_message,
    frame,
    request,
    until,
)

MALLORY = "did:example:mallory"
MB = 1024 * 1024


async def _errors(node: Node, *kinds: str) -> float:
    total = 0.0
    for kind in kinds:
        total += await metric(node.port, "relay_errors_total", f'type="{kind}"')
    return total


def closed_for(node: Node, *kinds: str, above: int = 0) -> Callable[[], Awaitable[bool]]:
    """True once the relay counted more than ``above`` of ``kinds`` (the
    closes it decided on)."""

    async def done() -> bool:
        return await _errors(node, *kinds) > above

    return done


@contextlib.asynccontextmanager
async def watched(node: Node) -> AsyncIterator[tuple[Honest, Memory, Prober]]:
    """Honest users, the node's memory and /health/live, while the block
    runs; and afterwards, that the node logged no traceback."""
    honest, memory, prober = Honest(node.port), Memory(node.proc.pid), Prober(node.port)
    async with honest.running(), trio.open_nursery() as nursery:
        await nursery.start(prober.run)
        async with memory.sampling():
            yield honest, memory, prober
        nursery.cancel_scope.cancel()
    log = node.log_text()
    assert "Traceback" not in log, log[-3000:]


def report(name: str, **figures: object) -> None:
    """One line per test with its measured figures (pytest -s shows them)."""
    print(f"\n[{name}] " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def unknown_type(size: int) -> bytes:
    """A frame whose request type is ``size`` characters long."""
    return request("#" + "u" * size, {"id": 1})


@pytest.mark.timeout(90)
async def test_unread_1mb_unknown_requests_cost_a_bounded_amount(tmp_path) -> None:
    """1 MB frames of an unknown type, never read: every one is refused
    before the rate (16 requests each), refusals count as strikes, and the
    connection is closed 1008 RateLimitIgnored; memory stays flat.  The
    attacker reconnects and floods again for 3 s."""
    bad = unknown_type(1_000_000)
    closes, sent, rounds, longest = set(), [], 0, 0
    with trio.fail_after(80):
        async with relay_node(tmp_path) as node, watched(node) as (honest, memory, prober):
            started = trio.current_time()
            while trio.current_time() - started < 3 or rounds < 2 or honest.busy():
                async with attacker(node.port, MALLORY, f"m{rounds}") as att:
                    ran = await until(
                        lambda: att.flood(bad, 400 * MB),
                        closed_for(node, "RateLimitIgnored", "ConsumerTooSlow", above=rounds),
                        limit=25,
                    )
                    replies, close = await att.read_close()
                assert all(len(r.payload) < 400 for r in replies), "a reply quoted the request"
                rounds, longest = rounds + 1, max(longest, ran)
                closes.add(close)
                sent.append(att.sent)
    report(
        "1MB unknown",
        connections=rounds,
        sent_mb=sum(sent) // MB,
        first_connection_mb=sent[0] // MB,
        longest_s=round(longest, 2),
        closes=closes,
        rss_growth_mb=round(memory.growth, 1),
        honest_sends=len(honest.seqs),
        honest_worst_ms=round(honest.worst_send_ms),
        live_p99_worst_ms=live(prober),
    )
    assert closes <= {(1008, "RateLimitIgnored"), (4008, "ConsumerTooSlow")}, closes
    assert "closing a connection that ignores its rate limit" in node.log_text()
    # The first connection had the user's whole rate (the later ones share
    # what it left): the relay read its frames until it was closed.
    assert sent[0] >= 20 * MB, "the relay stopped reading before the attack was on"
    assert memory.growth < 60, f"RSS grew {memory.growth:.0f} MB"
    honest.check()
    check_live(prober)


@pytest.mark.timeout(90)
async def test_ping_flood_is_closed_and_costs_a_bounded_amount(tmp_path) -> None:
    """125-byte pings, 500 per write, never reading the pongs: pings take
    from the request rate, those beyond it get no pong but a strike, and the
    connection is closed 1008 RateLimitIgnored.  The attacker reconnects
    and floods again for 3 s."""
    pings = frame(b"p" * 125, OP_PING) * 500
    closes, sent, pongs, rounds = set(), 0, 0, 0
    with trio.fail_after(80):
        async with relay_node(tmp_path) as node, watched(node) as (honest, memory, prober):
            started = trio.current_time()
            while trio.current_time() - started < 3 or rounds < 3 or honest.busy():
                async with attacker(node.port, MALLORY, f"m{rounds}") as att:
                    await until(
                        lambda: att.flood(pings, 520 * MB),
                        closed_for(node, "RateLimitIgnored", "ConsumerTooSlow", above=rounds),
                        limit=20,
                    )
                    replies, close = await att.read_close()
                rounds += 1
                closes.add(close)
                sent += att.sent
                most = max(pongs, sum(r.opcode == OP_PONG for r in replies))
                pongs = most
            ran = trio.current_time() - started
            refused = await _errors(node, "RateLimited")
    report(
        "ping flood",
        rate_limited_per_connection=round(refused / rounds, 1),
        rounds=rounds,
        sent_mb=round(sent / MB, 1),
        seconds=round(ran, 2),
        closes=closes,
        most_pongs_read=pongs,
        rss_growth_mb=round(memory.growth, 1),
        honest_sends=len(honest.seqs),
        live_p99_worst_ms=live(prober),
    )
    # Closed for its rate every time (not later, as a slow consumer: a ping
    # flood that got its pongs would be), after about its 100 strikes.
    assert closes == {(1008, "RateLimitIgnored")}, closes
    assert refused / rounds <= 110, refused / rounds
    assert pongs <= 600, pongs  # the rate's burst (400), then no pong
    assert memory.growth < 30, f"RSS grew {memory.growth:.0f} MB"
    honest.check()
    check_live(prober)


@pytest.mark.timeout(90)
async def test_unread_list_conversations_is_closed_4008(tmp_path, database_url: str) -> None:
    """Valid #listConversations (about 6 KB of reply each: 100 conversations)
    at 150 a second, within the rate, never read: the queue fills to 3/4 of
    RELAY_OUTBOX_LIMIT, reading stops, and the next sweep that sees no byte
    taken closes it 4008 ConsumerTooSlow; the queue never passes the bound.
    Both backends: every request is a storage read."""
    with trio.fail_after(80):
        async with relay_node(tmp_path, database_url) as node:
            async with attacker(node.port, MALLORY, "m0") as setup:
                await setup.reply()  # the #hello
                for i in range(100):
                    body = {"id": i, "conversation": b"mallory-%03d" % i, "members": []}
                    assert await setup.send(request("#createConversation", body))
                    header, reply = await setup.reply()
                    assert header["t"] == "#result", reply
                assert await setup.send(request("#listConversations", {"id": 100}))
                reply_size = len((await setup.receive())[0].payload)
            async with (
                watched(node) as (honest, memory, prober),
                attacker(node.port, MALLORY, "m1") as att,
            ):

                async def paced() -> None:
                    for i in range(10_000):  # 150/s, under the 200/s rate
                        await att.send(request("#listConversations", {"id": i}))
                        await trio.sleep(1 / 150)

                ran = await until(paced, closed_for(node, "ConsumerTooSlow"), limit=30)
                _, close = await att.read_close()
    report(
        "listConversations unread",
        backend=database_url.split(":")[0],
        reply_bytes=reply_size,
        requests_sent=att.sent // len(request("#listConversations", {"id": 1})),
        seconds=round(ran, 2),
        close=close,
        rss_growth_mb=round(memory.growth, 1),
        honest_sends=len(honest.seqs),
        live_p99_worst_ms=live(prober),
    )
    assert close == (4008, "ConsumerTooSlow"), close
    # The queue's bound is 4 MiB: what the node holds for it, and more, is bounded.
    assert memory.growth < 40, f"RSS grew {memory.growth:.0f} MB"
    honest.check()
    check_live(prober)


async def _history(node: Node, conversation: bytes, count: int, size: int) -> None:
    """``count`` messages of ``size`` bytes from a member, paced under the rate."""
    async with connect(f"ws://127.0.0.1:{node.port}/v1/ws", MALLORY, "writer") as writer:
        await writer.ok("#createConversation", conversation=conversation, members=[])
        for i in range(count):
            await writer.send(conversation, i.to_bytes(4, "big") + b"h" * (size - 4), f"h{i}")
            await trio.sleep(0.02)  # 4 requests each (1 per 64 KiB): 200/s is the rate


@pytest.mark.timeout(90)
async def test_unread_replay_of_large_messages_holds_a_bounded_page(
    tmp_path, database_url: str
) -> None:
    """A member subscribes to 150 messages of 200 KB (30 MB of history) and
    never reads: the replay waits for room, holding one page of at most
    half RELAY_OUTBOX_LIMIT of ciphertext, not 1,000 rows (before: the
    whole 30 MB, and 100 MB for 400 such messages, for as long as the
    subscriber stayed connected)."""
    with trio.fail_after(80):
        async with relay_node(tmp_path, database_url) as node:
            await _history(node, b"big-history", 150, 200_000)
            async with (
                watched(node) as (honest, memory, prober),
                attacker(node.port, MALLORY, "reader") as att,
            ):
                await att.reply()  # the #hello
                assert await att.send(request("#subscribe", {"id": 1}))
                await trio.sleep(4)  # the replay fills what it may, then waits
    report(
        "unread replay",
        backend=database_url.split(":")[0],
        rss_growth_mb=round(memory.growth, 1),
        honest_sends=len(honest.seqs),
        live_p99_worst_ms=live(prober),
    )
    # The outbox (4 MiB) and one page (2 MiB), with room for the rest.
    assert memory.growth < 15, f"RSS grew {memory.growth:.0f} MB"
    honest.check()
    check_live(prober)


async def _unread_sse(node: Node, user: str, device: str) -> trio.SocketStream:
    """``GET /v1/events`` from a socket with a 4 KiB receive buffer that
    never reads (what it does not read stays queued on the relay)."""
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", node.port))
    stream = trio.SocketStream(sock)
    head = (
        "GET /v1/events HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n"
        f"Authorization: Bearer {make_token(user, device)}\r\n\r\n"
    )
    await stream.send_all(head.encode())
    return stream


@pytest.mark.timeout(60)
async def test_unread_sse_replay_holds_a_bounded_page(tmp_path) -> None:
    """The same over Server-Sent Events: the stream's replay shares the
    WebSocket's (relay/delivery/streams.py), and so its bounded page."""
    with trio.fail_after(50):
        async with relay_node(tmp_path) as node:
            await _history(node, b"big-history", 150, 200_000)
            async with watched(node) as (honest, memory, prober):
                stream = await _unread_sse(node, MALLORY, "sse")
                try:
                    await trio.sleep(4)  # the replay fills what it may, then waits
                finally:
                    await trio.aclose_forcefully(stream)
    report(
        "unread SSE replay",
        rss_growth_mb=round(memory.growth, 1),
        honest_sends=len(honest.seqs),
        live_p99_worst_ms=live(prober),
    )
    # The outbox (4 MiB, rendered as base64 JSON in 256 KiB slices) and one
    # page (2 MiB); measured 8.5-10 MB, 33.6 MB without the byte budget.
    assert memory.growth < 20, f"RSS grew {memory.growth:.0f} MB"
    honest.check()
    check_live(prober)


@pytest.mark.timeout(60)
async def test_errors_quote_a_short_excerpt_of_a_1mb_request(tmp_path) -> None:
    """A 1 MB unknown type, a 1 MB push provider name, 64 line separators as
    one, a 1 MB client_message_id: each refused with a reply of a few hundred
    bytes; the connection stays usable."""
    huge = "x" * 1_000_000
    cases = [
        (cbor_message("#" + huge, {"id": 1}), "UnknownRequest"),
        (cbor_message("#registerPush", {"id": 2, "provider": huge}), "InvalidRequest"),
        (
            cbor_message("#registerPush", {"id": 2, "provider": "\u2028" * 64, "token": "t"}),
            "UnknownPushProvider",
        ),
        (
            cbor_message(
                "#send",
                {"id": 3, "conversation": b"c", "ciphertext": b"x", "client_message_id": huge},
            ),
            "InvalidRequest",
        ),
    ]
    with trio.fail_after(50):
        async with relay_node(tmp_path) as node, attacker(node.port, MALLORY, "m1") as att:
            await att.reply()  # the #hello
            sizes = []
            for payload, expected in cases:
                assert await att.send(frame(payload))
                f = (await att.receive())[0]
                header, body = f.decoded()
                assert (header["t"], body["error"]) == ("#error", expected), body["error"]
                assert len(body["message"]) <= 120, body["message"][:200]
                assert len(f.payload) < 300, len(f.payload)
                sizes.append(len(f.payload))
            assert await att.send(request("#listConversations", {"id": 9}))
            header, body = await att.reply()
            assert (header["t"], body["id"]) == ("#result", 9)
            assert "Traceback" not in node.log_text()
    report("excerpts", reply_bytes=sizes)
