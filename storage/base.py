"""The storage contract shared by every backend.

Two backends implement it with identical behaviour: PostgreSQL (production,
several relay nodes) and SQLite (the embedded default).  One contract test
suite (``tests/test_storage_contract.py``) runs against both.

Rules every backend keeps:

* Every method is a Trio coroutine and is cancellable.  When the caller is
  cancelled, the backend cancels the running statement on the server (or
  never starts it) and leaves no half-done work behind: a transaction is
  either committed before the caller returns, or rolled back.
* Errors are raised as :mod:`protocol.errors` classes only.  An unreachable
  database is :class:`~protocol.errors.Unavailable` (retryable).
* Sequence numbers are assigned by the database under a per-conversation row
  lock, in the same transaction that stores the message: 1, 2, 3, … with no
  gap and no duplicate, whatever the concurrency and however many relay
  processes share the database.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from protocol.errors import RelayError
from storage.records import (
    AddedMember,
    Appended,
    BlobInfo,
    ClaimedKeyPackage,
    ClaimResult,
    ConversationInfo,
    ConversationKind,
    DeliveryState,
    KeyPackageCount,
    NewKeyPackage,
    NewMessage,
    PendingWelcome,
    PushRegistration,
    StoredMessage,
)

__all__ = [
    "AddedMember",
    "Appended",
    "BlobInfo",
    "ClaimResult",
    "ClaimedKeyPackage",
    "ConversationInfo",
    "ConversationKind",
    "DeliveryState",
    "KeyPackageCount",
    "NewKeyPackage",
    "NewMessage",
    "PendingWelcome",
    "PushRegistration",
    "Storage",
    "StoredMessage",
]


class Storage(abc.ABC):
    """Persistence for conversations, members, messages and cursors."""

    @abc.abstractmethod
    async def migrate(self) -> None:
        """Apply missing migrations; idempotent, safe when two nodes run it at once."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Return if the database answers; raise Unavailable otherwise."""

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    # --- conversations and members -----------------------------------------

    @abc.abstractmethod
    async def create_conversation(
        self,
        conversation: bytes,
        creator: str,
        members: Sequence[str],
        now_ms: int,
        *,
        mls_group_id: bytes | None = None,
        external_join: bool = False,
        storage_model: str = "inline",
        max_created: int = 0,
        max_members: int = 0,
    ) -> ConversationInfo:
        """Create a conversation; the creator is always a member.  All initial
        members get joined_seq 0.  Raises ConversationExists (also for the id
        of a deleted conversation).  With ``mls_group_id`` it is an MLS
        conversation at epoch 0 (immutable); ``storage_model`` is immutable too.
        Quotas (0: none; storage/quotas.py): TooManyConversations when the
        creator has ``max_created`` existing ones, TooManyMembers when the
        members (creator included) are more than ``max_members``."""

    @abc.abstractmethod
    async def add_members(
        self,
        conversation: bytes,
        actor: str,
        users: Sequence[str],
        now_ms: int,
        *,
        max_members: int = 0,
    ) -> list[AddedMember]:
        """The actor (a member) adds users; returns only those newly added,
        each with joined_seq = the conversation's last_seq at that moment.
        Raises NotMember if the actor is not a member (or the conversation
        does not exist: existence is not revealed to non-members), and
        TooManyMembers (nobody added) when it would pass ``max_members``."""

    @abc.abstractmethod
    async def remove_members(
        self, conversation: bytes, actor: str, users: Sequence[str]
    ) -> list[str]:
        """The actor (a member) removes users (itself included: leaving);
        returns those actually removed.  Raises NotMember as above."""

    @abc.abstractmethod
    async def list_conversations(self, user: str) -> list[ConversationInfo]:
        """Every conversation the user is a member of, ordered by id."""

    @abc.abstractmethod
    async def list_conversations_page(
        self, user: str, after: bytes, limit: int
    ) -> list[ConversationInfo]:
        """At most ``limit`` of the user's conversations whose id sorts after
        ``after`` (b"": from the first), ordered by id.  Read through the
        (user, conversation) index: never more than ``limit`` memberships."""

    @abc.abstractmethod
    async def conversation_for_member(self, conversation: bytes, user: str) -> ConversationInfo:
        """Raises NotMember if the user is not a member (or no such conversation)."""

    @abc.abstractmethod
    async def members(self, conversation: bytes) -> list[str]:
        """Current members, sorted.  Internal: no authorization check."""

    # --- messages -------------------------------------------------------------

    @abc.abstractmethod
    async def append_messages(self, batch: Sequence[NewMessage]) -> list[Appended | RelayError]:
        """Store a batch in ONE transaction (group commit).

        Results align with ``batch``.  An item whose sender is not a member
        gets NotMember and does not affect the others.  Within a conversation,
        seqs follow batch order.  A repeated idempotency key (also within the
        same batch) returns the original seq with duplicate=True.  Returns
        only after the commit is durable."""

    @abc.abstractmethod
    async def read_messages(
        self, conversation: bytes, user: str, after_seq: int, limit: int, max_bytes: int = 0
    ) -> list[StoredMessage]:
        """Messages with seq > max(after_seq, joined_seq), ascending, at most
        ``limit``; with ``max_bytes``, only those whose ciphertexts before
        them come to less than that (so always at least one, and at most
        ``max_bytes`` plus one ciphertext).  Raises NotMember."""

    @abc.abstractmethod
    async def prune_messages(self, older_than_ms: int) -> int:
        """Retention: delete each conversation's oldest messages created before
        the cutoff, advancing its first_seq; returns how many were deleted.

        Only a prefix goes (retained history has no holes), and never what a
        group needs: in an MLS conversation, the commit that produced the
        current epoch, the previous epoch and everything after; and the
        messages after any Welcome still in an inbox.  The exact rule is in
        :mod:`storage.retention_sql`."""

    @abc.abstractmethod
    async def prune_group_infos(self, older_than_ms: int) -> int:
        """Delete GroupInfo of older epochs created before the cutoff; the newest
        epoch's GroupInfo of each conversation is always kept."""

    # --- single-use tokens ------------------------------------------------------

    @abc.abstractmethod
    async def consume_token(self, jti: str, user: str, expires_ms: int, now_ms: int) -> bool:
        """Record a token id as used, atomically across every process sharing the
        database; False if it was already used (a replay).  ``expires_ms`` is
        when the token stops being accepted: after it the id may be reused."""

    @abc.abstractmethod
    async def purge_token_uses(self, now_ms: int) -> int:
        """Forget used token ids that expired before ``now_ms``; returns how many."""

    # --- cursors ------------------------------------------------------------

    @abc.abstractmethod
    async def get_cursors(self, user: str, device: str) -> dict[bytes, int]:
        """The device's acknowledged positions, by conversation."""

    @abc.abstractmethod
    async def set_cursor(self, user: str, device: str, conversation: bytes, seq: int) -> int:
        """Acknowledge up to ``seq``.  Cursors never move backwards: stores and
        returns max(old, seq).  Raises NotMember, and FutureCursor when seq >
        last_seq."""

    # --- MLS delivery service -------------------------------------------------

    @abc.abstractmethod
    async def mls_group(self, conversation: bytes) -> tuple[bool, bytes | None]:
        """(exists, mls_group_id).  Internal: no authorization check."""

    @abc.abstractmethod
    async def put_key_packages(
        self,
        user: str,
        device: str,
        packages: Sequence[NewKeyPackage],
        now_ms: int,
        *,
        max_stored: int = 0,
        max_devices: int = 0,
    ) -> list[bool]:
        """Store packages in one transaction; True for each newly stored one.
        A ref already stored is left as it is (idempotent; a claimed package
        never becomes available again).  A new last-resort package retires the
        device's previous one for that cipher suite.  With ``max_stored``:
        TooManyKeyPackages (nothing stored) when the device would hold more
        unclaimed ones than that (its expired, never claimed ones are deleted);
        with ``max_devices``: TooManyDevices when ``device`` never uploaded and
        the user's devices that did are that many already."""

    @abc.abstractmethod
    async def key_package_counts(self, user: str, device: str, now_s: int) -> list[KeyPackageCount]:
        """The device's inventory by cipher suite (suites with nothing are omitted)."""

    @abc.abstractmethod
    async def key_package_devices(self, user: str, device: str) -> tuple[bool, int]:
        """(whether ``device`` ever uploaded a KeyPackage, how many of the
        user's devices did): the devices a claim for the user goes through."""

    @abc.abstractmethod
    async def claim_key_packages(
        self, claimer: str, users: Sequence[str], cipher_suite: int, now_s: int, now_ms: int
    ) -> ClaimResult:
        """One package per device of each user for ``cipher_suite``, atomically.
        A package is handed out at most once, ever (also across processes); a
        device's last-resort package only when it has nothing else, and it is
        not consumed.  Every claim is recorded for Welcome resolution."""

    @abc.abstractmethod
    async def welcomes_for(self, user: str, device: str) -> list[PendingWelcome]:
        """The device's Welcome inbox, by conversation and seq.  A Welcome leaves
        the inbox when the device acks (set_cursor) a seq >= its seq."""

    @abc.abstractmethod
    async def latest_group_info(self, conversation: bytes, user: str) -> tuple[int, bytes]:
        """(epoch, GroupInfo) of the newest stored epoch.  Allowed to members, and
        to anyone when the conversation allows external joins; NotMember otherwise
        (also when none is stored)."""

    # --- offline devices and large payloads (storage/offline_sql.py) -------------

    @abc.abstractmethod
    async def conversation_kind(self, conversation: bytes) -> ConversationKind:
        """Internal: no authorization check."""

    @abc.abstractmethod
    async def delete_conversation(self, conversation: bytes, actor: str, now_ms: int) -> list[str]:
        """The creator deletes the conversation with its messages, members and
        cursors; returns the members it had.  Its blobs are left for
        collect_blobs() (immediately collectable).  NotMember for non-members,
        Forbidden for members that did not create it."""

    @abc.abstractmethod
    async def touch_devices(self, devices: Sequence[tuple[str, str]], now_ms: int) -> None:
        """Record (user, device) pairs as seen (connected) now."""

    @abc.abstractmethod
    async def register_push(
        self, user: str, device: str, provider: str, zone: str, token: str, now_ms: int
    ) -> None:
        """Set the device's push registration (provider "" removes it)."""

    @abc.abstractmethod
    async def drop_push_token(self, user: str, device: str, token: str) -> None:
        """The provider called ``token`` dead: remove the device's registration
        if it still holds that token (not one registered since)."""

    @abc.abstractmethod
    async def push_registrations(
        self, conversations: Sequence[bytes]
    ) -> dict[bytes, list[PushRegistration]]:
        """Push-registered devices of the current members of each conversation."""

    @abc.abstractmethod
    async def record_deliveries(
        self, rows: Sequence[tuple[str, str, bytes, int]], now_ms: int
    ) -> None:
        """(user, device, conversation, seq): raise each delivered position
        (never lowers it; rows of deleted conversations are ignored)."""

    @abc.abstractmethod
    async def delivery_state(
        self, conversation: bytes, sender: str, seqs: Sequence[int]
    ) -> list[DeliveryState]:
        """Delivery of the given messages, only those ``sender`` sent (others
        are left out).  Raises NotMember."""

    @abc.abstractmethod
    async def set_read(self, conversation: bytes, user: str, seq: int, now_ms: int) -> int:
        """Publish the user's read position (never moves back; returns the stored
        one).  Raises NotMember, and FutureCursor when seq > last_seq."""

    @abc.abstractmethod
    async def read_positions(self, conversation: bytes, user: str) -> dict[str, int]:
        """Read positions of the conversation's current members.  Raises NotMember."""

    @abc.abstractmethod
    async def put_blob(
        self,
        conversation: bytes,
        key: str,
        user: str,
        device: str,
        size: int,
        now_ms: int,
        *,
        quota_bytes: int = 0,
    ) -> None:
        """Register a blob before its bytes are written.  Raises NotMember,
        BlobsDisabled when the conversation's storage model is inline, and
        BlobQuotaExceeded when the user's registered blobs and ``size`` pass
        ``quota_bytes``."""

    @abc.abstractmethod
    async def blob_for_reader(self, conversation: bytes, key: str, user: str) -> BlobInfo:
        """A blob the user may read: a member's, referenced by a message it can
        see (seq > joined_seq), or one it uploaded itself.  BlobNotFound
        otherwise (existence is not revealed)."""

    @abc.abstractmethod
    async def collect_blobs(self, orphaned_before_ms: int, limit: int) -> list[tuple[bytes, str]]:
        """Blobs to delete from the store: no retained message references them
        and their conversation is gone, or they were written before the
        cutoff.  Delete their bytes, then call forget_blobs()."""

    @abc.abstractmethod
    async def forget_blobs(self, blobs: Sequence[tuple[bytes, str]]) -> None:
        """Drop the rows of blobs whose bytes were deleted."""


def within_bytes(sizes: Sequence[int], max_bytes: int) -> int:
    """How many of the leading ``sizes`` a page holds: each while the sizes
    before it come to less than ``max_bytes`` (0: no byte bound)."""
    if not max_bytes:
        return len(sizes)
    total = 0
    for n, size in enumerate(sizes):
        if total >= max_bytes:
            return n
        total += size
    return len(sizes)
