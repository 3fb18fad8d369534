"""Slowloris over WebSocket, against a relay process on loopback.

Before: a message begun and never finished, fed one byte every 2 s, was
held for good (the connection was never silent, so the ping timeout never
came): 60 connections holding 1 MiB frames less 100 bytes kept the node
61.5 MB larger for as long as they liked, and every socket of the
per-address cap (256) could hold as much.  Now a message gets
RELAY_HANDSHAKE_TIMEOUT_S plus RELAY_MAX_FRAME at 64 KiB/s, like an HTTP
body, and its connection is then closed 1008 MessageTimeout.
"""

from __future__ import annotations

import time

import pytest
import trio

from .httpnode import relay_node
from .test_ws_attacks import MALLORY, check_live, live, report, watched
from .wsattack import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    Attacker,
    attacker,
    frame,
    open_attacker,
    request,
)

#: Small settings so that the deadline is seconds: 1 s + 128 KiB at 64 KiB/s.
SETTINGS = {
    "RELAY_HANDSHAKE_TIMEOUT_S": "1",
    "RELAY_MAX_FRAME": str(128 * 1024),
    "RELAY_MAX_CIPHERTEXT": str(64 * 1024),
    "RELAY_PING_INTERVAL_S": "2",  # the sweep that checks runs every second
}
DEADLINE_S = 1 + 2
SIZE = 128 * 1024 - 64


def _frame_head(size: int) -> bytes:
    """A binary frame header announcing ``size`` bytes, mask all zero."""
    return bytes((0x82, 0xFF)) + size.to_bytes(8, "big") + b"\0\0\0\0"


async def _trickle(att: Attacker, fragments: bool, closes: list[tuple[float, int, str]]) -> None:
    """A message that never ends: all of one frame but 100 bytes, then a
    byte every 0.25 s; or (``fragments``) 100 KB in a first fragment, then
    a 1-byte continuation every 0.25 s with a ping between them, so that
    every frame is whole and the connection looks busy.  Until the relay
    closes; records when (s) and how."""
    started = time.monotonic()
    if fragments:
        assert await att.send(frame(b"\0" * 100_000, OP_BINARY, fin=False))
    else:
        assert await att.send(_frame_head(SIZE) + b"\0" * (SIZE - 100))
    for _ in range(99):  # never the 100 bytes that would end the frame
        if fragments:
            piece = frame(b"\0", OP_CONT, fin=False) + frame(b"still here", OP_PING)
        else:
            piece = b"\0"
        if not await att.send(piece):
            break
        with trio.move_on_after(0.25):
            while True:  # pongs, and at last the close frame
                got = await att.receive(1)
                assert got, "the relay dropped the connection without a close frame"
                for f in got:
                    if f.opcode == OP_CLOSE:
                        closes.append((time.monotonic() - started, *f.close))
                        return
    raise AssertionError(
        f"not closed after {time.monotonic() - started:.1f} s (fragments={fragments}, "
        f"sent {att.sent}, unparsed {bytes(att.buffered[:60])!r})"
    )


@pytest.mark.timeout(60)
async def test_a_message_trickled_a_byte_at_a_time_is_closed(tmp_path) -> None:
    """20 connections (the user's cap) trickle a message, half of them in
    whole fragments with pings between; each is closed 1008 MessageTimeout
    soon after the deadline.  A client sending a 100 KB message at 100 KB/s
    is not."""
    closes: list[tuple[float, int, str]] = []
    with trio.fail_after(50):
        async with (
            relay_node(tmp_path, **SETTINGS) as node,
            watched(node) as (honest, memory, prober),
        ):
            async with attacker(node.port, "did:example:fair", "f1") as fair:
                await fair.reply()  # the #hello
                slow_but_fair = request("#" + "f" * 100_000, {"id": 1})
                for i in range(0, len(slow_but_fair), 10_000):
                    assert await fair.send(slow_but_fair[i : i + 10_000])
                    await trio.sleep(0.1)
                _, body = await fair.reply()
                assert body["error"] == "UnknownRequest", body["error"]
            attackers = [await open_attacker(node.port, MALLORY, f"s{n}") for n in range(20)]
            try:
                async with trio.open_nursery() as nursery:
                    for n, att in enumerate(attackers):
                        await att.reply()  # the #hello
                        nursery.start_soon(_trickle, att, n % 2 == 1, closes)
            finally:
                for att in attackers:
                    await att.aclose()
    after = [c[0] for c in closes]
    kinds = {(code, reason.split(":")[0]) for _, code, reason in closes}
    report(
        "slowloris",
        connections=len(attackers),
        closed_after_s=(round(min(after), 1), round(max(after), 1)),
        closes=kinds,
        reason=closes[0][2],
        rss_growth_mb=round(memory.growth, 1),
        honest_sends=len(honest.seqs),
        live_p99_worst_ms=live(prober),
    )
    assert kinds == {(1008, "MessageTimeout")}, closes
    assert len(closes) == 20
    # The deadline, plus up to two sweeps (1 s each) and a loaded machine.
    assert max(after) < DEADLINE_S + 5, after
    honest.check()
    check_live(prober)
