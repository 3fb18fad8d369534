"""The MLS delivery service (RFC 9420 §16) around the relay's ordered streams.

Framing is decided by the conversation, never by sniffing: a conversation
created with ``mls: true`` has an MLS group id, and every durable ``#send`` in
it must carry one MLSMessage (PublicMessage or PrivateMessage) in
``ciphertext``.  This module reads the cleartext header (group_id, epoch,
content type, sender type), refuses application data in a PublicMessage, and
hands storage a :class:`~storage.base.NewMessage` whose epoch check runs in
the append transaction.  It also validates KeyPackage uploads and rate-limits
claims (across nodes through Redis when configured; relay/cluster/sharedlimits.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from protocol.errors import (
    BlobNotFound,
    BlobsDisabled,
    CredentialMismatch,
    InvalidRequest,
    MLSDecodeError,
    MLSUnsupportedCipherSuite,
    MLSValidationError,
    NotMLSConversation,
    RelayError,
)
from protocol.mls import (
    ContentType,
    CredentialType,
    GroupInfo,
    KeyPackagePolicy,
    PublicMessage,
    SenderType,
    Welcome,
    WireFormat,
    key_package_ref,
    parse_key_package,
    parse_mls_message,
    validate_handshake_framing,
    validate_key_package,
)
from protocol.requests import Send
from relay.cluster.sharedlimits import ClaimLimits
from relay.cluster.sharedlimits import TokenBuckets as TokenBuckets  # moved there; re-exported
from storage.base import ClaimResult, ConversationKind, NewKeyPackage, NewMessage

if TYPE_CHECKING:
    from relay.base.config import Config
    from relay.offline.blobs import Blobs
    from storage.base import Storage

ETERNAL = 2**64 - 1
#: Highest MLS epoch accepted in a send: storage holds epochs as signed 64-bit
#: integers and a commit creates epoch + 1.
MAX_EPOCH = 2**63 - 2
_KINDS = {
    ContentType.APPLICATION: "application",
    ContentType.PROPOSAL: "proposal",
    ContentType.COMMIT: "commit",
}


def _check_name(exc: RelayError) -> str:
    """The failing check, named for clients (``check`` in the error body)."""
    if isinstance(exc, MLSUnsupportedCipherSuite):
        return "cipher_suite"
    if isinstance(exc, CredentialMismatch):
        return "credential"
    if isinstance(exc, MLSDecodeError):
        return "structure"
    field = str(exc.details.get("field", ""))
    for name in ("signature", "lifetime", "version", "leaf_node_source", "init_key"):
        if name in field:
            return name
    return "structure" if field == "wire_format" else "key_package"


class DeliveryService:
    """One per relay node (``Relay.mls``, built in relay/node.py)."""

    def __init__(
        self, storage: Storage, blobs: Blobs, config: Config, claim_limits: ClaimLimits
    ) -> None:
        self._storage = storage
        self._blobs = blobs
        #: Epoch window, member cap, KeyPackage lifetimes, the blob threshold.
        self._config = config
        #: Seconds since the epoch; tests replace it (KeyPackage lifetimes, claims).
        self.clock: Callable[[], float] = time.time
        #: conversation -> its MLS group id and storage model.  Immutable once
        #: created (deleted ids are never reused), so only existing
        #: conversations are cached and never invalidated.
        self._kinds: dict[bytes, ConversationKind] = {}
        self.claim_limits = claim_limits

    # --- sends --------------------------------------------------------------

    async def kind_of(self, conversation: bytes) -> ConversationKind:
        kind = self._kinds.get(conversation)
        if kind is not None:
            return kind
        kind = await self._storage.conversation_kind(conversation)
        if kind.exists:
            if len(self._kinds) >= 200_000:
                self._kinds.clear()  # a bound, not an LRU: refilling costs one read each
            self._kinds[conversation] = kind
        return kind

    def forget(self, conversation: bytes) -> None:
        """The conversation was deleted (its id is never reused)."""
        self._kinds.pop(conversation, None)

    async def new_message(self, req: Send, user: str, device: str, now_ms: int) -> NewMessage:
        """The NewMessage for a durable send; raises for a malformed MLS send.
        In a blob conversation, large ciphertext goes to the blob store here."""
        kind = await self.kind_of(req.conversation)
        if req.blob:
            return await self._referencing_blob(req, user, device, now_ms, kind)
        message = self._build(req, user, device, now_ms, kind.mls_group_id)
        if not self._offloads(kind, req):
            return message
        key = await self._blobs.save(req.conversation, user, device, req.ciphertext)
        return replace(message, ciphertext=b"", blob_key=key, blob_size=len(req.ciphertext))

    def new_message_nowait(
        self, req: Send, user: str, device: str, now_ms: int
    ) -> NewMessage | None:
        """Like new_message without I/O: None if that needs I/O (the
        conversation is not cached yet, or the send involves a blob)."""
        kind = self._kinds.get(req.conversation)
        if kind is None or req.blob or self._offloads(kind, req):
            return None
        return self._build(req, user, device, now_ms, kind.mls_group_id)

    def _offloads(self, kind: ConversationKind, req: Send) -> bool:
        threshold = self._config.blob_threshold
        return kind.storage_model == "blob" and len(req.ciphertext) > threshold

    async def _referencing_blob(
        self, req: Send, user: str, device: str, now_ms: int, kind: ConversationKind
    ) -> NewMessage:
        """A send naming a blob its sender uploaded over HTTP."""
        if kind.storage_model != "blob":
            raise BlobsDisabled("this conversation keeps ciphertext inline; it takes no blobs")
        info = await self._storage.blob_for_reader(req.conversation, req.blob, user)
        if info.uploader != user:
            raise BlobNotFound("no such blob of yours in this conversation")
        ciphertext = req.ciphertext
        if kind.mls_group_id is not None:  # the MLS header is checked as for inline sends
            ciphertext = await self._blobs.load(req.conversation, req.blob)
        message = self._build(replace(req, ciphertext=ciphertext), user, device, now_ms,
                              kind.mls_group_id)  # fmt: skip
        return replace(message, ciphertext=b"", blob_key=req.blob, blob_size=info.size)

    def _build(
        self, req: Send, user: str, device: str, now_ms: int, group: bytes | None
    ) -> NewMessage:
        base = NewMessage(
            req.conversation, user, device, req.client_message_id, req.ciphertext, now_ms
        )
        if group is None:
            if req.welcome or req.group_info or req.removes:
                raise NotMLSConversation("welcome, group_info and removes need an MLS conversation")
            return base
        cfg = self._config
        return mls_message(base, req, cfg.epoch_window, cfg.max_members)

    # --- key packages -----------------------------------------------------------

    def check_key_package(self, data: bytes, user: str, last_resort: bool) -> NewKeyPackage:
        """Validate one uploaded KeyPackage (an MLSMessage); errors name the check."""
        cfg = self._config
        try:
            kp = parse_key_package(data, bare=False)
            validate_key_package(
                kp,
                now=int(self.clock()),
                policy=KeyPackagePolicy(clock_skew=cfg.keypackage_clock_skew_s),
            )
            lifetime = kp.leaf_node.lifetime
            assert lifetime is not None  # key_package leaves always carry one
            eternal = lifetime.not_after == ETERNAL and cfg.keypackage_allow_eternal
            if (
                lifetime.not_after - lifetime.not_before > cfg.keypackage_max_lifetime_s
                and not eternal
            ):
                raise MLSValidationError(
                    "lifetime longer than the relay accepts",
                    field="key_package.leaf_node.lifetime",
                    max_lifetime_s=cfg.keypackage_max_lifetime_s,
                )
            cred = kp.leaf_node.credential
            if cred.credential_type is not CredentialType.BASIC or cred.identity != user.encode():
                raise CredentialMismatch(
                    "the credential identity must be your DID (basic credential)",
                    field="key_package.leaf_node.credential",
                )
        except RelayError as exc:
            exc.details.setdefault("check", _check_name(exc))
            raise
        return NewKeyPackage(
            key_package_ref(kp), kp.cipher_suite, data, lifetime.not_after, last_resort
        )

    async def claim(self, claimer: str, users: Sequence[str], cipher_suite: int) -> ClaimResult:
        await self.claim_limits.check(
            claimer, users
        )  # across nodes (relay/cluster/sharedlimits.py)
        now = self.clock()
        return await self._storage.claim_key_packages(
            claimer, users, cipher_suite, int(now), int(now * 1000)
        )


def mls_message(base: NewMessage, req: Send, window: int, max_members: int = 0) -> NewMessage:
    """Read the MLSMessage header of a send into an MLS NewMessage (sans I/O)."""
    msg = parse_mls_message(
        req.ciphertext, expect=(WireFormat.PUBLIC_MESSAGE, WireFormat.PRIVATE_MESSAGE)
    )
    validate_handshake_framing(msg)  # RFC 9420 §6: no application data in a PublicMessage
    assert msg.content_type is not None and msg.group_id is not None and msg.epoch is not None
    if msg.epoch > MAX_EPOCH:
        # uint64 on the wire, a signed 64-bit column in storage: refused here, as
        # the one send it is, instead of failing the append of a whole batch.
        raise MLSValidationError(
            f"epoch is above {MAX_EPOCH}, the highest the relay stores", field="epoch",
            max_epoch=MAX_EPOCH,
        )  # fmt: skip
    kind = _KINDS[msg.content_type]
    body = msg.body
    if isinstance(body, PublicMessage) and body.sender.sender_type is SenderType.NEW_MEMBER_COMMIT:
        kind = "external_commit"
    is_commit = kind in ("commit", "external_commit")
    if not is_commit and (req.welcome or req.group_info or req.removes):
        raise InvalidRequest("welcome, group_info and removes go with a commit only")
    refs: tuple[bytes, ...] = ()
    if req.welcome:
        welcome = parse_mls_message(req.welcome, expect=WireFormat.WELCOME).body
        assert isinstance(welcome, Welcome)
        refs = welcome.new_members
    if req.group_info:
        info = parse_mls_message(req.group_info, expect=WireFormat.GROUP_INFO).body
        assert isinstance(info, GroupInfo)
        ctx = info.group_context
        if ctx.group_id != msg.group_id or ctx.epoch != msg.epoch + 1:
            raise MLSValidationError(
                "group_info must be for this group and the epoch the commit creates",
                field="group_info",
            )
    return NewMessage(
        base.conversation,
        base.sender,
        base.device,
        base.client_message_id,
        base.ciphertext,
        base.created_ms,
        kind=kind,
        epoch=msg.epoch,
        group_id=msg.group_id,
        welcome=req.welcome,
        welcome_refs=refs,
        group_info=req.group_info,
        removes=req.removes,
        epoch_window=window,
        max_members=max_members if is_commit else 0,
    )
