"""Proposals (RFC 9420 §12.1) and Commit (§12.4).

A Proposal body has no length prefix: its type alone says how to read it.  An
unknown proposal type therefore ends the parse with
:class:`~protocol.errors.MLSUnsupportedError` instead of being skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from protocol.mls.leaf import (
    KeyPackage,
    LeafNode,
    read_key_package,
    read_leaf_node,
    write_key_package,
    write_leaf_node,
)
from protocol.mls.structs import (
    Extension,
    HPKECiphertext,
    ProposalOrRefType,
    ProposalType,
    PSKType,
    read_extensions,
    read_hpke_ciphertext,
    write_extensions,
    write_hpke_ciphertext,
)
from protocol.mls.tls import Reader, Writer

# --- PreSharedKeyID (§8.4) -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class PreSharedKeyID:
    psktype: PSKType
    psk_nonce: bytes
    #: external PSKs
    psk_id: bytes | None = None
    #: resumption PSKs: ResumptionPSKUsage (kept as an int), group id and epoch
    usage: int | None = None
    psk_group_id: bytes | None = None
    psk_epoch: int | None = None


def read_psk_id(r: Reader) -> PreSharedKeyID:
    psktype = r.enum(PSKType, 1, "psktype")
    if psktype is PSKType.EXTERNAL:
        psk_id = r.opaque("psk_id")
        return PreSharedKeyID(psktype, psk_id=psk_id, psk_nonce=r.opaque("psk_nonce"))
    usage = r.uint8("usage")
    group_id = r.opaque("psk_group_id")
    epoch = r.uint64("psk_epoch")
    return PreSharedKeyID(
        psktype,
        usage=usage,
        psk_group_id=group_id,
        psk_epoch=epoch,
        psk_nonce=r.opaque("psk_nonce"),
    )


def write_psk_id(w: Writer, psk: PreSharedKeyID) -> None:
    w.uint8(psk.psktype)
    if psk.psktype is PSKType.EXTERNAL:
        w.opaque(psk.psk_id or b"")
    else:
        w.uint8(psk.usage or 0)
        w.opaque(psk.psk_group_id or b"")
        w.uint64(psk.psk_epoch or 0)
    w.opaque(psk.psk_nonce)


# --- proposal bodies -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Add:
    key_package: KeyPackage


@dataclass(frozen=True, slots=True)
class Update:
    leaf_node: LeafNode


@dataclass(frozen=True, slots=True)
class Remove:
    removed: int


@dataclass(frozen=True, slots=True)
class PreSharedKey:
    psk: PreSharedKeyID


@dataclass(frozen=True, slots=True)
class ReInit:
    group_id: bytes
    version: int
    cipher_suite: int
    extensions: tuple[Extension, ...]


@dataclass(frozen=True, slots=True)
class ExternalInit:
    kem_output: bytes


@dataclass(frozen=True, slots=True)
class GroupContextExtensions:
    extensions: tuple[Extension, ...]


ProposalBody = Add | Update | Remove | PreSharedKey | ReInit | ExternalInit | GroupContextExtensions


def read_add(r: Reader) -> Add:
    with r.scope("key_package"):
        return Add(read_key_package(r))


def read_update(r: Reader) -> Update:
    with r.scope("leaf_node"):
        return Update(read_leaf_node(r))


def read_remove(r: Reader) -> Remove:
    return Remove(r.uint32("removed"))


def read_pre_shared_key(r: Reader) -> PreSharedKey:
    with r.scope("psk"):
        return PreSharedKey(read_psk_id(r))


def read_reinit(r: Reader) -> ReInit:
    return ReInit(
        group_id=r.opaque("group_id"),
        version=r.uint16("version"),
        cipher_suite=r.uint16("cipher_suite"),
        extensions=read_extensions(r),
    )


def read_external_init(r: Reader) -> ExternalInit:
    return ExternalInit(r.opaque("kem_output"))


def read_group_context_extensions(r: Reader) -> GroupContextExtensions:
    return GroupContextExtensions(read_extensions(r))


_BODY_READERS: dict[ProposalType, Callable[[Reader], ProposalBody]] = {
    ProposalType.ADD: read_add,
    ProposalType.UPDATE: read_update,
    ProposalType.REMOVE: read_remove,
    ProposalType.PSK: read_pre_shared_key,
    ProposalType.REINIT: read_reinit,
    ProposalType.EXTERNAL_INIT: read_external_init,
    ProposalType.GROUP_CONTEXT_EXTENSIONS: read_group_context_extensions,
}


def write_proposal_body(w: Writer, body: ProposalBody) -> None:
    match body:
        case Add():
            write_key_package(w, body.key_package)
        case Update():
            write_leaf_node(w, body.leaf_node)
        case Remove():
            w.uint32(body.removed)
        case PreSharedKey():
            write_psk_id(w, body.psk)
        case ReInit():
            w.opaque(body.group_id)
            w.uint16(body.version)
            w.uint16(body.cipher_suite)
            write_extensions(w, body.extensions)
        case ExternalInit():
            w.opaque(body.kem_output)
        case GroupContextExtensions():
            write_extensions(w, body.extensions)


# --- Proposal / ProposalOrRef / Commit ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Proposal:
    proposal_type: ProposalType
    body: ProposalBody


def read_proposal(r: Reader) -> Proposal:
    ptype = r.enum(ProposalType, 2, "proposal_type")
    with r.scope(ptype.name.lower()):
        return Proposal(ptype, _BODY_READERS[ptype](r))


def write_proposal(w: Writer, proposal: Proposal) -> None:
    w.uint16(proposal.proposal_type)
    write_proposal_body(w, proposal.body)


@dataclass(frozen=True, slots=True)
class ProposalOrRef:
    type: ProposalOrRefType
    proposal: Proposal | None = None
    #: ProposalRef (a RefHash of an AuthenticatedContent) for by-reference proposals.
    reference: bytes | None = None


def read_proposal_or_ref(r: Reader) -> ProposalOrRef:
    kind = r.enum(ProposalOrRefType, 1, "type")
    if kind is ProposalOrRefType.PROPOSAL:
        return ProposalOrRef(kind, proposal=read_proposal(r))
    return ProposalOrRef(kind, reference=r.opaque("reference"))


def write_proposal_or_ref(w: Writer, por: ProposalOrRef) -> None:
    w.uint8(por.type)
    if por.proposal is not None:
        write_proposal(w, por.proposal)
    else:
        w.opaque(por.reference or b"")


@dataclass(frozen=True, slots=True)
class UpdatePathNode:
    encryption_key: bytes
    encrypted_path_secret: tuple[HPKECiphertext, ...]


@dataclass(frozen=True, slots=True)
class UpdatePath:
    leaf_node: LeafNode
    nodes: tuple[UpdatePathNode, ...]


def read_update_path_node(r: Reader) -> UpdatePathNode:
    key = r.opaque("encryption_key")
    return UpdatePathNode(key, r.vector("encrypted_path_secret", read_hpke_ciphertext))


def read_update_path(r: Reader) -> UpdatePath:
    with r.scope("leaf_node"):
        leaf = read_leaf_node(r)
    return UpdatePath(leaf, r.vector("nodes", read_update_path_node))


def write_update_path_node(w: Writer, node: UpdatePathNode) -> None:
    w.opaque(node.encryption_key)
    w.vector(node.encrypted_path_secret, write_hpke_ciphertext)


def write_update_path(w: Writer, path: UpdatePath) -> None:
    write_leaf_node(w, path.leaf_node)
    w.vector(path.nodes, write_update_path_node)


@dataclass(frozen=True, slots=True)
class Commit:
    proposals: tuple[ProposalOrRef, ...]
    path: UpdatePath | None

    @property
    def proposal_types(self) -> tuple[ProposalType | None, ...]:
        """Types of inline proposals; ``None`` for by-reference ones."""
        return tuple(p.proposal.proposal_type if p.proposal else None for p in self.proposals)


def read_commit(r: Reader) -> Commit:
    proposals = r.vector("proposals", read_proposal_or_ref)
    return Commit(proposals, r.optional("path", read_update_path))


def write_commit(w: Writer, commit: Commit) -> None:
    w.vector(commit.proposals, write_proposal_or_ref)
    w.optional(commit.path, write_update_path)
