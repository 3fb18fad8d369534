"""Typed request methods of the Python SDK: one thin wrapper over
:meth:`mls_relay_client.client.RelayClient.request` per request of docs/PROTOCOL.md
(but ``#subscribe``, which the client sends itself on every connection).

They live apart from the connection machinery in :mod:`mls_relay_client.client` (which
inherits them) so that each stays small: here only request bodies and the
shape of their results.  Each raises
:class:`~mls_relay_client.events.RequestFailed` when the relay answers with an
error, and :class:`~mls_relay_client.events.ConnectionLost` when the connection
drops under a request that is not safe to send twice (see ``_IDEMPOTENT`` in
:mod:`mls_relay_client.client`); the others are sent again on the next connection.
"""

from __future__ import annotations

import uuid
from typing import Any

import trio

from .events import ClaimedKeyPackage, DeliveryState, KeyPackageClaim, RequestFailed


class Requests:
    """The typed request methods; a subclass implements :meth:`request`."""

    async def request(self, t: str, **body: Any) -> dict[str, Any]:
        """Send any request and wait for its #result body (RelayClient implements it)."""
        raise NotImplementedError

    # --- conversations -------------------------------------------------------------

    async def create_conversation(
        self,
        conversation: bytes,
        members: list[str],
        *,
        mls: bool = False,
        group_id: bytes | None = None,
        external_join: bool = False,
        storage: str = "",
    ) -> list[str]:
        """Create a conversation with you and ``members``; returns all members.

        ``mls``: an MLS conversation (the relay checks each send's MLS header),
        for group ``group_id`` (default: the conversation id); ``external_join``
        lets non-members join it by external commit.  ``storage`` is "inline"
        or "blob" (default: the relay's ``RELAY_STORAGE_MODEL``)."""
        options: dict[str, Any] = {}
        if mls:
            options["mls"] = True
        if group_id is not None:
            options["group_id"] = group_id
        if external_join:
            options["external_join"] = True
        if storage:
            options["storage"] = storage
        reply = await self.request(
            "#createConversation", conversation=conversation, members=members, **options
        )
        return list(reply.get("members", []))

    async def add_members(self, conversation: bytes, members: list[str]) -> list[str]:
        reply = await self.request("#addMembers", conversation=conversation, members=members)
        return list(reply.get("added", []))

    async def remove_members(self, conversation: bytes, members: list[str]) -> list[str]:
        reply = await self.request("#removeMembers", conversation=conversation, members=members)
        return list(reply.get("removed", []))

    async def leave(self, conversation: bytes) -> list[str]:
        """Remove yourself; returns who was removed (you, or nobody)."""
        return list((await self.request("#leave", conversation=conversation))["removed"])

    async def delete_conversation(self, conversation: bytes) -> None:
        """Delete the conversation and everything stored for it (its creator only:
        ``Forbidden`` otherwise).  Its id is never reused."""
        await self.request("#deleteConversation", conversation=conversation)

    async def list_conversations_page(
        self, after: bytes | None = None, limit: int | None = None
    ) -> tuple[list[dict[str, Any]], bytes | None]:
        """One page of your conversations by id (at most ``limit``, the relay's
        default and maximum 500), after ``after``; and the ``after`` of the
        next page, None on the last."""
        body: dict[str, Any] = {}
        if after is not None:
            body["after"] = after
        if limit is not None:
            body["limit"] = limit
        reply = await self.request("#listConversations", **body)
        return list(reply["conversations"]), reply.get("next")

    async def list_conversations(self, page_size: int | None = None) -> list[dict[str, Any]]:
        """Every conversation you are a member of, by id, page after page.

        A page counts as several requests against your rate (docs/PROTOCOL.md,
        "Rate"): a ``RateLimited`` page is asked again after ``retry_after_ms``."""
        out: list[dict[str, Any]] = []
        after: bytes | None = None
        while True:
            try:
                page, after = await self.list_conversations_page(after, page_size)
            except RequestFailed as exc:
                if exc.error != "RateLimited":
                    raise
                await trio.sleep(max(1, int(exc.body.get("retry_after_ms", 1000))) / 1000)
                continue
            out.extend(page)
            if after is None:
                return out

    # --- messages ------------------------------------------------------------------

    async def send(
        self,
        conversation: bytes,
        ciphertext: bytes,
        client_message_id: str | None = None,
        *,
        welcome: bytes = b"",
        group_info: bytes = b"",
        removes: list[str] | None = None,
    ) -> int:
        """Store a message; returns its seq once the relay has committed it.

        With an MLS commit only: ``welcome`` for the members it adds,
        ``group_info`` of the epoch it creates, ``removes`` the DIDs the relay
        removes from the members if the commit wins."""
        options: dict[str, Any] = {}
        if welcome:
            options["welcome"] = welcome
        if group_info:
            options["group_info"] = group_info
        if removes:
            options["removes"] = removes
        reply = await self.request(
            "#send",
            conversation=conversation,
            ciphertext=ciphertext,
            client_message_id=client_message_id or uuid.uuid4().hex,
            **options,
        )
        return int(reply["seq"])

    async def send_blob(
        self, conversation: bytes, blob: str, client_message_id: str | None = None
    ) -> int:
        """Store a message whose ciphertext you uploaded over HTTP first
        (``POST /v1/conversations/<hex id>/blobs``, blob conversations only);
        ``blob`` is the key that upload returned.  Returns the seq."""
        reply = await self.request(
            "#send",
            conversation=conversation,
            blob=blob,
            client_message_id=client_message_id or uuid.uuid4().hex,
        )
        return int(reply["seq"])

    async def send_ephemeral(self, conversation: bytes, ciphertext: bytes) -> None:
        """Push to the members' connected devices, never stored (typing and the
        like).  Sent again after a reconnect, so it may arrive twice."""
        await self.request(
            "#send", conversation=conversation, ciphertext=ciphertext, ephemeral=True
        )

    # --- positions -----------------------------------------------------------------

    async def ack(self, conversation: bytes, seq: int) -> int:
        """Move this device's stored cursor (where a fresh connection resumes)."""
        return int((await self.request("#ack", conversation=conversation, seq=seq))["seq"])

    async def mark_read(self, conversation: bytes, seq: int) -> int:
        """Publish how far you have read (per user, never backwards); returns the
        stored position, which may be past ``seq``.  Other devices get ``#read``."""
        reply = await self.request("#markRead", conversation=conversation, seq=seq)
        return int(reply["seq"])

    async def read_positions(self, conversation: bytes) -> dict[str, int]:
        """user -> read position, for the current members that published one."""
        reply = await self.request("#readPositions", conversation=conversation)
        return {entry["user"]: int(entry["seq"]) for entry in reply["reads"]}

    async def delivery_state(self, conversation: bytes, seqs: list[int]) -> list[DeliveryState]:
        """Delivery of your own messages among ``seqs``; others' are left out."""
        reply = await self.request("#deliveryState", conversation=conversation, seqs=seqs)
        return [
            DeliveryState(s["seq"], s["devices"], s["delivered"], s["acknowledged"])
            for s in reply["states"]
        ]

    # --- devices -------------------------------------------------------------------

    async def register_push(self, provider: str, token: str, zone: str = "") -> None:
        """Have ``provider`` (one of the relay's ``RELAY_PUSH_PROVIDERS``) notified,
        with ``token``, of messages that arrive while this device is offline."""
        await self.request("#registerPush", provider=provider, zone=zone, token=token)

    async def unregister_push(self) -> None:
        """Stop push notifications to this device."""
        await self.request("#registerPush", provider="", token="")

    async def claim_key_packages(self, users: list[str], cipher_suite: int) -> KeyPackageClaim:
        """One KeyPackage of each device of ``users`` for ``cipher_suite``, to add
        them to an MLS group.  A KeyPackage is handed out at most once, except a
        device's last-resort one, which it gets only when it has nothing else."""
        reply = await self.request("#claimKeyPackages", users=users, cipher_suite=cipher_suite)
        return KeyPackageClaim(
            tuple(
                ClaimedKeyPackage(
                    k["user"], k["device"], k["ref"], k["key_package"], k["last_resort"]
                )
                for k in reply["key_packages"]
            ),
            tuple((m["user"], m["device"]) for m in reply["missing"]),
        )
