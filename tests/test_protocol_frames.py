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
from protocol.requests import ListConversations, RequestLimits, Send, Subscribe, parse_request
from protocol.strictcbor import MAX_ITEMS
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
        parse_request(frame, RequestLimits())


def test_requests_validate_fields():
    limits = RequestLimits(max_ciphertext=4)
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
    assert parse_request(
        decode_frame(encode_frame("#listConversations", {"id": 4})), limits
    ) == ListConversations(4, 500, b"")
    assert parse_request(
        decode_frame(encode_frame("#listConversations", {"id": 4, "limit": 2, "after": b"x"})),
        limits,
    ) == ListConversations(4, 2, b"x")
    for bad in ({"limit": 0}, {"limit": 501}, {"limit": True}, {"limit": "2"}, {"after": "x"}):
        listing = decode_frame(encode_frame("#listConversations", {"id": 4, **bad}))
        with pytest.raises(InvalidRequest) as refused:
            parse_request(listing, limits)
        assert refused.value.details["field"] == next(iter(bad)), bad
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


# --- strict CBOR input (issue 12, protocol/strictcbor.py) -------------------------

SEND_HEADER = encode_frame("#send", {})[: -len(cbor2.dumps({}))]


def _head(major: int, n: int) -> bytes:
    """A CBOR item head with argument ``n``, shortest form."""
    if n < 24:
        return bytes([major << 5 | n])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | info]) + n.to_bytes(size, "big")
    raise ValueError(n)


def _text(s: str) -> bytes:
    raw = s.encode()
    return _head(3, len(raw)) + raw


def _body(*pairs: tuple[str, bytes]) -> bytes:
    """A body map from (key, encoded value) pairs, in the order given (duplicates allowed)."""
    return _head(5, len(pairs)) + b"".join(_text(k) + v for k, v in pairs)


def _ack(seq: bytes) -> bytes:
    return SEND_HEADER + _body(("id", b"\x01"), ("seq", seq))


TAGS = [0, 1, 2, 3, 4, 5, 21, 24, 25, 28, 29, 30, 32, 35, 36, 37, 42, 52, 54, 100, 256, 258,
        260, 261, 1004, 43000, 55799, 2**32, 2**64 - 1]  # fmt: skip


@pytest.mark.parametrize("tag", TAGS)
def test_every_tag_is_refused_in_any_place(tag):
    tagged = _head(6, tag) + b"\x41\x01"  # tag(h'01'): a bignum 1 for tag 2
    places = [
        _ack(tagged),  # a body value
        SEND_HEADER + _body(("id", b"\x01"), ("xs", b"\x81" + tagged)),  # in a list
        SEND_HEADER + _body(("id", b"\x01"), ("m", _body(("k", tagged)))),  # in a nested map
        _head(6, tag) + SEND_HEADER + _body(("id", b"\x01")),  # around the header
        SEND_HEADER + _head(6, tag) + _body(("id", b"\x01")),  # around the body
    ]
    for data in places:
        with pytest.raises(MalformedFrame, match="tag"):
            decode_frame(data)


def test_a_bignum_is_not_request_id_1():
    """c2 41 01 used to decode as the integer 1 (cbor2 decodes tag 2 itself)."""
    data = SEND_HEADER + _body(("id", bytes.fromhex("c24101")))
    with pytest.raises(MalformedFrame, match="tag 2 "):
        decode_frame(data)
    assert decode_frame(SEND_HEADER + _body(("id", b"\x01"))).body == {"id": 1}


@pytest.mark.parametrize(
    "data",
    [
        # In the body, the header, a nested map, a map inside a list.
        SEND_HEADER + _body(("id", b"\x01"), ("id", b"\x02")),
        _body(("t", _text("#send")), ("op", b"\x01"), ("t", _text("#ack")))
        + _body(("id", b"\x01")),
        SEND_HEADER + _body(("id", b"\x01"), ("m", _body(("a", b"\x01"), ("a", b"\x01")))),
        SEND_HEADER
        + _body(("id", b"\x01"), ("l", b"\x81" + _body(("s", b"\x01"), ("s", b"\x02")))),
        # The same key spelt with a longer length head is still the same key.
        SEND_HEADER + _head(5, 2) + _text("id") + b"\x01" + b"\x78\x02id" + b"\x02",
    ],
)
def test_duplicate_keys_are_refused_at_any_depth(data):
    with pytest.raises(MalformedFrame, match="same key twice"):
        decode_frame(data)


@pytest.mark.parametrize(
    "value",
    [
        bytes.fromhex("5f4101ff"),  # indefinite byte string
        bytes.fromhex("7f6161ff"),  # indefinite text string
        bytes.fromhex("9f01ff"),  # indefinite array
        bytes.fromhex("bf616101ff"),  # indefinite map
        bytes.fromhex("5f ff".replace(" ", "")),  # empty indefinite byte string
    ],
)
def test_indefinite_lengths_are_refused(value):
    with pytest.raises(MalformedFrame, match="indefinite"):
        decode_frame(_ack(value))
    big = SEND_HEADER + _body(
        ("id", b"\x01"), ("pad", _head(2, 20000) + bytes(20000)), ("x", value)
    )
    with pytest.raises(MalformedFrame, match="indefinite"):
        decode_frame(big)  # large frames are scanned first: the same answer


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (b"\xa1\x01\x01", "keys must be text"),  # {1: 1}
        (b"\xa1\x41k\x01", "keys must be text"),  # {h'6b': 1}
        (b"\xa1\x81\x01\x01", "keys must be text"),  # {[1]: 1}
        (b"\xf7", "simple values"),  # undefined
        (b"\xf0", "simple values"),  # simple(16)
        (b"\xf8\xff", "simple values"),  # simple(255)
        (b"\x81\xf7", "simple values"),  # [undefined]
        (b"\x81" * 17 + b"\x01", "nested deeper"),
    ],
)
def test_other_non_dag_cbor_values_are_refused(value, match):
    with pytest.raises(MalformedFrame, match=match):
        decode_frame(_ack(value))


def test_body_and_header_keys_must_be_text():
    with pytest.raises(MalformedFrame, match="keys must be text"):
        decode_frame(SEND_HEADER + b"\xa1\x41k\x01")
    with pytest.raises(MalformedFrame, match="keys must be text"):
        decode_frame(b"\xa3\x61t\x65#send\x62op\x01\x41k\x01" + b"\xa0")


def test_lenient_where_meaning_is_unchanged():
    """Any key order, longer-than-needed integer heads, floats and false/true/null
    decode as a generic CBOR encoder would send them."""
    body = b"\xa5" + _text("seq") + b"\x1a\x00\x00\x00\x2a" + _text("id") + b"\x18\x07"
    body += _text("f") + b"\xfb\x3f\xf8\x00\x00\x00\x00\x00\x00" + _text("n") + b"\xf6"
    body += _text("l") + b"\x83\xf4\xf5\xa1\x61k\x80"
    header = b"\xa2\x62op\x01\x61t\x64#ack"  # op before t
    frame = decode_frame(header + body)
    assert frame.t == "#ack"
    assert frame.body == {"seq": 42, "id": 7, "f": 1.5, "n": None, "l": [False, True, {"k": []}]}


def test_items_are_bounded_in_large_frames():
    many = _head(4, MAX_ITEMS) + b"\x80" * MAX_ITEMS  # a list of 65536 empty lists
    with pytest.raises(MalformedFrame, match="at most"):
        decode_frame(SEND_HEADER + _body(("id", b"\x01"), ("xs", many)))
    # A list of bytes counts items, not bytes: a 300 KiB #send is 5 items.
    fine = SEND_HEADER + _body(("id", b"\x01"), ("ciphertext", _head(2, 300_000) + bytes(300_000)))
    assert len(decode_frame(fine).body["ciphertext"]) == 300_000
    # A list of 60,000 small ints is allowed (big, but under the bound).
    ints = _head(4, 60_000) + b"\x01" * 60_000
    assert (
        len(decode_frame(SEND_HEADER + _body(("id", b"\x01"), ("xs", ints))).body["xs"]) == 60_000
    )


def test_refusals_quote_no_more_than_an_excerpt():
    key = "k" * 100_000
    dup = SEND_HEADER + _body(("id", b"\x01"), (key, b"\x01"), (key, b"\x02"))
    bad_utf8 = SEND_HEADER + _body(("id", b"\x01"), ("t", _head(3, 50_000) + b"\xff" * 50_000))
    truncated = SEND_HEADER + _body(("id", b"\x01"), ("t", _head(3, 50_000) + b"x" * 100))
    for data in (dup, bad_utf8, truncated, SEND_HEADER + b"\x1c", SEND_HEADER + b"\xff"):
        with pytest.raises(MalformedFrame) as info:
            decode_frame(data)
        assert len(info.value.message) <= 100, info.value.message
        assert "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk" not in info.value.message


def test_the_decoder_is_reused_safely_after_failures():
    good = encode_frame("#ack", {"id": 3, "seq": 4})
    for bad in (b"\xa1", SEND_HEADER + bytes.fromhex("c24101"), good + b"\x00", b"\xbf\x61"):
        with pytest.raises(MalformedFrame):
            decode_frame(bad)
        assert decode_frame(good).body == {"id": 3, "seq": 4}


_plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.binary(max_size=40)
    | st.text(max_size=20) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), _plain, max_size=6))
def test_plain_cbor_from_a_generic_encoder_is_accepted(body):
    """Whatever cbor2 emits for plain data (no tags) decodes unchanged."""
    data = cbor2.dumps({"t": "#x", "op": 1}) + cbor2.dumps(body)
    assert decode_frame(data).body == body
