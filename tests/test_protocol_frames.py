"""Sans-I/O tests of the frame codec and the WebSocket server side (no sockets)."""

from __future__ import annotations

import contextlib
import os
import struct

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import events
from protocol.errors import FrameTooLarge, InvalidRequest, MalformedFrame, UnknownRequest
from protocol.frames import decode_frame, encode_frame
from protocol.requests import Limits, Send, Subscribe, parse_request
from protocol.websocket import (
    Closed,
    Message,
    PingReceived,
    ServerConnection,
    accept_response,
    binary_frame,
    parse_head,
)


def client_frame(payload: bytes, opcode: int = 0x2, fin: bool = True) -> bytes:
    """A masked client frame, as a browser would send it."""
    mask = os.urandom(4)
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def test_message_event_is_canonical_dag_cbor():
    wire = events.message(b"\x01\x02", 7, "did:example:a", 1_700_000_000_000, b"ct")
    reference = cbor2.dumps({"t": "#message", "op": 1}, canonical=True) + cbor2.dumps(
        {
            "conversation": b"\x01\x02",
            "seq": 7,
            "sender": "did:example:a",
            "time": 1_700_000_000_000,
            "ciphertext": b"ct",
        },
        canonical=True,
    )
    assert wire == reference
    assert wire.hex().startswith("a2617468236d657373616765626f7001")


def test_presorted_encoders_match_the_canonical_encoding():
    """Every hot-path encoder that lists its keys itself, in every variant."""
    cases = [
        (events.message(b"c", 7, "did:x:a", 5, b"", "k" * 24, 9000),
         "#message", {"conversation": b"c", "seq": 7, "sender": "did:x:a", "time": 5,
                      "ciphertext": b"", "blob": "k" * 24, "size": 9000}),
        (events.read(b"c", "did:x:b", 42), "#read",
         {"conversation": b"c", "user": "did:x:b", "seq": 42}),
    ]  # fmt: skip
    for epoch in (None, 0, 3):
        for blob in ("", "b" * 24):
            body: dict[str, object] = {"id": 9, "seq": 1, "time": 2}
            if epoch is not None:
                body["epoch"] = epoch
            if blob:
                body["blob"] = blob
            cases.append((events.send_result(9, 1, 2, epoch, blob), "#result", body))
    for wire, t, body in cases:
        reference = cbor2.dumps({"t": t, "op": 1}, canonical=True) + cbor2.dumps(
            body, canonical=True
        )
        assert wire == reference, t


def test_encode_frame_orders_keys_length_first():
    wire = encode_frame("#x", {"zz": 1, "a": 2, "bbb": {"yy": 1, "x": 2}})
    frame = decode_frame(wire)
    assert list(frame.body) == ["a", "zz", "bbb"]
    assert list(frame.body["bbb"]) == ["x", "yy"]
    with pytest.raises(TypeError):
        encode_frame("#x", {"f": 1.5})


def test_error_frame_shape():
    # A request's error is an op: 1 #error frame naming its request; op: -1
    # frames (an error ending the stream) carry exactly error and message.
    frame = decode_frame(events.error(UnknownRequest("nope"), 9))
    assert frame.op == 1 and frame.t == "#error"
    assert frame.body == {"id": 9, "error": "UnknownRequest", "message": "nope"}
    fatal = decode_frame(events.fatal("ServiceRestart", "bye"))
    assert fatal.op == -1 and fatal.t is None
    assert fatal.body == {"error": "ServiceRestart", "message": "bye"}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff",
        cbor2.dumps({"op": 1, "t": "#send"}),
        cbor2.dumps([1]) + cbor2.dumps({}),
        cbor2.dumps({"op": 2, "t": "#x"}) + cbor2.dumps({}),
        cbor2.dumps({"op": 1, "t": "send"}) + cbor2.dumps({}),
        cbor2.dumps({"op": 1, "t": "#x"}) + cbor2.dumps({}) + b"\x00",
        cbor2.dumps({"op": 1, "t": "#x"}) + cbor2.dumps({1: 2}),
        cbor2.dumps({"op": 1, "t": "#x"}) + cbor2.dumps(cbor2.CBORTag(42, b"cid")),
        b"\x81" * 5000,
    ],
)
def test_malformed_frames_raise_typed_error(data):
    with pytest.raises(MalformedFrame):
        decode_frame(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_never_crash_the_decoder(data):
    try:
        frame = decode_frame(data)
    except MalformedFrame:
        return
    with contextlib.suppress(InvalidRequest):
        parse_request(frame, Limits())


def test_requests_validate_fields():
    limits = Limits(max_ciphertext=4)
    frame = decode_frame(
        encode_frame(
            "#send",
            {"id": 1, "conversation": b"c", "ciphertext": b"abcd", "client_message_id": "m"},
        )
    )
    assert parse_request(frame, limits) == Send(1, b"c", b"abcd", "m", False)
    too_big = decode_frame(
        encode_frame(
            "#send",
            {"id": 1, "conversation": b"c", "ciphertext": b"abcde", "client_message_id": "m"},
        )
    )
    with pytest.raises(InvalidRequest):
        parse_request(too_big, limits)
    with pytest.raises(UnknownRequest):
        parse_request(decode_frame(encode_frame("#nope", {"id": 1})), limits)
    with pytest.raises(InvalidRequest):
        parse_request(decode_frame(encode_frame("#listConversations", {})), limits)
    with pytest.raises(InvalidRequest):
        parse_request(
            decode_frame(
                encode_frame("#send", {"id": 2, "conversation": "text", "ciphertext": b"x"})
            ),
            limits,
        )
    sub = decode_frame(
        encode_frame("#subscribe", {"id": 3, "cursors": [{"conversation": b"c", "seq": 5}]})
    )
    assert parse_request(sub, limits) == Subscribe(3, {b"c": 5})


def test_handshake_head_and_accept():
    raw = (
        b"GET /v1/ws?access_token=abc HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\nEXTRA"
    )
    for cut in range(len(raw) - 5):
        assert parse_head(raw[:cut]) is None
    head = parse_head(raw)
    assert head is not None and head.is_websocket and head.path == "/v1/ws"
    assert head.query_param("access_token") == "abc" and head.rest == b"EXTRA"
    # RFC 6455 §1.3's worked example.
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in accept_response(head)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_frames_split_at_every_byte_reassemble(size):
    payload = encode_frame("#send", {"id": 1, "blob": b"x" * size})
    wire = client_frame(payload) + client_frame(b"\x01\x02", opcode=0x9)
    step = 1 if len(wire) < 2000 else 997
    for cut in range(0, len(wire), step):
        conn = ServerConnection(max_message=1 << 20)
        got = conn.receive(wire[:cut]) + conn.receive(wire[cut:])
        assert got == [Message(payload), PingReceived(b"\x01\x02")]


def test_byte_by_byte_and_fragmented_message():
    payload = b"abcdefgh" * 10
    wire = client_frame(payload[:30], fin=False) + client_frame(payload[30:], opcode=0x0)
    conn = ServerConnection(max_message=1000)
    got: list[object] = []
    for i in range(len(wire)):
        got += conn.receive(wire[i : i + 1])
    assert got == [Message(payload)]


def test_oversized_message_is_refused_before_it_is_buffered():
    conn = ServerConnection(max_message=100)
    with pytest.raises(FrameTooLarge):
        conn.receive(client_frame(b"x" * 101))


def test_text_frames_are_protocol_errors_and_close_is_reported():
    with pytest.raises(MalformedFrame):
        ServerConnection(100).receive(client_frame(b"hi", opcode=0x1))
    close = client_frame(struct.pack("!H", 1000) + b"bye", opcode=0x8)
    assert ServerConnection(100).receive(close) == [Closed(1000, "bye")]


def test_server_frames_are_unmasked_and_sized():
    assert binary_frame(b"ab") == b"\x82\x02ab"
    assert binary_frame(b"x" * 200)[:4] == b"\x82\x7e\x00\xc8"
    assert binary_frame(b"x" * 70000)[:2] == b"\x82\x7f"
