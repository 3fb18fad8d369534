"""KeyPackage validation: correctly signed but invalid KeyPackages are refused.

The passive-client vectors give ``signature_priv`` for each KeyPackage's
signature_key, so a modified KeyPackage can be re-signed and must then fail on
the check it breaks, not on its signature.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from protocol.errors import MLSUnsupportedCipherSuite, MLSValidationError
from protocol.mls import (
    Extension,
    KeyPackage,
    KeyPackagePolicy,
    LeafNodeSource,
    Lifetime,
    encode_key_package,
    parse_key_package,
    sign_with_label,
    validate_key_package,
    verify_key_package,
    verify_leaf_node,
)
from protocol.mls.leaf import write_key_package_fields, write_leaf_node_fields
from protocol.mls.tls import encode_with
from tests.vectorfiles import vector_path

PASSIVE = "mlswg-subsets/passive-client-welcome.cs1-3.json"


def entries_by_suite() -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for entry in json.loads(vector_path(PASSIVE).read_text()):
        out.setdefault(entry["cipher_suite"], entry)
    return out


@pytest.fixture(params=[1, 2, 3])
def signed(request: pytest.FixtureRequest) -> tuple[KeyPackage, bytes]:
    entry = entries_by_suite()[request.param]
    kp = parse_key_package(bytes.fromhex(entry["key_package"]), bare=False)
    return kp, bytes.fromhex(entry["signature_priv"])


def resign(kp: KeyPackage, priv: bytes, leaf: dict[str, Any], **fields: Any) -> KeyPackage:
    """Apply changes, sign LeafNode and KeyPackage again, and re-parse the bytes."""
    suite = fields.get("cipher_suite", kp.cipher_suite)
    node = dataclasses.replace(kp.leaf_node, **leaf)
    leaf_tbs = encode_with(write_leaf_node_fields, node)
    node = dataclasses.replace(
        node, signature=sign_with_label(suite, priv, "LeafNodeTBS", leaf_tbs)
    )
    new = dataclasses.replace(kp, leaf_node=node, **fields)
    kp_tbs = encode_with(write_key_package_fields, new)
    new = dataclasses.replace(new, signature=sign_with_label(suite, priv, "KeyPackageTBS", kp_tbs))
    return parse_key_package(encode_key_package(new))


def test_vector_key_packages_validate(signed: tuple[KeyPackage, bytes]) -> None:
    kp, _priv = signed
    lifetime = kp.leaf_node.lifetime
    assert lifetime is not None
    warnings = validate_key_package(kp, now=lifetime.not_before)
    assert isinstance(warnings, list) and all(isinstance(w, str) for w in warnings)
    # Some of these vectors expired in 2023-2024: only a clock that says so rejects them.
    if lifetime.not_after < 2**64 - 1:
        with pytest.raises(MLSValidationError, match="expired"):
            validate_key_package(kp, now=lifetime.not_after + 1)


def test_resigning_unchanged_still_verifies(signed: tuple[KeyPackage, bytes]) -> None:
    kp, priv = signed
    again = resign(kp, priv, {})
    assert verify_key_package(again)
    assert again.leaf_node.tbs_prefix == kp.leaf_node.tbs_prefix


def test_lifetime_policy(signed: tuple[KeyPackage, bytes]) -> None:
    kp, priv = signed
    short = resign(kp, priv, {"lifetime": Lifetime(1000, 2000)})
    assert verify_key_package(short)
    validate_key_package(short, now=1500)
    validate_key_package(short)  # no clock given: lifetime not checked
    with pytest.raises(MLSValidationError, match="not valid before"):
        validate_key_package(short, now=999)
    with pytest.raises(MLSValidationError, match="expired"):
        validate_key_package(short, now=2001)
    validate_key_package(short, now=2005, policy=KeyPackagePolicy(clock_skew=10))
    validate_key_package(short, now=9999, policy=KeyPackagePolicy(check_lifetime=False))
    with pytest.raises(MLSValidationError, match="longer"):
        validate_key_package(short, now=1500, policy=KeyPackagePolicy(max_lifetime=500))


def test_init_key_must_differ(signed: tuple[KeyPackage, bytes]) -> None:
    kp, priv = signed
    bad = resign(kp, priv, {}, init_key=kp.leaf_node.encryption_key)
    assert verify_key_package(bad)
    with pytest.raises(MLSValidationError) as info:
        validate_key_package(bad)
    assert info.value.details["field"] == "key_package.init_key"


def test_version_must_be_mls10(signed: tuple[KeyPackage, bytes]) -> None:
    kp, priv = signed
    bad = resign(kp, priv, {}, version=2)
    assert verify_key_package(bad)
    with pytest.raises(MLSValidationError, match="version"):
        validate_key_package(bad)


def test_leaf_source_must_be_key_package(signed: tuple[KeyPackage, bytes]) -> None:
    kp, priv = signed
    bad = resign(kp, priv, {"leaf_node_source": LeafNodeSource.UPDATE, "lifetime": None})
    assert bad.leaf_node.lifetime is None
    assert not verify_key_package(bad)
    with pytest.raises(MLSValidationError, match="key_package"):
        validate_key_package(bad)
    # update-source LeafNodes sign group_id and leaf_index as well
    with pytest.raises(MLSValidationError, match="group_id"):
        verify_leaf_node(bad.leaf_node, bad.cipher_suite)


def test_unsupported_suite(signed: tuple[KeyPackage, bytes]) -> None:
    kp, _priv = signed
    odd = parse_key_package(encode_key_package(dataclasses.replace(kp, cipher_suite=0x0A0A)))
    with pytest.raises(MLSUnsupportedCipherSuite):
        verify_key_package(odd)
    with pytest.raises(MLSUnsupportedCipherSuite):
        validate_key_package(odd)


def test_bad_signature_rejected(signed: tuple[KeyPackage, bytes]) -> None:
    kp, _priv = signed
    changed = dataclasses.replace(kp, extensions=(*kp.extensions,)[:-1] if kp.extensions else ())
    tampered = parse_key_package(encode_key_package(dataclasses.replace(changed, init_key=b"x")))
    assert not verify_key_package(tampered)
    with pytest.raises(MLSValidationError, match="signature"):
        validate_key_package(tampered)


def test_grease_only_warns(signed: tuple[KeyPackage, bytes]) -> None:
    kp, priv = signed
    greased = resign(kp, priv, {}, extensions=(*kp.extensions, Extension(0x0A0A, b"")))
    warnings = validate_key_package(greased)
    assert any("0x0a0a" in w for w in warnings)
