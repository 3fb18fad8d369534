"""Framing and CBOR attacks against a relay process on loopback.

Before (issue 12): 15 million empty continuation fragments grew a node by
120 MB and never tripped FrameTooLarge; CBOR tag 2 was decoded (``c2 41
01`` read as request id 1) and duplicate map keys were accepted, the last
one winning.  docs/PROTOCOL.md: malformed CBOR closes the connection (4400
MalformedFrame); a request of the right shape with a bad value is refused
with ``#error`` InvalidRequest and the connection stays open.
"""

from __future__ import annotations

import cbor2
import pytest
import trio

from protocol.errors import MalformedFrame
from protocol.websocket import MAX_CLOSE_REASON, close_frame, close_reason
from protocol.wsframes import MAX_FRAGMENTS

from .httpnode import Node, relay_node
from .test_ws_attacks import MALLORY, check_live, closed_for, live, report, watched
from .wsattack import (
    OP_BINARY,
    OP_CONT,
    OP_PING,
    OP_PONG,
    Attacker,
    attacker,
    frame,
    request,
    until,
)

#: Empty fragments: 6 bytes each on the wire (2 of header, 4 of mask).
OPENING = frame(b"", OP_BINARY, fin=False)
EMPTY = frame(b"", OP_CONT, fin=False)


async def _alive(att: Attacker) -> None:
    """The connection still answers: a ping gets its pong."""
    assert await att.send(frame(b"alive?", OP_PING))
    for f in await att.receive():
        assert (f.opcode, f.payload) == (OP_PONG, b"alive?"), f


@pytest.mark.timeout(90)
async def test_empty_continuations_close_1009_after_4096_frames(tmp_path) -> None:
    """A message of 4096 empty frames is still being received; the 4097th
    frame closes the connection 1009.  Then floods of up to 15 million
    empty continuations (90 MB) each, reconnecting for 2 s, are closed the
    same way, with flat memory."""
    with trio.fail_after(80):
        async with relay_node(tmp_path) as node, watched(node) as (honest, memory, prober):
            async with attacker(node.port, MALLORY, "m1") as att:
                await att.reply()  # the #hello
                assert await att.send(OPENING + EMPTY * (MAX_FRAGMENTS - 1))
                await _alive(att)  # 4096 frames: at the bound, not past it
                assert await att.send(EMPTY)
                _, at_bound = await att.read_close()
            # The flood, from a new connection each time it is closed, for 2 s.
            floods: set[tuple[int, str]] = set()
            started, rounds, sent = trio.current_time(), 0, 0
            while trio.current_time() - started < 2 or rounds < 3 or honest.busy():
                async with attacker(node.port, MALLORY, f"f{rounds}") as att:
                    await until_closed(att, node, rounds + 1)
                    _, close = await att.read_close()
                floods.add(close)
                rounds, sent = rounds + 1, sent + att.sent
            ran = trio.current_time() - started
    report(
        "empty continuations",
        live_p99_worst_ms=live(prober),
        close_at_4097=at_bound,
        flood_connections=rounds,
        flood_frames_sent=sent // len(EMPTY),
        seconds=round(ran, 2),
        closes=floods,
        rss_growth_mb=round(memory.growth, 1),
        honest_sends=len(honest.seqs),
    )
    for code, reason in {at_bound} | floods:
        assert code == 1009 and reason.startswith("FrameTooLarge"), (code, reason)
        assert f"{MAX_FRAGMENTS} frames" in reason, reason
    assert memory.growth < 20, f"RSS grew {memory.growth:.0f} MB"
    honest.check()
    check_live(prober)
    check_live(prober)


async def until_closed(att: Attacker, node: Node, closes: int) -> float:
    """Empty continuations (up to 15 million, 90 MB), 10,000 per write, until
    the relay has counted ``closes`` FrameTooLarge; the seconds it took."""
    burst = EMPTY * 10_000

    async def flood() -> None:
        if await att.send(OPENING + burst):
            await att.flood(burst, 15_000_000 * len(EMPTY))

    return await until(flood, closed_for(node, "FrameTooLarge", above=closes), limit=25)


HEADER = cbor2.dumps({"t": "#listConversations", "op": 1})
SEND = cbor2.dumps({"t": "#send", "op": 1})
#: A header naming its type twice: which one would win?
DUPLICATE_T = b"\xa3" + b"".join(
    cbor2.dumps(item) for item in ("t", "#send", "op", 1, "t", "#listConversations")
)


def _send_body(**overrides: bytes) -> bytes:
    """A #send body as a CBOR map whose values are given as raw CBOR."""
    fields = {
        "id": cbor2.dumps(5),
        "conversation": cbor2.dumps(b"room"),
        "ciphertext": cbor2.dumps(b"x"),
        "client_message_id": cbor2.dumps("m1"),
        **overrides,
    }
    return bytes([0xA0 | len(fields)]) + b"".join(cbor2.dumps(k) + v for k, v in fields.items())


#: Malformed CBOR: (name, frame payload, what the close reason must name).
MALFORMED = [
    ("bignum id", HEADER + bytes.fromhex("a1626964c24101"), "tag 2"),
    ("duplicate id", HEADER + bytes.fromhex("a26269640162696402"), "same key twice"),
    ("duplicate t", DUPLICATE_T + cbor2.dumps({"id": 1}), "same key twice"),
    ("indefinite map", HEADER + bytes.fromhex("bf62696401ff"), "indefinite"),
    ("indefinite bytes", SEND + _send_body(ciphertext=bytes.fromhex("5f4101ff")), "indefinite"),
    (
        "date tag",
        SEND + _send_body(client_message_id=b"\xc0" + cbor2.dumps("2013-03-21T20:04:00Z")),
        "tag 0",
    ),
    ("CID tag", SEND + _send_body(conversation=bytes.fromhex("d82a450001020304")), "tag 42"),
    ("self-describe", bytes.fromhex("d9d9f7") + HEADER + cbor2.dumps({"id": 1}), "tag 55799"),
]

#: Well-formed CBOR with a bad value: (name, payload, error, field named).
INVALID = [
    ("float id", HEADER + cbor2.dumps({"id": 1.5}), "InvalidRequest", "id"),
    ("id 2^64-1", HEADER + cbor2.dumps({"id": 2**64 - 1}), "InvalidRequest", "id"),
    (
        "seq 2^64-1",
        cbor2.dumps({"t": "#ack", "op": 1})
        + cbor2.dumps({"id": 6, "conversation": b"room", "seq": 2**64 - 1}),
        "InvalidRequest",
        "seq",
    ),
]


async def _usable(att: Attacker, rid: int) -> None:
    assert await att.send(request("#listConversations", {"id": rid}))
    header, body = await att.reply()
    assert (header["t"], body.get("id")) == ("#result", rid), body


@pytest.mark.timeout(90)
async def test_cbor_tags_duplicates_and_indefinite_lengths_are_refused(tmp_path) -> None:
    closes: dict[str, tuple[int, str]] = {}
    errors: dict[str, dict[str, object]] = {}
    with trio.fail_after(80):
        async with relay_node(tmp_path) as node, watched(node) as (honest, _, prober):
            started, rounds = trio.current_time(), 0
            while trio.current_time() - started < 1.5 or honest.busy():  # again and again
                for name, payload, _ in MALFORMED:
                    async with attacker(node.port, MALLORY, f"m{rounds}") as att:
                        rounds += 1
                        await att.reply()  # the #hello
                        await _usable(att, 1)
                        assert await att.send(frame(payload))
                        _, close = await att.read_close()
                        assert closes.setdefault(name, close) == close, (closes[name], close)
            async with attacker(node.port, MALLORY, "valid") as att:
                await att.reply()
                for name, payload, _, _ in INVALID:
                    assert await att.send(frame(payload))
                    header, errors[name] = await att.reply()
                    assert header["t"] == "#error", errors[name]
                    await _usable(att, 2)  # the connection stays open
    report(
        "cbor",
        live_p99_worst_ms=live(prober),
        connections=rounds,
        honest_sends=len(honest.seqs),
        closes=closes,
        errors={k: v["message"] for k, v in errors.items()},
    )
    for name, _, named in MALFORMED:
        code, reason = closes[name]
        assert code == 4400 and reason.startswith("MalformedFrame"), (name, code, reason)
        assert named in reason, (name, reason)
    for name, _, error, field in INVALID:
        assert (errors[name]["error"], errors[name].get("field")) == (error, field), errors[name]
    honest.check()
    check_live(prober)


def test_close_reason_is_cut_on_a_character_boundary() -> None:
    """A reason quoting an excerpt ends in "…" (3 bytes in UTF-8): cut to
    the 123 bytes a close frame holds, never inside a character, which a
    client would refuse as 1007."""
    for pad in range(118, 124):
        wire = close_frame(4400, "M" * pad + "…" * 3)
        assert len(wire) <= 2 + 125 and wire[1] == len(wire) - 2
        reason = wire[4:].decode()  # strict: raises on a cut character
        assert reason.startswith("M" * pad) and len(wire[4:]) <= MAX_CLOSE_REASON
    error = MalformedFrame("CBOR tag 2 is not allowed")
    assert close_reason(error) == "MalformedFrame: CBOR tag 2 is not allowed"
    assert close_reason(MalformedFrame()) == "MalformedFrame"


def _with_bits(wire: bytes, bits: int) -> bytes:
    return bytes([wire[0] | bits]) + wire[1:]


def _long_header(length: int) -> bytes:
    """A binary frame header announcing ``length`` bytes (and its mask): nothing follows."""
    return bytes((0x82, 0xFF)) + length.to_bytes(8, "big") + b"\0\0\0\0"


#: Broken framing: (name, bytes, close code, what the reason must say).
VIOLATIONS = [
    ("unmasked", bytes((0x82, 0x01)) + b"x", 1002, "ProtocolError: client frames must be masked"),
    ("reserved bit", _with_bits(frame(b"x"), 0x40), 1002, "ProtocolError: reserved bits"),
    ("opcode 3", frame(b"x", 0x3), 1002, "ProtocolError: unknown opcode 0x3"),
    ("fragmented ping", frame(b"x", OP_PING, fin=False), 1002, "ProtocolError: control frames"),
    ("126-byte ping", frame(b"x" * 126, OP_PING), 1002, "ProtocolError: control frames"),
    ("stray continuation", frame(b"x", OP_CONT), 1002, "ProtocolError: continuation"),
    (
        "message in a message",
        frame(b"a", OP_BINARY, fin=False) + frame(b"b"),
        1002,
        "ProtocolError: new message inside",
    ),
    ("text frame", frame(b"hi", 0x1), 4400, "MalformedFrame: text frames"),
    ("2^62 bytes announced", _long_header(1 << 62), 1009, "FrameTooLarge: message larger than"),
    ("length top bit", _long_header(1 << 63), 1002, "ProtocolError: frame length has its most"),
    ("close 1005", frame((1005).to_bytes(2, "big"), 0x8), 1002, "ProtocolError: invalid close"),
    ("close reason", frame(b"\x03\xe8\xff", 0x8), 1007, "InvalidFramePayload: close reason"),
]


@pytest.mark.timeout(60)
async def test_framing_violations_close_with_a_reason(tmp_path) -> None:
    """Each broken frame closes its connection at once with the code of
    docs/PROTOCOL.md and a reason that says what was wrong; a 2^62-byte
    frame is refused from its header alone (nothing else is sent)."""
    closes: dict[str, tuple[int, str]] = {}
    with trio.fail_after(50):
        async with relay_node(tmp_path) as node, watched(node) as (honest, memory, prober):
            started, rounds = trio.current_time(), 0
            while trio.current_time() - started < 1.5 or honest.busy():
                for name, wire, _, _ in VIOLATIONS:
                    async with attacker(node.port, MALLORY, f"v{rounds}") as att:
                        rounds += 1
                        await att.reply()  # the #hello
                        assert await att.send(wire)
                        _, close = await att.read_close()
                        assert closes.setdefault(name, close) == close, (closes[name], close)
    report(
        "framing",
        live_p99_worst_ms=live(prober),
        connections=rounds,
        rss_growth_mb=round(memory.growth, 1),
        closes=closes,
    )
    for name, _, code, reason in VIOLATIONS:
        assert closes[name][0] == code and closes[name][1].startswith(reason), (name, closes[name])
    assert memory.growth < 20, f"RSS grew {memory.growth:.0f} MB"
    honest.check()
    check_live(prober)


@pytest.mark.timeout(30)
async def test_no_compression_is_negotiated(tmp_path) -> None:
    """A client offering permessage-deflate gets no extension (so no
    decompression bomb can be sent), and a compressed frame (RSV1) is 1002."""
    offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    with trio.fail_after(25):
        async with (
            relay_node(tmp_path) as node,
            attacker(node.port, MALLORY, "z1", headers=offer) as att,
        ):
            assert b"sec-websocket-extensions" not in att.head.lower(), att.head
            await att.reply()  # the #hello
            assert await att.send(_with_bits(frame(b"\xf2\x48\xcd\xc9\xc9\x07\x00"), 0x40))
            _, close = await att.read_close()
    assert close == (1002, "ProtocolError: reserved bits set: no extension was negotiated")
