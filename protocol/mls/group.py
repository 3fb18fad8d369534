"""GroupContext, GroupInfo, Welcome (RFC 9420 §8.1, §12.4.3) and the
structures the MLS test vectors serialise next to them: GroupSecrets and the
ratchet tree (§12.4.3.3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.mls.content import PreSharedKeyID, read_psk_id, write_psk_id
from protocol.mls.leaf import LeafNode, read_leaf_node, write_leaf_node
from protocol.mls.structs import (
    Extension,
    HPKECiphertext,
    NodeType,
    read_extensions,
    read_hpke_ciphertext,
    write_extensions,
    write_hpke_ciphertext,
)
from protocol.mls.tls import Reader, Writer


@dataclass(frozen=True, slots=True)
class GroupContext:
    version: int
    cipher_suite: int
    group_id: bytes
    epoch: int
    tree_hash: bytes
    confirmed_transcript_hash: bytes
    extensions: tuple[Extension, ...]


def read_group_context(r: Reader) -> GroupContext:
    return GroupContext(
        version=r.uint16("version"),
        cipher_suite=r.uint16("cipher_suite"),
        group_id=r.opaque("group_id"),
        epoch=r.uint64("epoch"),
        tree_hash=r.opaque("tree_hash"),
        confirmed_transcript_hash=r.opaque("confirmed_transcript_hash"),
        extensions=read_extensions(r),
    )


def write_group_context(w: Writer, gc: GroupContext) -> None:
    w.uint16(gc.version)
    w.uint16(gc.cipher_suite)
    w.opaque(gc.group_id)
    w.uint64(gc.epoch)
    w.opaque(gc.tree_hash)
    w.opaque(gc.confirmed_transcript_hash)
    write_extensions(w, gc.extensions)


@dataclass(frozen=True, slots=True)
class GroupInfo:
    group_context: GroupContext
    extensions: tuple[Extension, ...]
    confirmation_tag: bytes
    #: Leaf index of the member who signed (its key is in the ratchet tree).
    signer: int
    signature: bytes
    #: Exact input bytes before ``signature``: the GroupInfoTBS.
    tbs: bytes = field(default=b"", repr=False, compare=False)


def read_group_info(r: Reader) -> GroupInfo:
    start = r.pos
    with r.scope("group_context"):
        context = read_group_context(r)
    extensions = read_extensions(r)
    tag = r.opaque("confirmation_tag")
    signer = r.uint32("signer")
    tbs = r.span(start)
    return GroupInfo(context, extensions, tag, signer, r.opaque("signature"), tbs=tbs)


def write_group_info(w: Writer, gi: GroupInfo) -> None:
    write_group_context(w, gi.group_context)
    write_extensions(w, gi.extensions)
    w.opaque(gi.confirmation_tag)
    w.uint32(gi.signer)
    w.opaque(gi.signature)


@dataclass(frozen=True, slots=True)
class EncryptedGroupSecrets:
    #: KeyPackageRef of the KeyPackage this joiner was added with.
    new_member: bytes
    encrypted_group_secrets: HPKECiphertext


@dataclass(frozen=True, slots=True)
class Welcome:
    cipher_suite: int
    secrets: tuple[EncryptedGroupSecrets, ...]
    encrypted_group_info: bytes

    @property
    def new_members(self) -> tuple[bytes, ...]:
        return tuple(s.new_member for s in self.secrets)


def read_encrypted_group_secrets(r: Reader) -> EncryptedGroupSecrets:
    new_member = r.opaque("new_member")
    with r.scope("encrypted_group_secrets"):
        return EncryptedGroupSecrets(new_member, read_hpke_ciphertext(r))


def write_encrypted_group_secrets(w: Writer, egs: EncryptedGroupSecrets) -> None:
    w.opaque(egs.new_member)
    write_hpke_ciphertext(w, egs.encrypted_group_secrets)


def read_welcome(r: Reader) -> Welcome:
    suite = r.uint16("cipher_suite")
    secrets = r.vector("secrets", read_encrypted_group_secrets)
    return Welcome(suite, secrets, r.opaque("encrypted_group_info"))


def write_welcome(w: Writer, welcome: Welcome) -> None:
    w.uint16(welcome.cipher_suite)
    w.vector(welcome.secrets, write_encrypted_group_secrets)
    w.opaque(welcome.encrypted_group_info)


# --- GroupSecrets (the decrypted Welcome payload) -----------------------------------


@dataclass(frozen=True, slots=True)
class GroupSecrets:
    joiner_secret: bytes
    path_secret: bytes | None
    psks: tuple[PreSharedKeyID, ...]


def read_group_secrets(r: Reader) -> GroupSecrets:
    joiner = r.opaque("joiner_secret")
    # optional<PathSecret>, struct PathSecret { opaque path_secret<V>; }
    path_secret = r.optional("path_secret", lambda sub: sub.opaque("path_secret"))
    return GroupSecrets(joiner, path_secret, r.vector("psks", read_psk_id))


def write_group_secrets(w: Writer, gs: GroupSecrets) -> None:
    w.opaque(gs.joiner_secret)
    w.optional(gs.path_secret, Writer.opaque)
    w.vector(gs.psks, write_psk_id)


# --- ratchet tree: optional<Node> ratchet_tree<V> -----------------------------------


@dataclass(frozen=True, slots=True)
class ParentNode:
    encryption_key: bytes
    parent_hash: bytes
    unmerged_leaves: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Node:
    node_type: NodeType
    leaf_node: LeafNode | None = None
    parent_node: ParentNode | None = None


RatchetTree = tuple[Node | None, ...]


def read_node(r: Reader) -> Node:
    ntype = r.enum(NodeType, 1, "node_type")
    if ntype is NodeType.LEAF:
        with r.scope("leaf_node"):
            return Node(ntype, leaf_node=read_leaf_node(r))
    key = r.opaque("encryption_key")
    parent_hash = r.opaque("parent_hash")
    unmerged = r.vector("unmerged_leaves", lambda sub: sub.uint32("leaf"))
    return Node(ntype, parent_node=ParentNode(key, parent_hash, unmerged))


def write_node(w: Writer, node: Node) -> None:
    w.uint8(node.node_type)
    if node.leaf_node is not None:
        write_leaf_node(w, node.leaf_node)
    elif node.parent_node is not None:
        w.opaque(node.parent_node.encryption_key)
        w.opaque(node.parent_node.parent_hash)
        w.vector(node.parent_node.unmerged_leaves, Writer.uint32)


def read_ratchet_tree(r: Reader) -> RatchetTree:
    return r.vector("ratchet_tree", lambda sub: sub.optional("node", read_node))


def write_ratchet_tree(w: Writer, tree: RatchetTree) -> None:
    w.vector(tree, lambda inner, node: inner.optional(node, write_node))
