"""The inbound WebSocket frame reader (protocol/wsframes.py), without sockets.

Frames come from wsproto's client side, an independent implementation, and
from hand-built bytes for the cases a client library would never produce.
"""

from __future__ import annotations

import itertools
import os
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping

from protocol.errors import FrameTooLarge, InvalidFramePayload, MalformedFrame, ProtocolError
from protocol.wsframes import (
    MAX_FRAGMENTS,
    Closed,
    FrameReader,
    Message,
    PingReceived,
    PongReceived,
    unmask,
)


def frame(payload: bytes, opcode: int = 0x2, *, fin: bool = True, rsv: int = 0,
          masked: bool = True) -> bytes:  # fmt: skip
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def client_bytes(*events: object) -> bytes:
    client = Connection(ConnectionType.CLIENT)
    return b"".join(client.send(e) for e in events)  # type: ignore[arg-type]


def test_unmask_matches_the_definition() -> None:
    for n in (0, 1, 3, 4, 5, 125, 1000, 4099):
        data, mask = os.urandom(n), os.urandom(4)
        assert unmask(data, mask) == bytes(b ^ mask[i % 4] for i, b in enumerate(data))


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(st.binary(max_size=3000), min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=20000), max_size=8),
)
def test_any_split_of_wsproto_client_frames(messages: list[bytes], cuts: list[int]) -> None:
    events: list[object] = []
    for m in messages:
        events += [BytesMessage(m[: len(m) // 2], message_finished=False),
                   Ping(b"p"), BytesMessage(m[len(m) // 2 :])]  # fmt: skip
    wire = client_bytes(*events)
    bounds = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    reader = FrameReader(1 << 20)
    got: list[object] = []
    for a, b in itertools.pairwise(bounds):
        got += reader.receive(wire[a:b])
    expected: list[object] = []
    for m in messages:
        expected += [PingReceived(b"p"), Message(m)]
    assert got == expected


def test_close_codes_and_reasons() -> None:
    wire = client_bytes(CloseConnection(1000, "bye"))
    assert FrameReader(100).receive(wire) == [Closed(1000, "bye")]
    assert FrameReader(100).receive(frame(b"", 0x8)) == [Closed(1005, "")]
    assert FrameReader(100).receive(frame(struct.pack("!H", 4001), 0x8)) == [Closed(4001, "")]
    reader = FrameReader(100)
    assert reader.receive(frame(b"", 0x8) + frame(b"after")) == [Closed(1005, "")]
    assert reader.receive(frame(b"more")) == []  # nothing is read after a close
    for bad in (b"\x03", struct.pack("!H", 1005), struct.pack("!H", 999), struct.pack("!H", 2999)):
        with pytest.raises(ProtocolError) as info:
            FrameReader(100).receive(frame(bad, 0x8))
        assert info.value.close_code == 1002
    with pytest.raises(InvalidFramePayload) as bad_text:
        FrameReader(100).receive(frame(struct.pack("!H", 1000) + b"\xff\xfe", 0x8))
    assert bad_text.value.close_code == 1007


@pytest.mark.parametrize(
    ("wire", "close_code"),
    [
        (frame(b"x", rsv=0x40), 1002),  # RSV1 without an extension
        (frame(b"x", masked=False), 1002),  # clients must mask
        (frame(b"x", 0x3), 1002),  # reserved data opcode
        (frame(b"x", 0xB), 1002),  # reserved control opcode
        (frame(b"x" * 126, 0x9), 1002),  # control frame too long
        (frame(b"x", 0x9, fin=False), 1002),  # fragmented control frame
        (frame(b"x", 0x0), 1002),  # continuation of nothing
        (frame(b"a", fin=False) + frame(b"b"), 1002),  # new message while fragmented
        (frame(b"hi", 0x1), 4400),  # text frames are not this protocol
        (b"\x82\xff" + b"\x80" + b"\x00" * 7 + b"mask", 1002),  # 64-bit length, top bit set
    ],
)
def test_framing_violations(wire: bytes, close_code: int) -> None:
    with pytest.raises(ProtocolError) as info:
        FrameReader(1 << 20).receive(wire)
    assert info.value.close_code == close_code
    if close_code == 4400:
        assert isinstance(info.value, MalformedFrame)


def test_too_large_is_refused_from_the_header_alone() -> None:
    header = b"\x82\xff" + struct.pack("!Q", 10 * 1024 * 1024)  # no mask, no payload yet
    with pytest.raises(FrameTooLarge):
        FrameReader(1 << 20).receive(header)
    reader = FrameReader(100)
    assert reader.receive(frame(b"x" * 60, fin=False)) == []
    with pytest.raises(FrameTooLarge):  # the whole message counts, not each frame
        reader.receive(frame(b"x" * 60, 0x0)[:4])


def test_a_large_frame_trickling_in_is_not_copied_quadratically() -> None:
    payload = os.urandom(1 << 20)
    wire = frame(payload)
    reader = FrameReader(2 << 20)
    started = time.perf_counter()
    got: list[object] = []
    for i in range(0, len(wire), 64):
        got += reader.receive(wire[i : i + 64])
    assert got == [Message(payload)]
    assert time.perf_counter() - started < 5  # quadratic copying took minutes


# --- bounds on fragmented messages (issue 12) -------------------------------------


def test_empty_continuations_cannot_loop_forever() -> None:
    """Each fragment counts its header: empty ones used to cost nothing and
    15 million of them grew a node by 120 MB without tripping the limit."""
    reader = FrameReader(1 << 20)
    assert reader.receive(frame(b"", fin=False)) == []
    empty = frame(b"", 0x0, fin=False)  # 6 bytes: 2 of header, 4 of mask
    sent = 0
    with pytest.raises(FrameTooLarge):
        for _ in range(10_000):
            reader.receive(empty)
            sent += 1
    assert sent < MAX_FRAGMENTS  # refused long before 10,000


def test_fragment_headers_count_against_the_limit() -> None:
    # Payload 90 in 3 frames of 30: 3 x (6 + 30) = 108 > 100 although 90 < 100.
    reader = FrameReader(100)
    reader.receive(frame(b"x" * 30, fin=False) + frame(b"x" * 30, 0x0, fin=False))
    with pytest.raises(FrameTooLarge) as info:
        reader.receive(frame(b"x" * 30, 0x0))
    assert info.value.close_code == 1009
    # The same payload as one frame is fine, so is a message exactly at the limit.
    assert FrameReader(100).receive(frame(b"x" * 90)) == [Message(b"x" * 90)]
    assert FrameReader(100).receive(frame(b"x" * 100)) == [Message(b"x" * 100)]


def test_fragment_count_is_bounded() -> None:
    reader = FrameReader(1 << 30)
    wire = frame(b"a", fin=False) + frame(b"b", 0x0, fin=False) * (MAX_FRAGMENTS - 2)
    assert reader.receive(wire) == []
    assert reader.receive(frame(b"c", 0x0)) == [Message(b"a" + b"b" * (MAX_FRAGMENTS - 2) + b"c")]
    reader.receive(wire + frame(b"b", 0x0, fin=False))  # MAX_FRAGMENTS frames so far
    with pytest.raises(FrameTooLarge):
        reader.receive(frame(b"c", 0x0))


def test_fragmented_message_split_at_every_byte() -> None:
    payload = bytes(range(256)) * 2
    pieces = [payload[:1], payload[1:1], payload[1:200], payload[200:]]
    wire = frame(pieces[0], fin=False)
    wire += frame(pieces[1], 0x0, fin=False) + frame(b"ping", 0x9)
    wire += frame(pieces[2], 0x0, fin=False) + frame(b"pong", 0xA)
    wire += frame(pieces[3], 0x0)
    expected = [PingReceived(b"ping"), PongReceived(b"pong"), Message(payload)]
    for cut in range(len(wire) + 1):
        reader = FrameReader(len(payload) + 64)
        assert reader.receive(wire[:cut]) + reader.receive(wire[cut:]) == expected, cut
    reader = FrameReader(len(payload) + 64)
    got: list[object] = []
    for i in range(len(wire)):
        got += reader.receive(wire[i : i + 1])
    assert got == expected
    # One byte short of what the message needs (headers included): refused
    # at whichever byte the limit is crossed, however it is split.
    needed = len(wire) - 2 * 10  # everything but the two control frames
    for cut in range(0, len(wire) + 1, 7):
        reader = FrameReader(needed - 1)
        with pytest.raises(FrameTooLarge):
            reader.receive(wire[:cut])
            reader.receive(wire[cut:])
