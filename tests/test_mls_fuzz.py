"""Hostile input: truncated, extended, bit-flipped and random bytes.

The parsers must return a valid parse or raise a RelayError subclass -- never
IndexError/struct.error/ValueError, never hang -- and anything they accept must
re-encode to the same bytes (readers accept only canonical encodings).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from functools import cache
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import (
    MLSDecodeError,
    MLSUnsupportedCipherSuite,
    MLSValidationError,
    RelayError,
)
from protocol.mls import (
    KeyPackage,
    encode_key_package,
    encode_mls_message,
    key_package_ref,
    parse_key_package,
    parse_mls_message,
    validate_key_package,
    verify_key_package,
)
from protocol.mls import content as c
from protocol.mls import group as g
from protocol.mls.crypto import suite_info
from protocol.mls.tls import decode_exact, encode_with
from tests.vectorfiles import vector_path

FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def roundtrip_message(data: bytes) -> None:
    assert encode_mls_message(parse_mls_message(data)) == data


def roundtrip_key_package(data: bytes) -> None:
    kp = parse_key_package(data, bare=True)
    assert encode_key_package(kp) == data
    exercise_crypto(kp)


def roundtrip_commit(data: bytes) -> None:
    assert encode_with(c.write_commit, decode_exact(data, c.read_commit, "commit")) == data


def roundtrip_tree(data: bytes) -> None:
    tree = decode_exact(data, g.read_ratchet_tree, "ratchet_tree")
    assert encode_with(g.write_ratchet_tree, tree) == data


#: The fields validate_key_package checks up to and including the signatures.
CHECKED_BEFORE_LIFETIME = frozenset(
    {
        "key_package.version",
        "key_package.leaf_node.leaf_node_source",
        "key_package.init_key",
        "key_package.signature",
    }
)


def exercise_crypto(kp: KeyPackage) -> None:
    """Whatever parses must also go through the checks, and they must agree.

    A suite without an implementation is refused by each check with
    MLSUnsupportedCipherSuite; otherwise the ref is one hash of the suite's
    size, verification answers a plain bool, and validation refuses exactly
    when the signatures do not verify (or for another, named field)."""
    checks: tuple[Callable[[KeyPackage], object], ...] = (
        key_package_ref,
        verify_key_package,
        lambda kp: validate_key_package(kp, now=0),
    )
    try:
        info = suite_info(kp.cipher_suite)
    except MLSUnsupportedCipherSuite:
        for check_one in checks:
            with pytest.raises(MLSUnsupportedCipherSuite):
                check_one(kp)
        return
    assert len(key_package_ref(kp)) == info.hash.digest_size
    verified = verify_key_package(kp)
    assert type(verified) is bool
    if not verified:
        with pytest.raises(MLSValidationError) as refused:
            validate_key_package(kp, now=0)
        # Refused by the signature check, or by a structural check made before it.
        assert refused.value.details.get("field") in CHECKED_BEFORE_LIFETIME, refused.value
        return
    try:
        validate_key_package(kp, now=0)
    except MLSValidationError as exc:  # verified, so refused for something else
        assert exc.details.get("field") != "key_package.signature", exc


Target = tuple[str, Callable[[bytes], None], bytes]


@cache
def corpus() -> tuple[Target, ...]:
    messages: list[dict[str, Any]] = json.loads(
        vector_path("mlswg-subsets/messages.30-entries.json").read_text()
    )
    welcome: list[dict[str, Any]] = json.loads(vector_path("mlswg/welcome.json").read_text())
    targets: list[Target] = []
    for entry in messages[:: len(messages) // 3]:  # one entry per suite 1, 2, 3
        for key in (
            "mls_welcome",
            "mls_group_info",
            "public_message_proposal",
            "public_message_commit",
            "private_message",
        ):
            targets.append((key, roundtrip_message, bytes.fromhex(entry[key])))
        targets.append(("commit", roundtrip_commit, bytes.fromhex(entry["commit"])))
        targets.append(("ratchet_tree", roundtrip_tree, bytes.fromhex(entry["ratchet_tree"])))
    for entry in welcome:  # real, correctly signed KeyPackages for suites 1..7
        kp_bytes = bytes.fromhex(entry["key_package"])
        targets.append(("key_package", roundtrip_message, kp_bytes))
        targets.append(("bare_key_package", roundtrip_key_package, kp_bytes[4:]))
    return tuple(targets)


def check(target: Callable[[bytes], object], data: bytes) -> None:
    start = time.monotonic()
    with contextlib.suppress(RelayError):
        target(data)
    assert time.monotonic() - start < 1.0


target_index = st.integers(min_value=0, max_value=10_000)


def pick(index: int) -> Target:
    items = corpus()
    return items[index % len(items)]


def test_corpus_is_valid() -> None:
    signed = 0
    for _name, target, data in corpus():
        target(data)
        if target is roundtrip_key_package:
            assert verify_key_package(parse_key_package(data, bare=True)) is True
            signed += 1
    assert signed == 7  # one correctly signed KeyPackage per suite 1..7


@FUZZ
@given(target_index, st.integers(min_value=0))
def test_truncated_input_is_rejected(index: int, cut: int) -> None:
    _name, target, data = pick(index)
    prefix = data[: cut % len(data)]
    # MLS encodings are prefix-free: no proper prefix of a valid object parses.
    with pytest.raises(MLSDecodeError):
        target(prefix)


@FUZZ
@given(target_index, st.binary(min_size=1, max_size=64))
def test_trailing_bytes_are_rejected(index: int, extra: bytes) -> None:
    _name, target, data = pick(index)
    with pytest.raises(MLSDecodeError, match="trailing"):
        target(data + extra)


@FUZZ
@given(target_index, st.lists(st.integers(min_value=0), min_size=1, max_size=8))
def test_bit_flips_parse_or_raise_typed(index: int, positions: list[int]) -> None:
    _name, target, data = pick(index)
    mutated = bytearray(data)
    for pos in positions:
        bit = pos % (len(data) * 8)
        mutated[bit // 8] ^= 1 << (bit % 8)
    check(target, bytes(mutated))


@FUZZ
@given(target_index, st.integers(min_value=0), st.binary(max_size=16))
def test_splices_parse_or_raise_typed(index: int, at: int, junk: bytes) -> None:
    _name, target, data = pick(index)
    at %= len(data)
    check(target, data[:at] + junk + data[at + len(junk) // 2 :])


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data: bytes) -> None:
    check(parse_mls_message, data)
    check(roundtrip_key_package, data)
    check(roundtrip_commit, data)
    check(roundtrip_tree, data)


@FUZZ
@given(
    st.sampled_from(
        [
            b"\x00\x01\x00\x01",
            b"\x00\x01\x00\x02",
            b"\x00\x01\x00\x03",
            b"\x00\x01\x00\x04",
            b"\x00\x01\x00\x05",
            b"",
        ]
    ),
    st.binary(max_size=256),
)
def test_random_bodies_after_valid_headers(header: bytes, body: bytes) -> None:
    check(parse_mls_message, header + body)
    check(roundtrip_key_package, header + body)


def test_flipped_key_package_signatures_never_verify() -> None:
    """Flip each byte of a correctly signed KeyPackage: parse, then never verify."""
    for _name, target, data in corpus():
        if target is not roundtrip_key_package:
            continue
        verified = parsed = 0
        for pos in range(len(data)):
            mutated = bytearray(data)
            mutated[pos] ^= 0x01
            try:
                kp = parse_key_package(bytes(mutated))
                parsed += 1
                verified += verify_key_package(kp)
            except (MLSDecodeError, MLSUnsupportedCipherSuite):
                continue
        assert verified == 0
        assert parsed > len(data) // 2  # most flips land in keys and signatures, and parse
