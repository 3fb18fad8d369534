"""Request handlers other than durable sends.  Each returns the reply frame."""

from __future__ import annotations

import logging
import time
from collections.abc import Container
from dataclasses import dataclass
from typing import TYPE_CHECKING

from protocol import events, text
from protocol.errors import (
    AlreadySubscribed,
    FutureCursor,
    NotMember,
    RelayError,
    UnknownPushProvider,
)
from protocol.requests import (
    Ack,
    AddMembers,
    ClaimKeyPackages,
    CreateConversation,
    DeleteConversation,
    DeliveryStateRequest,
    Leave,
    ListConversations,
    MarkRead,
    ReadPositions,
    RegisterPush,
    RemoveMembers,
    Request,
    Send,
    Subscribe,
)
from relay.base.ratelimits import RateLimits, list_cost
from relay.delivery.hub import Ephemeral, Hub, MembershipChange, ReadMark
from relay.mls.service import DeliveryService
from storage.base import ConversationInfo, NewMessage, Storage

if TYPE_CHECKING:
    from relay.base.config import Config
    from relay.delivery.connection import Connection
    from relay.delivery.fanout import FanOut
    from relay.offline.blobs import Blobs

log = logging.getLogger("relay.mls_ds")


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class HandlerParts:
    """The node's parts request handlers use: built once per node (relay/node.py)."""

    storage: Storage
    mls: DeliveryService
    hub: Hub
    fanout: FanOut
    blobs: Blobs
    config: Config
    push_providers: Container[str]
    #: Rate limits: a subscribe pays for the conversations it set up.
    node_limits: RateLimits


class Handlers:
    """One connection's request handlers, with the node's parts they use.

    Slotted, the parts copied in (no indirection on every request): one per
    connection, and idle connections are counted in tens of thousands."""

    __slots__ = (
        "blobs",
        "config",
        "conn",
        "fanout",
        "hub",
        "mls",
        "node_limits",
        "push_providers",
        "storage",
    )

    def __init__(self, conn: Connection, parts: HandlerParts) -> None:
        self.conn = conn
        self.storage = parts.storage
        self.mls = parts.mls
        self.hub = parts.hub
        self.fanout = parts.fanout
        self.blobs = parts.blobs
        self.config = parts.config
        self.push_providers = parts.push_providers
        self.node_limits = parts.node_limits

    async def handle(self, req: Request) -> bytes:
        match req:
            case Send():
                return await self.ephemeral(req)
            case CreateConversation():
                return await self.create(req)
            case AddMembers():
                return await self.add(req)
            case RemoveMembers():
                return await self.remove(req.id, req.conversation, list(req.members))
            case Leave():
                return await self.remove(req.id, req.conversation, [self.conn.user])
            case ListConversations():
                return await self.list(req)
            case Subscribe():
                return await self.subscribe(req)
            case Ack():
                return await self.ack(req)
            case ClaimKeyPackages():
                return await self.claim(req)
            case DeleteConversation():
                return await self.delete(req)
            case DeliveryStateRequest():
                return await self.delivery_state(req)
            case MarkRead():
                return await self.mark_read(req)
            case ReadPositions():
                return await self.read_positions(req)
            case RegisterPush():
                return await self.register_push(req)

    # --- offline devices and blobs (relay/offline/)

    async def delete(self, req: DeleteConversation) -> bytes:
        members = await self.storage.delete_conversation(
            req.conversation, self.conn.user, _now_ms()
        )
        self.mls.forget(req.conversation)
        self.fanout.publish_membership(
            MembershipChange(req.conversation, self.conn.user, (), tuple(members), 0)
        )
        # Its blobs go in the background (relay/offline/blobs.py): there may be any number.
        self.blobs.wake()
        return events.result(req.id, conversation=req.conversation, deleted=True)

    async def delivery_state(self, req: DeliveryStateRequest) -> bytes:
        states = await self.storage.delivery_state(req.conversation, self.conn.user, req.seqs)
        return events.result(
            req.id,
            conversation=req.conversation,
            states=[
                {"seq": st.seq, "devices": st.devices, "delivered": st.delivered,
                 "acknowledged": st.acknowledged}
                for st in states
            ],
        )  # fmt: skip

    async def mark_read(self, req: MarkRead) -> bytes:
        s = self.conn
        seq = await self.storage.set_read(req.conversation, s.user, req.seq, _now_ms())
        self.fanout.publish_read(ReadMark(req.conversation, s.user, s.device, seq))
        return events.result(req.id, conversation=req.conversation, seq=seq)

    async def read_positions(self, req: ReadPositions) -> bytes:
        reads = await self.storage.read_positions(req.conversation, self.conn.user)
        return events.result(
            req.id,
            conversation=req.conversation,
            reads=[{"user": user, "seq": seq} for user, seq in sorted(reads.items())],
        )

    async def register_push(self, req: RegisterPush) -> bytes:
        if req.provider and req.provider not in self.push_providers:
            raise UnknownPushProvider(f"no push provider named {text.excerpt(req.provider)} here")
        await self.storage.register_push(
            self.conn.user, self.conn.device, req.provider, req.zone, req.token, _now_ms()
        )
        return events.result(req.id, provider=req.provider)

    # --- MLS delivery service (relay/mls/service.py) ----------------------------------

    async def new_message(self, req: Send) -> NewMessage:
        """The stored form of a durable send (MLS sends are parsed and checked)."""
        return await self.mls.new_message(req, self.conn.user, self.conn.device, _now_ms())

    def new_message_nowait(self, req: Send) -> NewMessage | None:
        """The same without I/O; None when the conversation's kind is not cached."""
        ds = self.mls
        return ds.new_message_nowait(req, self.conn.user, self.conn.device, _now_ms())

    async def claim(self, req: ClaimKeyPackages) -> bytes:
        result = await self.mls.claim(self.conn.user, req.users, req.cipher_suite)
        return events.result(
            req.id,
            key_packages=[
                {"user": c.user, "device": c.device, "ref": c.ref, "key_package": c.data,
                 "last_resort": c.last_resort}
                for c in result.claimed
            ],
            missing=[{"user": u, "device": d} for u, d in result.missing],
        )  # fmt: skip

    def on_joined(self, conversation: bytes) -> None:
        """Streams hook: this device became a member (any node); send its Welcome."""
        self.conn.nursery.start_soon(self.send_welcomes, conversation)

    async def send_welcomes(self, conversation: bytes | None = None) -> None:
        """Push the device's Welcome inbox (at least once; acking seq removes one)."""
        try:
            inbox = await self.storage.welcomes_for(self.conn.user, self.conn.device)
        except RelayError:  # a task: must not fail the session; the next #subscribe retries
            log.warning("could not read the Welcome inbox", exc_info=True)
            return
        for w in inbox:
            if conversation is None or w.conversation == conversation:
                self.conn.send_frame(events.welcome(w.conversation, w.seq, w.epoch, w.welcome))

    async def ephemeral(self, req: Send) -> bytes:
        await self.storage.conversation_for_member(req.conversation, self.conn.user)
        self.fanout.publish_ephemeral(
            Ephemeral(req.conversation, self.conn.user, self.conn.device, _now_ms(), req.ciphertext)
        )
        return events.result(req.id)

    async def create(self, req: CreateConversation) -> bytes:
        info = await self.storage.create_conversation(
            req.conversation,
            self.conn.user,
            req.members,
            _now_ms(),
            mls_group_id=req.mls_group_id,
            external_join=req.external_join,
            storage_model=req.storage or self.config.storage_model,
            max_created=self.config.max_conversations_per_user,
            max_members=self.config.max_members,
        )
        members = await self.storage.members(req.conversation)
        self.fanout.publish_membership(
            MembershipChange(
                req.conversation, self.conn.user, tuple((m, 0) for m in members), (), 0
            )
        )
        return events.result(req.id, members=members, seq=info.last_seq)

    async def add(self, req: AddMembers) -> bytes:
        added = await self.storage.add_members(
            req.conversation,
            self.conn.user,
            req.members,
            _now_ms(),
            max_members=self.config.max_members,
        )
        last_seq = added[0].joined_seq if added else 0
        if added:
            self.fanout.publish_membership(
                MembershipChange(
                    req.conversation,
                    self.conn.user,
                    tuple((a.user, a.joined_seq) for a in added),
                    (),
                    last_seq,
                )
            )
        return events.result(req.id, added=[a.user for a in added])

    async def remove(self, rid: int, conversation: bytes, users: list[str]) -> bytes:
        info = await self.storage.conversation_for_member(conversation, self.conn.user)
        removed = await self.storage.remove_members(conversation, self.conn.user, users)
        if removed:
            self.fanout.publish_membership(
                MembershipChange(conversation, self.conn.user, (), tuple(removed), info.last_seq)
            )
        return events.result(rid, removed=removed)

    async def list(self, req: ListConversations) -> bytes:
        """One page, by id; ``next`` (the last id) unless it is the last page.
        One row more than the page tells whether another page follows."""
        convs = await self.storage.list_conversations_page(self.conn.user, req.after, req.limit + 1)
        page = convs[: req.limit]
        more = {"next": page[-1].conversation} if len(convs) > req.limit else {}
        self.conn.refund(list_cost(req.limit) - list_cost(len(page)))
        return events.result(
            req.id,
            conversations=[
                {
                    "conversation": c.conversation,
                    "last_seq": c.last_seq,
                    "joined_seq": c.joined_seq,
                    "first_seq": c.first_seq,
                }
                for c in page
            ],
            **more,
        )

    async def ack(self, req: Ack) -> bytes:
        seq = await self.storage.set_cursor(
            self.conn.user, self.conn.device, req.conversation, req.seq
        )
        return events.result(req.id, conversation=req.conversation, seq=seq)

    async def subscribe(self, req: Subscribe) -> bytes:
        """Resume every conversation from its cursor, then go live.

        Order matters: the hub starts recording published seqs (watch) and
        stashing membership changes BEFORE the storage snapshot, and the
        streams are registered after it; see Hub.watch."""
        s = self.conn
        if s.subscribed:
            raise AlreadySubscribed("already subscribed on this connection")
        stash = s.streams.start_stash()  # refuses one already being set up
        hub = self.hub
        seen = hub.watch()
        hub.add_user(s.streams)
        try:
            convs = await self.storage.list_conversations(s.user)
            stored = await self.storage.get_cursors(s.user, s.device)
            by_id = {c.conversation: c for c in convs}
            _check_cursors(req.cursors, by_id)
            self._merge_stash(by_id, stash)
        except BaseException:
            # Only this subscribe registered the connection (start_stash
            # admits one at a time), so undoing it undoes nothing else.
            hub.unwatch(seen)
            s.streams.stop_stash()
            hub.remove(s.streams, ())
            raise
        hub.unwatch(seen)
        s.streams.stop_stash()
        outdated: list[bytes] = []
        for conv, info in by_id.items():
            cursor = max(req.cursors.get(conv, stored.get(conv, 0)), info.joined_seq)
            if cursor < info.first_seq - 1:
                outdated.append(conv)
                # Replay what is left: a catch-up waiting for pruned seqs would never end.
                cursor = info.first_seq - 1
            hub.subscribe(s.streams, conv)
            s.streams.follow(conv, cursor + 1, max(info.last_seq, seen.get(conv, 0)))
        s.subscribed = True
        self.node_limits.charge_subscribed(s.user, len(by_id))  # the work it cost
        s.nursery.start_soon(self.send_welcomes)  # after this reply: it runs later
        # The reply is written when this returns, before the catch-up task
        # runs; the task then replays and announces CaughtUp (kick() makes it
        # announce even when there is nothing to replay).
        s.streams.kick()
        for conv in outdated:
            s.send_frame(
                events.info(
                    "OutdatedCursor",
                    "cursor is older than retained history; replaying what is left",
                    conversation=conv,
                    first_seq=by_id[conv].first_seq,
                )
            )
        return events.result(req.id, conversations=len(by_id))

    def _merge_stash(
        self, by_id: dict[bytes, ConversationInfo], stash: dict[bytes, int | None]
    ) -> None:
        for conv, joined in stash.items():
            if joined is None:
                by_id.pop(conv, None)
            elif conv not in by_id:
                by_id[conv] = ConversationInfo(conv, joined, joined, joined + 1)


def _check_cursors(cursors: dict[bytes, int], by_id: dict[bytes, ConversationInfo]) -> None:
    for conv, seq in cursors.items():
        info = by_id.get(conv)
        if info is None:
            raise NotMember("not a member of a conversation in cursors", conversation=conv)
        if seq > info.last_seq:
            raise FutureCursor(
                f"cursor {seq} is beyond the end of the conversation ({info.last_seq})",
                conversation=conv,
                last_seq=info.last_seq,
            )
