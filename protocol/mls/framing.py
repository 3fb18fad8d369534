"""PublicMessage and PrivateMessage (RFC 9420 §6).

What a delivery service can read without group secrets: for a PublicMessage
the whole FramedContent (sender, content type, proposal/commit) and its auth
data; for a PrivateMessage only group_id, epoch, content_type and
authenticated_data -- sender and content are encrypted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.mls.content import (
    Commit,
    Proposal,
    read_commit,
    read_proposal,
    write_commit,
    write_proposal,
)
from protocol.mls.structs import ContentType, SenderType
from protocol.mls.tls import Reader, Writer

# Sender types whose Sender carries a uint32 index (leaf_index / sender_index).
_INDEXED_SENDERS = (SenderType.MEMBER, SenderType.EXTERNAL)


@dataclass(frozen=True, slots=True)
class Sender:
    sender_type: SenderType
    #: ``leaf_index`` for members, ``sender_index`` (into external_senders) for external.
    index: int | None = None

    @property
    def leaf_index(self) -> int | None:
        return self.index if self.sender_type is SenderType.MEMBER else None

    @property
    def sender_index(self) -> int | None:
        return self.index if self.sender_type is SenderType.EXTERNAL else None


def read_sender(r: Reader) -> Sender:
    stype = r.enum(SenderType, 1, "sender_type")
    if stype in _INDEXED_SENDERS:
        name = "leaf_index" if stype is SenderType.MEMBER else "sender_index"
        return Sender(stype, r.uint32(name))
    return Sender(stype)


def write_sender(w: Writer, sender: Sender) -> None:
    w.uint8(sender.sender_type)
    if sender.sender_type in _INDEXED_SENDERS:
        w.uint32(sender.index or 0)


@dataclass(frozen=True, slots=True)
class FramedContent:
    group_id: bytes
    epoch: int
    sender: Sender
    authenticated_data: bytes
    content_type: ContentType
    #: Exactly one of these is set, according to ``content_type``.
    application_data: bytes | None = None
    proposal: Proposal | None = None
    commit: Commit | None = None
    #: Exact input bytes of the FramedContent (part of FramedContentTBS).
    raw: bytes = field(default=b"", repr=False, compare=False)


def read_framed_content(r: Reader) -> FramedContent:
    start = r.pos
    group_id = r.opaque("group_id")
    epoch = r.uint64("epoch")
    with r.scope("sender"):
        sender = read_sender(r)
    authenticated_data = r.opaque("authenticated_data")
    ctype = r.enum(ContentType, 1, "content_type")
    app = proposal = commit = None
    if ctype is ContentType.APPLICATION:
        app = r.opaque("application_data")
    elif ctype is ContentType.PROPOSAL:
        with r.scope("proposal"):
            proposal = read_proposal(r)
    else:
        with r.scope("commit"):
            commit = read_commit(r)
    return FramedContent(
        group_id,
        epoch,
        sender,
        authenticated_data,
        ctype,
        app,
        proposal,
        commit,
        raw=r.span(start),
    )


def write_framed_content(w: Writer, fc: FramedContent) -> None:
    w.opaque(fc.group_id)
    w.uint64(fc.epoch)
    write_sender(w, fc.sender)
    w.opaque(fc.authenticated_data)
    w.uint8(fc.content_type)
    if fc.content_type is ContentType.APPLICATION:
        w.opaque(fc.application_data or b"")
    elif fc.proposal is not None:
        write_proposal(w, fc.proposal)
    elif fc.commit is not None:
        write_commit(w, fc.commit)


@dataclass(frozen=True, slots=True)
class PublicMessage:
    content: FramedContent
    #: FramedContentAuthData: SignWithLabel(., "FramedContentTBS", ...)
    signature: bytes
    #: Only for commits.
    confirmation_tag: bytes | None
    #: Only for member senders.
    membership_tag: bytes | None

    @property
    def group_id(self) -> bytes:
        return self.content.group_id

    @property
    def epoch(self) -> int:
        return self.content.epoch

    @property
    def sender(self) -> Sender:
        return self.content.sender

    @property
    def content_type(self) -> ContentType:
        return self.content.content_type


def read_public_message(r: Reader) -> PublicMessage:
    with r.scope("content"):
        content = read_framed_content(r)
    with r.scope("auth"):
        signature = r.opaque("signature")
        tag = None
        if content.content_type is ContentType.COMMIT:
            tag = r.opaque("confirmation_tag")
    membership_tag = None
    if content.sender.sender_type is SenderType.MEMBER:
        membership_tag = r.opaque("membership_tag")
    return PublicMessage(content, signature, tag, membership_tag)


def write_public_message(w: Writer, msg: PublicMessage) -> None:
    write_framed_content(w, msg.content)
    w.opaque(msg.signature)
    if msg.content.content_type is ContentType.COMMIT:
        w.opaque(msg.confirmation_tag or b"")
    if msg.content.sender.sender_type is SenderType.MEMBER:
        w.opaque(msg.membership_tag or b"")


@dataclass(frozen=True, slots=True)
class PrivateMessage:
    group_id: bytes
    epoch: int
    content_type: ContentType
    authenticated_data: bytes
    encrypted_sender_data: bytes
    ciphertext: bytes


def read_private_message(r: Reader) -> PrivateMessage:
    return PrivateMessage(
        group_id=r.opaque("group_id"),
        epoch=r.uint64("epoch"),
        content_type=r.enum(ContentType, 1, "content_type"),
        authenticated_data=r.opaque("authenticated_data"),
        encrypted_sender_data=r.opaque("encrypted_sender_data"),
        ciphertext=r.opaque("ciphertext"),
    )


def write_private_message(w: Writer, msg: PrivateMessage) -> None:
    w.opaque(msg.group_id)
    w.uint64(msg.epoch)
    w.uint8(msg.content_type)
    w.opaque(msg.authenticated_data)
    w.opaque(msg.encrypted_sender_data)
    w.opaque(msg.ciphertext)
