"""LeafNode (RFC 9420 §7.2) and KeyPackage (§10).

Both are signed over "everything before the signature" (plus, for LeafNodes
from updates/commits, the group id and leaf index), so the parsers keep the
exact input spans: ``raw`` for the whole structure and the to-be-signed prefix.
Signatures are checked in :mod:`protocol.mls.crypto` over those spans, never
over a re-encoding, so a parser/encoder mismatch cannot make a bad signature
verify.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.errors import MLSValidationError
from protocol.mls.structs import (
    Capabilities,
    Credential,
    Extension,
    LeafNodeSource,
    Lifetime,
    read_capabilities,
    read_credential,
    read_extensions,
    read_lifetime,
    write_capabilities,
    write_credential,
    write_extensions,
    write_lifetime,
)
from protocol.mls.tls import Reader, Writer, encode_with


@dataclass(frozen=True, slots=True)
class LeafNode:
    encryption_key: bytes
    signature_key: bytes
    credential: Credential
    capabilities: Capabilities
    leaf_node_source: LeafNodeSource
    #: Only for ``leaf_node_source == KEY_PACKAGE``.
    lifetime: Lifetime | None
    #: Only for ``leaf_node_source == COMMIT``.
    parent_hash: bytes | None
    extensions: tuple[Extension, ...]
    signature: bytes
    #: Exact input bytes of the whole LeafNode.
    raw: bytes = field(default=b"", repr=False, compare=False)
    #: Exact input bytes before ``signature``: the LeafNodeTBS for key_package leaves.
    tbs_prefix: bytes = field(default=b"", repr=False, compare=False)

    def tbs(self, group_id: bytes | None = None, leaf_index: int | None = None) -> bytes:
        """LeafNodeTBS (§7.2): update/commit leaves also sign group_id and leaf_index."""
        if self.leaf_node_source is LeafNodeSource.KEY_PACKAGE:
            return self.tbs_prefix
        if group_id is None or leaf_index is None:
            raise MLSValidationError(
                f"{self.leaf_node_source.name} LeafNode TBS needs group_id and leaf_index",
                field="leaf_node_source",
            )
        w = Writer()
        w.raw(self.tbs_prefix)
        w.opaque(group_id)
        w.uint32(leaf_index)
        return w.getvalue()


def read_leaf_node(r: Reader) -> LeafNode:
    start = r.pos
    encryption_key = r.opaque("encryption_key")
    signature_key = r.opaque("signature_key")
    with r.scope("credential"):
        credential = read_credential(r)
    with r.scope("capabilities"):
        capabilities = read_capabilities(r)
    source = r.enum(LeafNodeSource, 1, "leaf_node_source")
    lifetime = parent_hash = None
    if source is LeafNodeSource.KEY_PACKAGE:
        with r.scope("lifetime"):
            lifetime = read_lifetime(r)
    elif source is LeafNodeSource.COMMIT:
        parent_hash = r.opaque("parent_hash")
    extensions = read_extensions(r)
    tbs_prefix = r.span(start)
    signature = r.opaque("signature")
    return LeafNode(
        encryption_key=encryption_key,
        signature_key=signature_key,
        credential=credential,
        capabilities=capabilities,
        leaf_node_source=source,
        lifetime=lifetime,
        parent_hash=parent_hash,
        extensions=extensions,
        signature=signature,
        raw=r.span(start),
        tbs_prefix=tbs_prefix,
    )


def write_leaf_node_fields(w: Writer, leaf: LeafNode) -> None:
    """Everything but the signature (the key_package-source LeafNodeTBS)."""
    w.opaque(leaf.encryption_key)
    w.opaque(leaf.signature_key)
    write_credential(w, leaf.credential)
    write_capabilities(w, leaf.capabilities)
    w.uint8(leaf.leaf_node_source)
    if leaf.leaf_node_source is LeafNodeSource.KEY_PACKAGE:
        write_lifetime(w, leaf.lifetime or Lifetime(0, 0))
    elif leaf.leaf_node_source is LeafNodeSource.COMMIT:
        w.opaque(leaf.parent_hash or b"")
    write_extensions(w, leaf.extensions)


def write_leaf_node(w: Writer, leaf: LeafNode) -> None:
    write_leaf_node_fields(w, leaf)
    w.opaque(leaf.signature)


@dataclass(frozen=True, slots=True)
class KeyPackage:
    version: int
    cipher_suite: int
    init_key: bytes
    leaf_node: LeafNode
    extensions: tuple[Extension, ...]
    signature: bytes
    #: Exact KeyPackage bytes without any MLSMessage header: the KeyPackageRef input.
    raw: bytes = field(default=b"", repr=False, compare=False)
    #: Exact bytes before ``signature``: the KeyPackageTBS.
    tbs: bytes = field(default=b"", repr=False, compare=False)


def read_key_package(r: Reader) -> KeyPackage:
    start = r.pos
    version = r.uint16("version")
    cipher_suite = r.uint16("cipher_suite")
    init_key = r.opaque("init_key")
    with r.scope("leaf_node"):
        leaf_node = read_leaf_node(r)
    extensions = read_extensions(r)
    tbs = r.span(start)
    signature = r.opaque("signature")
    return KeyPackage(
        version=version,
        cipher_suite=cipher_suite,
        init_key=init_key,
        leaf_node=leaf_node,
        extensions=extensions,
        signature=signature,
        raw=r.span(start),
        tbs=tbs,
    )


def write_key_package_fields(w: Writer, kp: KeyPackage) -> None:
    """KeyPackageTBS: everything but the signature."""
    w.uint16(kp.version)
    w.uint16(kp.cipher_suite)
    w.opaque(kp.init_key)
    write_leaf_node(w, kp.leaf_node)
    write_extensions(w, kp.extensions)


def write_key_package(w: Writer, kp: KeyPackage) -> None:
    write_key_package_fields(w, kp)
    w.opaque(kp.signature)


def encode_key_package(kp: KeyPackage) -> bytes:
    """Canonical bare KeyPackage encoding (no MLSMessage header)."""
    return encode_with(write_key_package, kp)


def encode_leaf_node(leaf: LeafNode) -> bytes:
    return encode_with(write_leaf_node, leaf)
