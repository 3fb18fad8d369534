"""KeyPackage checks a delivery service can make (RFC 9420 §10.1), with a policy.

Real KeyPackages bend strict readings of the RFC (GREASE extensions missing
from capabilities, a suite not listing itself, default types listed), so those
are returned as warnings for the caller to log, never rejected.  Lifetime is
only checked against a caller-supplied ``now``: protocol/ reads no clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.errors import MLSValidationError
from protocol.mls.crypto import suite_info, verify_key_package
from protocol.mls.framing import PublicMessage
from protocol.mls.leaf import KeyPackage
from protocol.mls.messages import MLSMessage
from protocol.mls.structs import MLS10, ContentType, LeafNodeSource

# Extension types 1..5 are the RFC 9420 defaults; they need not be in capabilities.
_DEFAULT_EXTENSIONS = frozenset(range(1, 6))


@dataclass(frozen=True, slots=True)
class KeyPackagePolicy:
    #: Reject when ``now`` is outside [not_before, not_after].
    check_lifetime: bool = True
    #: Seconds of clock skew tolerated at both ends of the lifetime.
    clock_skew: int = 0
    #: Reject lifetimes longer than this many seconds (None: any, e.g. 0 .. 2**64-1).
    max_lifetime: int | None = None


def _invalid(field: str, message: str) -> MLSValidationError:
    return MLSValidationError(message, field=field)


def _check_lifetime(kp: KeyPackage, now: int, policy: KeyPackagePolicy) -> None:
    lifetime = kp.leaf_node.lifetime
    assert lifetime is not None  # key_package leaves always carry one
    field = "key_package.leaf_node.lifetime"
    span = lifetime.not_after - lifetime.not_before
    if policy.max_lifetime is not None and span > policy.max_lifetime:
        raise _invalid(field, "lifetime longer than policy allows")
    if now + policy.clock_skew < lifetime.not_before:
        raise _invalid(field, f"not valid before {lifetime.not_before} (now {now})")
    if now - policy.clock_skew > lifetime.not_after:
        raise _invalid(field, f"expired at {lifetime.not_after} (now {now})")


def _capability_warnings(kp: KeyPackage) -> list[str]:
    leaf = kp.leaf_node
    caps = leaf.capabilities
    warnings = []
    if kp.cipher_suite not in caps.cipher_suites:
        warnings.append(f"cipher suite {kp.cipher_suite} not listed in capabilities")
    if leaf.credential.credential_type not in caps.credentials:
        warnings.append(f"credential type {leaf.credential.credential_type} not in capabilities")
    known = _DEFAULT_EXTENSIONS.union(caps.extensions)
    for ext in (*leaf.extensions, *kp.extensions):
        if ext.extension_type not in known:
            warnings.append(f"extension {ext.extension_type:#06x} not listed in capabilities")
    return warnings


def validate_key_package(
    kp: KeyPackage, *, now: int | None = None, policy: KeyPackagePolicy | None = None
) -> list[str]:
    """Raise MLSValidationError for a KeyPackage the relay must refuse.

    Checks version, supported suite, leaf_node_source, init_key != encryption_key,
    both signatures and (when ``now`` is given and the policy says so) the
    lifetime.  Returns non-fatal warnings (capability mismatches) to log.
    """
    policy = policy or KeyPackagePolicy()
    if kp.version != MLS10:
        raise _invalid("key_package.version", f"unsupported version {kp.version}")
    suite_info(kp.cipher_suite)  # raises MLSUnsupportedCipherSuite
    if kp.leaf_node.leaf_node_source is not LeafNodeSource.KEY_PACKAGE:
        raise _invalid("key_package.leaf_node.leaf_node_source", "must be key_package")
    if kp.init_key == kp.leaf_node.encryption_key:
        raise _invalid("key_package.init_key", "init_key equals leaf encryption_key")
    if not verify_key_package(kp):
        raise _invalid("key_package.signature", "KeyPackage or LeafNode signature invalid")
    if now is not None and policy.check_lifetime:
        _check_lifetime(kp, now, policy)
    return _capability_warnings(kp)


def validate_handshake_framing(msg: MLSMessage) -> None:
    """RFC 9420 §6: application data must never travel in a PublicMessage.

    The syntax allows it (the test vectors contain one), so the parser accepts
    it and a delivery service refuses it here.
    """
    body = msg.body
    if isinstance(body, PublicMessage) and body.content_type is ContentType.APPLICATION:
        raise _invalid(
            "mls_message.public_message.content.content_type",
            "application data must be sent as a PrivateMessage",
        )
