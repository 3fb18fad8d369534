"""Records passed across the storage contract (:mod:`storage.base`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)  # not frozen: a frozen __init__ cost ~2 µs per message
class NewMessage:
    """A message to append.  The idempotency key is
    (conversation, sender, device, client_message_id)."""

    conversation: bytes
    sender: str
    device: str
    client_message_id: str
    ciphertext: bytes
    created_ms: int
    # --- MLS conversations only (see docs/PROTOCOL.md, "MLS delivery service") ---
    #: "" for an opaque conversation; else "application", "proposal", "commit"
    #: or "external_commit" (a commit whose sender_type is new_member_commit).
    kind: str = ""
    #: epoch and group_id from the MLSMessage header.
    epoch: int = 0
    group_id: bytes = b""
    #: A Welcome (MLSMessage) stored for the devices of ``welcome_refs`` if this commit wins.
    welcome: bytes = b""
    #: KeyPackageRefs the Welcome names; each must have been claimed by ``sender``.
    welcome_refs: tuple[bytes, ...] = ()
    #: The GroupInfo (MLSMessage) of the epoch this commit creates (epoch + 1).
    group_info: bytes = b""
    #: Users the commit removes from the relay's member list if it wins.
    removes: tuple[str, ...] = ()
    #: Application messages: how many past epochs are still accepted.
    epoch_window: int = 0
    #: Out-of-line ciphertext (relay/offline/blobs.py): ``ciphertext`` is then empty and
    #: the blob, registered with put_blob() beforehand, holds it.
    blob_key: str = ""
    blob_size: int = 0
    #: Commits: the most members the conversation may have once it is applied
    #: (RELAY_MAX_MEMBERS; 0: no bound).  TooManyMembers refuses it otherwise.
    max_members: int = 0


@dataclass(slots=True)  # not frozen: a frozen __init__ cost ~2 µs per message
class Appended:
    """Outcome of one appended message."""

    conversation: bytes
    seq: int
    created_ms: int
    #: True when the idempotency key was already stored: ``seq`` and
    #: ``created_ms`` are the original's and nothing new was written.
    duplicate: bool
    #: MLS: the conversation's epoch after this message (None for opaque ones).
    epoch: int | None = None
    #: MLS commits: users that became members (Welcome, external commit) and
    #: users removed; each added member's joined_seq is ``seq``.
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


@dataclass(slots=True)  # not frozen: a frozen __init__ cost ~2 µs per message
class StoredMessage:
    conversation: bytes
    seq: int
    sender: str
    device: str
    ciphertext: bytes
    created_ms: int
    blob_key: str = ""
    blob_size: int = 0


@dataclass(frozen=True, slots=True)
class ConversationInfo:
    """A conversation as seen by one member."""

    conversation: bytes
    #: Highest seq assigned so far (0 when empty).
    last_seq: int
    #: The member sees messages with seq > joined_seq only.
    joined_seq: int
    #: Lowest seq still retained (last_seq + 1 when everything was pruned).
    first_seq: int


@dataclass(frozen=True, slots=True)
class AddedMember:
    user: str
    joined_seq: int


@dataclass(frozen=True, slots=True)
class NewKeyPackage:
    """A validated KeyPackage to store for (user, device)."""

    ref: bytes
    cipher_suite: int
    #: The MLSMessage bytes (wire_format key_package), handed out as is.
    data: bytes
    #: Lifetime end in seconds (clamped to 2**63 - 1).
    not_after: int
    last_resort: bool = False


@dataclass(frozen=True, slots=True)
class ClaimedKeyPackage:
    user: str
    device: str
    ref: bytes
    data: bytes
    last_resort: bool


@dataclass(frozen=True, slots=True)
class ClaimResult:
    claimed: list[ClaimedKeyPackage]
    #: (user, device) with no usable package; device None: the user has none at all.
    missing: list[tuple[str, str | None]]


@dataclass(frozen=True, slots=True)
class KeyPackageCount:
    cipher_suite: int
    #: Unclaimed, unexpired, not last resort.
    available: int
    last_resort: bool


@dataclass(frozen=True, slots=True)
class PendingWelcome:
    conversation: bytes
    seq: int
    epoch: int
    welcome: bytes


@dataclass(frozen=True, slots=True)
class ConversationKind:
    """What never changes about a conversation once created (cached by every node)."""

    exists: bool
    mls_group_id: bytes | None
    #: "inline" or "blob".
    storage_model: str


@dataclass(frozen=True, slots=True)
class PushRegistration:
    """A member's device that registered for push, in one conversation."""

    user: str
    device: str
    provider: str
    zone: str
    token: str
    joined_seq: int


@dataclass(frozen=True, slots=True)
class DeliveryState:
    """Delivery of one message to the recipient devices the relay knows of:
    every device seen of each member that could read it, but the sending one."""

    seq: int
    devices: int
    #: Handed to the device's connection (or acknowledged).
    delivered: int
    #: Acknowledged with #ack (the device's cursor is at or past seq).
    acknowledged: int


@dataclass(frozen=True, slots=True)
class BlobInfo:
    size: int
    uploader: str
