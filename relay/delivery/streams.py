"""The replay/live seam of one connection, per conversation.

For each conversation a connection follows, :class:`Stream` holds
``next_seq`` (the next seq this connection must deliver) and ``known_last``
(the highest seq known to be committed).  Live messages are delivered only
when they are exactly ``next_seq``; anything ahead of it means a gap (missed
fan-out, or a reorder between nodes) and switches the conversation to
catch-up, which reads the gap from storage.  While catching up, live messages
only raise ``known_last``; the catch-up loop keeps reading until it has
delivered everything up to ``known_last`` and storage returns a short page,
then flips back to live.  Because every message is published only after its
commit, a message is either seen by that last read, or published after the
read began: before the flip it raised ``known_last`` (so no flip yet, and
the loop reads again), after the flip it arrives live.  No gap and no
duplicate at the seam.  Full pages are read one ahead while the previous
one drains to the client.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from protocol import events
from protocol.errors import AlreadySubscribed, NotMember, RelayError, Unavailable
from protocol.websocket import binary_frame
from relay.delivery.outbox import Flusher, Outbox
from storage.base import Storage, StoredMessage

REPLAY_PAGE = 1000


@dataclass(slots=True)
class Stream:
    next_seq: int
    known_last: int
    catching_up: bool
    #: Last seq of the initial replay; later messages of this device were sent
    #: on this connection, so a gap repair must not echo them (live rule).
    replay_to: int = 0


class Streams:
    """Implements the hub's Subscriber protocol for one connection."""

    def __init__(
        self,
        user: str,
        device: str,
        outbox: Outbox,
        flusher: Flusher,
        storage: Storage,
        on_left: Callable[[bytes], None],
    ) -> None:
        self.user = user
        self.device = device
        self._outbox = outbox
        self._flusher = flusher
        self._storage = storage
        self._on_left = on_left
        self.by_conversation: dict[bytes, Stream] = {}
        self._pending: dict[bytes, None] = {}
        # The catch-up task exists only while there is something to replay:
        # a permanent one per connection cost memory at 10k+ idle sockets.
        self._nursery: trio.Nursery | None = None
        self._on_idle: Callable[[], None] = _nothing
        self._running = False
        self._kicked = False
        #: While a subscription is being set up, membership changes are stashed.
        self.stash: dict[bytes, int | None] | None = None
        #: Called when this connection's user joined a conversation (Welcome delivery).
        self.on_joined: Callable[[bytes], None] | None = None
        #: A full recheck arrived while subscribing: follow() must read storage.
        self._recheck_on_follow = False

    # --- hub callbacks (synchronous, hot path) ------------------------------

    def offer(self, conversation: bytes, seq: int, sender: str, device: str, wire: bytes) -> None:
        st = self.by_conversation.get(conversation)
        if st is None:
            return
        if seq > st.known_last:
            st.known_last = seq
        if st.catching_up or seq < st.next_seq:
            return
        if seq > st.next_seq:
            self._start_catch_up(conversation, st)
            return
        st.next_seq = seq + 1
        if device == self.device and sender == self.user:
            return  # the sending device got its #result instead
        self._outbox.write(wire)

    def offer_ephemeral(self, conversation: bytes, sender: str, device: str, wire: bytes) -> None:
        if conversation in self.by_conversation and not (
            device == self.device and sender == self.user
        ):
            self._outbox.write(wire)

    def joined(self, conversation: bytes, joined_seq: int, last_seq: int, wire: bytes) -> bool:
        """Returns True when the hub must subscribe us to the conversation now."""
        self._outbox.write_control(wire)
        if self.on_joined is not None:
            self.on_joined(conversation)
        if self.stash is not None:
            self.stash[conversation] = joined_seq
            return False
        if conversation in self.by_conversation:
            return False
        self.follow(conversation, joined_seq + 1, last_seq)
        return True

    def left(self, conversation: bytes, wire: bytes) -> None:
        if self.stash is not None:
            self.stash[conversation] = None
        self._outbox.write_control(wire)
        if self.by_conversation.pop(conversation, None) is not None:
            self._pending.pop(conversation, None)
            self._on_left(conversation)

    def notify(self, conversation: bytes, wire: bytes) -> None:
        self._outbox.write_control(wire)

    def recheck(self, conversation: bytes | None, seq: int) -> None:
        """Repair entry point (Hub.repair): fan-out up to ``seq`` may have been
        lost; for ``None``, anything in any conversation.  Catch-up reads the
        gap from storage and dedups against what was delivered."""
        if conversation is None:
            if self.stash is not None:
                self._recheck_on_follow = True  # snapshot may predate the loss
            for conv, st in self.by_conversation.items():
                if not st.catching_up:
                    self._start_catch_up(conv, st)
            return
        one = self.by_conversation.get(conversation)
        if one is None:
            return
        if seq > one.known_last:
            one.known_last = seq
        if not one.catching_up and seq >= one.next_seq:
            self._start_catch_up(conversation, one)

    # --- setup --------------------------------------------------------------

    def start_stash(self) -> dict[bytes, int | None]:
        """A #subscribe begins: stash membership changes until it registers.
        Synchronous, so the check and the claim cannot be split by an await:
        a pipelined second #subscribe is refused instead of sharing (and then
        clearing) this one's stash."""
        if self.stash is not None:
            raise AlreadySubscribed("a #subscribe is already being set up on this connection")
        self.stash = {}
        return self.stash

    def stop_stash(self) -> None:
        self.stash = None

    def follow(self, conversation: bytes, next_seq: int, known_last: int) -> Stream:
        """Start following a conversation from ``next_seq``."""
        st = Stream(next_seq, known_last, catching_up=False, replay_to=known_last)
        self.by_conversation[conversation] = st
        if known_last >= next_seq or self._recheck_on_follow:
            self._start_catch_up(conversation, st)
        return st

    def _start_catch_up(self, conversation: bytes, st: Stream) -> None:
        st.catching_up = True
        self._pending[conversation] = None
        self._ensure_running()

    def kick(self) -> None:
        """Make the catch-up task run (and report idle) even with nothing pending."""
        self._recheck_on_follow = False  # subscribe() calls this after its follows
        self._kicked = True
        self._ensure_running()

    # --- catch-up -----------------------------------------------------------

    def attach(self, nursery: trio.Nursery, on_idle: Callable[[], None]) -> None:
        """Where catch-up tasks run, and whom to tell when a catch-up ends."""
        self._nursery = nursery
        self._on_idle = on_idle
        if self._pending or self._kicked:
            self._ensure_running()

    def _ensure_running(self) -> None:
        if not self._running and self._nursery is not None:
            self._running = True
            self._nursery.start_soon(self._run_pending)

    async def _run_pending(self) -> None:
        """Replay whatever conversation fell behind, oldest request first, then end."""
        backoff = 0.2
        try:
            while self._pending:
                conversation = next(iter(self._pending))
                try:
                    await self._catch_up(conversation)
                except Unavailable:
                    # Storage outage: the connection stays up and the replay
                    # resumes from next_seq once the database is back.
                    await trio.sleep(backoff)
                    backoff = min(5.0, backoff * 2)
                    continue
                backoff = 0.2
                self._pending.pop(conversation, None)
        finally:
            # No await between the empty check above and this: a catch-up
            # requested meanwhile always finds either this loop or no task.
            self._running = False
            self._kicked = False
        self._on_idle()

    async def _catch_up(self, conversation: bytes) -> None:
        ahead: _ReadAhead | None = None
        while True:
            st = self.by_conversation.get(conversation)
            if st is None:
                return
            try:
                if ahead is not None and ahead.after == st.next_seq - 1:
                    rows = await ahead.rows()
                else:
                    await self._outbox.wait_for_room(self._outbox.limit // 2)
                    rows = await self._read(conversation, st.next_seq - 1)
            except NotMember:
                self.by_conversation.pop(conversation, None)
                self._on_left(conversation)
                return
            ahead = None
            if self.by_conversation.get(conversation) is not st:
                return  # left (or re-joined) while we were reading
            if not await self._replay(conversation, st, rows):
                return  # left while the replay waited for room, or the connection failed
            if len(rows) < REPLAY_PAGE and st.next_seq > st.known_last:
                st.catching_up = False  # see module doc: known_last covers the wait
                return
            if not rows and not await self._skip_pruned(conversation, st):
                return
            if len(rows) == REPLAY_PAGE and self._nursery is not None:
                # Read the next page while this one drains to the client: the
                # replay was otherwise idle for every database round trip.
                ahead = _ReadAhead(st.next_seq - 1)
                self._nursery.start_soon(ahead.fetch, self._read, conversation)
                await self._outbox.wait_for_room(self._outbox.limit // 2)

    async def _read(self, conversation: bytes, after_seq: int) -> list[StoredMessage]:
        # At most half the outbox bound of ciphertext per page: a page is held
        # while it drains, and 1,000 rows of 256 KiB were 256 MB (a
        # subscriber that never read held 100 MB of replay for as long as it
        # stayed connected).
        budget = self._outbox.limit // 2
        return await self._storage.read_messages(
            conversation, self.user, after_seq, REPLAY_PAGE, max_bytes=budget
        )

    async def _replay(self, conversation: bytes, st: Stream, rows: list[StoredMessage]) -> bool:
        """Queue ``rows``, waiting for room whenever the outbox is half full
        (a page of large messages would otherwise pass its bound at once).
        Live messages arriving meanwhile only raise known_last (catching_up),
        so waiting here keeps the seam intact.  False: stop, the stream or
        the connection is gone."""
        for row in rows:
            if row.seq < st.next_seq:
                continue
            st.next_seq = row.seq + 1
            if row.seq > st.known_last:
                st.known_last = row.seq
            if row.seq > st.replay_to and row.device == self.device and row.sender == self.user:
                continue  # its #result carried the seq, as on the live path
            wire = binary_frame(
                events.message(
                    conversation,
                    row.seq,
                    row.sender,
                    row.created_ms,
                    row.ciphertext,
                    row.blob_key,
                    row.blob_size,
                )
            )
            await self._outbox.wait_room_for(len(wire))
            if self.by_conversation.get(conversation) is not st or not self._outbox.write(wire):
                return False
        self._flusher.flush()
        return True

    async def _skip_pruned(self, conversation: bytes, st: Stream) -> bool:
        """Nothing to read although seqs up to known_last were committed: they
        were pruned (retention ran between our snapshot and this read).  Jump
        to the first retained seq instead of reading the same gap forever.
        Returns False when the stream is gone."""
        try:
            info = await self._storage.conversation_for_member(conversation, self.user)
        except NotMember:
            self.by_conversation.pop(conversation, None)
            self._on_left(conversation)
            return False
        if self.by_conversation.get(conversation) is not st:
            return False
        if info.first_seq > st.next_seq:
            st.next_seq = info.first_seq
        else:
            await trio.sleep(0.05)  # committed but not yet visible to us: do not spin
        return True


class _ReadAhead:
    """One replay page read in the background (a task of the session's nursery)."""

    def __init__(self, after: int) -> None:
        self.after = after
        self._done = trio.Event()
        self._rows: list[StoredMessage] = []
        self._error: RelayError | None = None

    async def fetch(
        self, read: Callable[[bytes, int], Awaitable[list[StoredMessage]]], conversation: bytes
    ) -> None:
        try:
            self._rows = await read(conversation, self.after)
        except RelayError as exc:  # handed to the replay loop, never to the nursery
            self._error = exc
        finally:
            self._done.set()

    async def rows(self) -> list[StoredMessage]:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._rows


def _nothing() -> None:
    pass
