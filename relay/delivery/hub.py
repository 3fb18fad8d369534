"""In-process fan-out: who on this node receives which conversation.

The hub is synchronous on purpose.  A committed batch (from this node's
committer or from another node through the fan-out bus) is published here in
seq order; each message is encoded once into a WebSocket frame and the same
bytes are appended to every subscribed connection's outbox, then each dirty
connection is flushed with a single write.  No task is woken per recipient.

Per-conversation ordering and the replay/live seam are the subscriber's job
(see :class:`relay.stream.Streams`): the hub only offers messages.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from protocol import events
from protocol.websocket import binary_frame
from relay.delivery.outbox import Flusher


@dataclass(slots=True)  # not frozen: a frozen __init__ cost ~2 µs per message
class Published:
    """A committed message, as fanned out."""

    conversation: bytes
    seq: int
    sender: str
    device: str
    created_ms: int
    ciphertext: bytes
    #: Out-of-line ciphertext (blob-model conversations): the blob's key and size.
    blob_key: str = ""
    blob_size: int = 0


@dataclass(frozen=True, slots=True)
class ReadMark:
    """A member published its read position (live only)."""

    conversation: bytes
    user: str
    device: str
    seq: int


@dataclass(slots=True)  # not frozen: a frozen __init__ cost ~2 µs per message
class Ephemeral:
    conversation: bytes
    sender: str
    device: str
    created_ms: int
    ciphertext: bytes


@dataclass(frozen=True, slots=True)
class MembershipChange:
    conversation: bytes
    actor: str
    #: (user, joined_seq) for each added member.
    added: tuple[tuple[str, int], ...]
    removed: tuple[str, ...]
    last_seq: int


class Subscriber(Protocol):
    user: str
    device: str

    def offer(
        self, conversation: bytes, seq: int, sender: str, device: str, wire: bytes
    ) -> None: ...

    def offer_ephemeral(
        self, conversation: bytes, sender: str, device: str, wire: bytes
    ) -> None: ...

    def joined(self, conversation: bytes, joined_seq: int, last_seq: int, wire: bytes) -> bool: ...

    def left(self, conversation: bytes, wire: bytes) -> None: ...

    def notify(self, conversation: bytes, wire: bytes) -> None: ...

    def recheck(self, conversation: bytes | None, seq: int) -> None: ...


class Hub:
    def __init__(self, flusher: Flusher) -> None:
        self._flusher = flusher
        self._by_conversation: dict[bytes, set[Subscriber]] = {}
        self._by_user: dict[str, set[Subscriber]] = {}
        # Max seq seen per conversation, recorded only while a subscriber is
        # between its storage snapshot and its registration (see watch()).
        self._watchers: list[dict[bytes, int]] = []
        self.delivered = 0

    # --- registration -----------------------------------------------------

    def add_user(self, sub: Subscriber) -> None:
        self._by_user.setdefault(sub.user, set()).add(sub)

    def remove(self, sub: Subscriber, conversations: Iterable[bytes]) -> None:
        for conversation in conversations:
            self.unsubscribe(sub, conversation)
        users = self._by_user.get(sub.user)
        if users is not None:
            users.discard(sub)
            if not users:
                del self._by_user[sub.user]

    def subscribe(self, sub: Subscriber, conversation: bytes) -> None:
        self._by_conversation.setdefault(conversation, set()).add(sub)

    def unsubscribe(self, sub: Subscriber, conversation: bytes) -> None:
        subs = self._by_conversation.get(conversation)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_conversation[conversation]

    def watch(self) -> dict[bytes, int]:
        """Start recording the highest seq published per conversation.

        A subscriber takes a snapshot of its conversations from storage and
        only then registers; messages published in between would otherwise
        be invisible to it.  Anything published before watch() was committed
        before the snapshot began, so snapshot + watch covers everything."""
        seen: dict[bytes, int] = {}
        self._watchers.append(seen)
        return seen

    def unwatch(self, seen: dict[bytes, int]) -> None:
        # By identity: list.remove() compares dicts by value, and two overlapping
        # subscribes often hold equal records (both empty), so it removed the
        # other one's (which then missed seqs, and its own unwatch raised).
        for i, watcher in enumerate(self._watchers):
            if watcher is seen:
                del self._watchers[i]
                return

    def sessions_of(self, user: str) -> list[Subscriber]:
        return list(self._by_user.get(user, ()))

    # --- publishing ---------------------------------------------------------

    def publish(self, messages: Iterable[Published]) -> None:
        """Offer committed messages (in seq order per conversation), then flush."""
        for m in messages:
            for seen in self._watchers:
                if seen.get(m.conversation, 0) < m.seq:
                    seen[m.conversation] = m.seq
            subs = self._by_conversation.get(m.conversation)
            if not subs:
                continue
            wire = binary_frame(
                events.message(
                    m.conversation,
                    m.seq,
                    m.sender,
                    m.created_ms,
                    m.ciphertext,
                    m.blob_key,
                    m.blob_size,
                )
            )
            for sub in tuple(subs):
                sub.offer(m.conversation, m.seq, m.sender, m.device, wire)
            self.delivered += len(subs)
        self._flusher.flush()

    def repair(self, lost: dict[bytes, int] | None) -> None:
        """Fan-out was lost (see relay.redisbus): ``lost`` maps conversations to
        the highest seq that may not have been offered; None means anything may
        be missing.  Subscribers re-read storage instead of waiting for the
        next message in the conversation to reveal the gap."""
        if lost is None:
            for subs in tuple(self._by_user.values()):
                for sub in tuple(subs):
                    sub.recheck(None, 0)
            return
        for conversation, seq in lost.items():
            for seen in self._watchers:
                if seen.get(conversation, 0) < seq:
                    seen[conversation] = seq
            for sub in tuple(self._by_conversation.get(conversation, ())):
                sub.recheck(conversation, seq)

    def publish_ephemeral(self, m: Ephemeral) -> None:
        subs = self._by_conversation.get(m.conversation)
        if subs:
            wire = binary_frame(
                events.ephemeral(m.conversation, m.sender, m.created_ms, m.ciphertext)
            )
            for sub in tuple(subs):
                sub.offer_ephemeral(m.conversation, m.sender, m.device, wire)
        self._flusher.flush()

    def publish_read(self, mark: ReadMark) -> None:
        """Every device following the conversation but the one that marked it."""
        subs = self._by_conversation.get(mark.conversation)
        if subs:
            wire = binary_frame(events.read(mark.conversation, mark.user, mark.seq))
            for sub in tuple(subs):
                sub.offer_ephemeral(mark.conversation, mark.user, mark.device, wire)
        self._flusher.flush()

    def publish_membership(self, change: MembershipChange) -> None:
        """Apply a membership change to live subscriptions and announce it."""
        added_users = [user for user, _ in change.added]
        wire = binary_frame(
            events.membership(
                change.conversation,
                change.actor,
                added_users,
                list(change.removed),
                change.last_seq,
            )
        )
        for user in change.removed:
            for sub in self.sessions_of(user):
                sub.left(change.conversation, wire)
        for sub in tuple(self._by_conversation.get(change.conversation, ())):
            sub.notify(change.conversation, wire)
        for user, joined_seq in change.added:
            for sub in self.sessions_of(user):
                if sub.joined(change.conversation, joined_seq, change.last_seq, wire):
                    self.subscribe(sub, change.conversation)
        self._flusher.flush()
