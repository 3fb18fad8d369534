"""Hashes, references and signatures (RFC 9420 §5) for cipher suites 1..7.

Suites (§17.1): hash and signature scheme by code point.

    1  X25519 / AES128GCM        / SHA256 / Ed25519
    2  P256   / AES128GCM        / SHA256 / P256 (ECDSA)
    3  X25519 / ChaCha20Poly1305 / SHA256 / Ed25519
    4  X448   / AES256GCM        / SHA512 / Ed448
    5  P521   / AES256GCM        / SHA512 / P521 (ECDSA)
    6  X448   / ChaCha20Poly1305 / SHA512 / Ed448
    7  P384   / AES256GCM        / SHA384 / P384 (ECDSA)

Other suites raise :class:`~protocol.errors.MLSUnsupportedCipherSuite`.
Verification returns ``False`` for any bad signature *or* unusable public key:
a key is attacker-controlled input, not a programming error.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519

from protocol.errors import MLSUnsupportedCipherSuite
from protocol.mls.leaf import KeyPackage, LeafNode
from protocol.mls.structs import LeafNodeSource
from protocol.mls.tls import Buffer, Writer

KEY_PACKAGE_REF_LABEL = b"MLS 1.0 KeyPackage Reference"
PROPOSAL_REF_LABEL = b"MLS 1.0 Proposal Reference"
_LABEL_PREFIX = b"MLS 1.0 "


@dataclass(frozen=True, slots=True)
class SuiteInfo:
    suite: int
    hash: type[hashes.HashAlgorithm]
    #: "ed25519", "ed448" or "ecdsa"
    signature: str
    curve: type[ec.EllipticCurve] | None = None


SUITES: dict[int, SuiteInfo] = {
    1: SuiteInfo(1, hashes.SHA256, "ed25519"),
    2: SuiteInfo(2, hashes.SHA256, "ecdsa", ec.SECP256R1),
    3: SuiteInfo(3, hashes.SHA256, "ed25519"),
    4: SuiteInfo(4, hashes.SHA512, "ed448"),
    5: SuiteInfo(5, hashes.SHA512, "ecdsa", ec.SECP521R1),
    6: SuiteInfo(6, hashes.SHA512, "ed448"),
    7: SuiteInfo(7, hashes.SHA384, "ecdsa", ec.SECP384R1),
}


def suite_info(cipher_suite: int) -> SuiteInfo:
    try:
        return SUITES[cipher_suite]
    except KeyError:
        raise MLSUnsupportedCipherSuite(
            f"cipher suite {cipher_suite} is not supported", field="cipher_suite"
        ) from None


def hash_bytes(cipher_suite: int, data: Buffer) -> bytes:
    digest = hashes.Hash(suite_info(cipher_suite).hash())
    digest.update(bytes(data))
    return digest.finalize()


def ref_hash(cipher_suite: int, label: bytes, value: Buffer) -> bytes:
    """RefHash (§5.2): Hash(struct { opaque label<V>; opaque value<V>; })."""
    w = Writer()
    w.opaque(label)
    w.opaque(value)
    return hash_bytes(cipher_suite, w.getvalue())


def key_package_ref(kp: KeyPackage) -> bytes:
    """KeyPackageRef over the exact bare KeyPackage bytes (no MLSMessage header)."""
    return ref_hash(kp.cipher_suite, KEY_PACKAGE_REF_LABEL, kp.raw)


def sign_content(label: str, content: Buffer) -> bytes:
    """SignContent (§5.1.2): opaque label<V> = "MLS 1.0 " + label; opaque content<V>."""
    w = Writer()
    w.opaque(_LABEL_PREFIX + label.encode())
    w.opaque(content)
    return w.getvalue()


def verify_with_label(
    cipher_suite: int, public_key: bytes, label: str, content: Buffer, signature: bytes
) -> bool:
    """VerifyWithLabel; ``False`` for a wrong signature or an unusable key."""
    info = suite_info(cipher_suite)
    message = sign_content(label, content)
    try:
        if info.signature == "ed25519":
            ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        elif info.signature == "ed448":
            ed448.Ed448PublicKey.from_public_bytes(public_key).verify(signature, message)
        else:
            assert info.curve is not None
            key = ec.EllipticCurvePublicKey.from_encoded_point(info.curve(), public_key)
            key.verify(signature, message, ec.ECDSA(info.hash()))
    except (InvalidSignature, ValueError, TypeError):
        # ValueError/TypeError: malformed key bytes (wrong length, point not on curve).
        return False
    return True


def sign_with_label(cipher_suite: int, private_key: bytes, label: str, content: Buffer) -> bytes:
    """SignWithLabel with a raw private key (Ed* seed, or ECDSA big-endian scalar).

    Used by tests to re-sign modified objects; the relay itself never signs.
    """
    info = suite_info(cipher_suite)
    message = sign_content(label, content)
    if info.signature == "ed25519":
        return ed25519.Ed25519PrivateKey.from_private_bytes(private_key).sign(message)
    if info.signature == "ed448":
        return ed448.Ed448PrivateKey.from_private_bytes(private_key).sign(message)
    assert info.curve is not None
    key = ec.derive_private_key(int.from_bytes(private_key, "big"), info.curve())
    return key.sign(message, ec.ECDSA(info.hash()))


def verify_leaf_node(
    leaf: LeafNode,
    cipher_suite: int,
    group_id: bytes | None = None,
    leaf_index: int | None = None,
) -> bool:
    """LeafNode signature ("LeafNodeTBS") under its own signature_key.

    update/commit leaves sign group_id and leaf_index too, so those are required
    for them (:class:`~protocol.errors.MLSValidationError` otherwise).
    """
    tbs = leaf.tbs(group_id, leaf_index)
    return verify_with_label(cipher_suite, leaf.signature_key, "LeafNodeTBS", tbs, leaf.signature)


def verify_key_package(kp: KeyPackage) -> bool:
    """Both signatures of a KeyPackage: its own ("KeyPackageTBS") and its LeafNode's.

    Both are made with ``leaf_node.signature_key``.  Raises
    MLSUnsupportedCipherSuite for suites outside 1..7.  A LeafNode whose source
    is not key_package is never valid inside a KeyPackage: ``False``.
    """
    if kp.leaf_node.leaf_node_source is not LeafNodeSource.KEY_PACKAGE:
        return False
    key = kp.leaf_node.signature_key
    suite = kp.cipher_suite
    if not verify_with_label(suite, key, "KeyPackageTBS", kp.tbs, kp.signature):
        return False
    return verify_leaf_node(kp.leaf_node, suite)
