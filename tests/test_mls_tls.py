"""RFC 9420 §2.1 presentation language: varints, opaque, vectors, optional."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import MLSDecodeError, MLSUnsupportedError, MLSValidationError, RelayError
from protocol.mls.structs import ContentType
from protocol.mls.tls import VARINT_MAX, Reader, Writer, decode_exact, encode_varint
from tests.vectorfiles import vector_path

DESERIALIZATION = "mlswg/deserialization.json"


def _deserialization_cases() -> list[dict[str, object]]:
    cases: list[dict[str, object]] = json.loads(vector_path(DESERIALIZATION).read_text())
    return cases


def test_deserialization_vectors_decode_and_reencode() -> None:
    cases = _deserialization_cases()
    assert len(cases) == 14
    for case in cases:
        header = bytes.fromhex(str(case["vlbytes_header"]))
        reader = Reader(header)
        assert reader.varint("length") == case["length"]
        assert reader.at_end()
        assert encode_varint(int(str(case["length"]))) == header


def test_deserialization_vectors_as_opaque_headers() -> None:
    # The header announces a length; the reader must refuse it until the bytes exist.
    for case in _deserialization_cases():
        header = bytes.fromhex(str(case["vlbytes_header"]))
        length = int(str(case["length"]))
        if length <= 4096:
            payload = bytes(range(256)) * (length // 256 + 1)
            assert Reader(header + payload[:length]).opaque("x") == payload[:length]
        if length:
            with pytest.raises(MLSDecodeError, match="truncated"):
                Reader(header + b"\x00" * (min(length, 64) - 1)).opaque("x")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ("c0", "0b11"),  # 8-byte form of QUIC: not allowed in MLS
        ("ff", "0b11"),
        ("c000000000000000", "0b11"),
        ("4001", "non-minimal"),
        ("403f", "non-minimal"),
        ("4000", "non-minimal"),
        ("80000001", "non-minimal"),
        ("80003fff", "non-minimal"),
        ("80000000", "non-minimal"),
        ("", "truncated"),
        ("40", "truncated"),
        ("80", "truncated"),
        ("800040", "truncated"),
    ],
)
def test_invalid_varints(data: str, reason: str) -> None:
    with pytest.raises(MLSDecodeError, match=reason) as info:
        Reader(bytes.fromhex(data)).varint("length")
    assert info.value.details["offset"] == 0
    assert info.value.error == "MalformedMLS"


@given(st.integers(min_value=0, max_value=VARINT_MAX))
def test_varint_roundtrip(value: int) -> None:
    encoded = encode_varint(value)
    reader = Reader(encoded + b"\xaa")
    assert reader.varint("v") == value
    assert reader.remaining == 1


@pytest.mark.parametrize("value", [-1, VARINT_MAX + 1, 2**62])
def test_varint_encode_out_of_range(value: int) -> None:
    with pytest.raises(MLSValidationError):
        encode_varint(value)


def test_huge_declared_length_fails_fast_without_allocating() -> None:
    # 2**30-1 declared, 3 bytes present: must fail on the comparison, not on a slice.
    reader = Reader(bytes.fromhex("bfffffff") + b"abc")
    with pytest.raises(MLSDecodeError, match="needs 1073741823 bytes, 3 left"):
        reader.opaque("payload")
    with pytest.raises(MLSDecodeError, match="truncated"):
        Reader(bytes.fromhex("bfffffff")).vector("items", lambda r: r.uint8("x"))


def test_fixed_width_integers_and_truncation() -> None:
    reader = Reader(bytes.fromhex("0102030405060708090a0b0c0d0e0fff"))
    assert reader.uint8("a") == 1
    assert reader.uint16("b") == 0x0203
    assert reader.uint32("c") == 0x04050607
    assert reader.uint64("d") == 0x08090A0B0C0D0E0F
    with pytest.raises(MLSDecodeError, match="offset 15"):
        reader.uint16("e")


def test_vector_must_be_consumed_exactly() -> None:
    # vector of uint16 with an odd byte length: the last item overruns the block
    with pytest.raises(MLSDecodeError) as info:
        Reader(bytes.fromhex("03000100")).vector("items", lambda r: r.uint16("item"))
    assert "items[1]" in str(info.value.details["field"])
    assert Reader(bytes.fromhex("0400010002")).vector("v", lambda r: r.uint16("i")) == (1, 2)


def test_zero_width_vector_items_are_rejected_not_looped() -> None:
    with pytest.raises(MLSDecodeError, match="consumed no bytes"):
        Reader(bytes.fromhex("0100")).vector("v", lambda r: None)


def test_optional_presence_byte() -> None:
    assert Reader(b"\x00").optional("o", lambda r: r.uint8("x")) is None
    assert Reader(b"\x01\x07").optional("o", lambda r: r.uint8("x")) == 7
    with pytest.raises(MLSDecodeError, match="presence byte"):
        Reader(b"\x02\x07").optional("o", lambda r: r.uint8("x"))


def test_enum_reserved_and_unknown_values() -> None:
    assert Reader(b"\x03").enum(ContentType, 1, "content_type") is ContentType.COMMIT
    with pytest.raises(MLSDecodeError, match="reserved") as reserved:
        Reader(b"\x00").enum(ContentType, 1, "content_type")
    assert not isinstance(reserved.value, MLSUnsupportedError)
    with pytest.raises(MLSUnsupportedError, match="unknown content_type 9"):
        Reader(b"\x09").enum(ContentType, 1, "content_type")


def test_decode_exact_rejects_trailing_bytes() -> None:
    assert decode_exact(b"\x02ab", lambda r: r.opaque("x"), "thing") == b"ab"
    with pytest.raises(MLSDecodeError, match="1 trailing bytes") as info:
        decode_exact(b"\x02abc", lambda r: r.opaque("x"), "thing")
    assert info.value.details == {"field": "thing", "offset": 3}


def test_error_paths_name_nested_fields() -> None:
    def read(r: Reader) -> object:
        with r.scope("outer"):
            return r.vector("items", lambda sub: sub.opaque("blob"))

    with pytest.raises(MLSDecodeError) as info:
        read(Reader(bytes.fromhex("0301aa05")))
    assert info.value.details["field"] == "outer.items[1].blob"
    assert info.value.details["offset"] == 4
    assert isinstance(info.value, RelayError)


def test_writer_matches_reader() -> None:
    w = Writer()
    w.uint8(1)
    w.uint16(2)
    w.uint32(3)
    w.uint64(4)
    w.opaque(b"x" * 70)
    w.vector([1, 2, 3], Writer.uint16)
    w.optional(None, Writer.uint8)
    w.optional(9, Writer.uint8)
    r = Reader(w.getvalue())
    assert (r.uint8("a"), r.uint16("b"), r.uint32("c"), r.uint64("d")) == (1, 2, 3, 4)
    assert r.opaque("e") == b"x" * 70
    assert r.vector("f", lambda sub: sub.uint16("i")) == (1, 2, 3)
    assert r.optional("g", lambda sub: sub.uint8("i")) is None
    assert r.optional("h", lambda sub: sub.uint8("i")) == 9
    r.finish()
    with pytest.raises(MLSValidationError):
        Writer().uint8(256)


def test_reader_accepts_bytearray_and_memoryview_windows() -> None:
    data = bytearray(b"\x00\x02hi")
    assert Reader(memoryview(data)[1:]).opaque("x") == b"hi"
