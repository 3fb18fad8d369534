"""The parts of the storage contract whose SQL is shared by both backends.

A mixin: each backend supplies ``_offline_read`` and ``_offline_write``, which
run a job with an :class:`~storage.shared_sql.Exec` and a
:class:`~storage.offline_sql.Many` on a connection (writes in one
transaction).  The SQL lives in :mod:`storage.offline_sql` (offline devices
and blobs), :mod:`storage.retention_sql` and :mod:`storage.mls_sql`; methods
whose backends differ (locking, batching) stay in the backends.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import TypeVar

from storage import mls_sql, quotas, retention_sql
from storage import offline_sql as q
from storage.base import (
    BlobInfo,
    ConversationKind,
    DeliveryState,
    KeyPackageCount,
    PendingWelcome,
    PushRegistration,
)
from storage.shared_sql import Exec

T = TypeVar("T")
Job = Callable[[Exec, q.Many], T]


class OfflineStorage(abc.ABC):
    #: The statement that serializes one user's quota checks (storage/quotas.py):
    #: none on SQLite, whose writer is serial; PostgreSQL's advisory lock.
    _quota_lock_sql = ""

    @abc.abstractmethod
    async def _offline_read(self, job: Job[T]) -> T: ...

    @abc.abstractmethod
    async def _offline_write(self, job: Job[T]) -> T: ...

    async def conversation_kind(self, conversation: bytes) -> ConversationKind:
        return await self._offline_read(lambda ex, _: q.conversation_kind(ex, conversation))

    async def delete_conversation(self, conversation: bytes, actor: str, now_ms: int) -> list[str]:
        return await self._offline_write(
            lambda ex, _: q.delete_conversation(ex, conversation, actor, now_ms)
        )

    async def touch_devices(self, devices: Sequence[tuple[str, str]], now_ms: int) -> None:
        if devices:
            await self._offline_write(lambda _, many: q.touch_devices(many, devices, now_ms))

    async def register_push(
        self, user: str, device: str, provider: str, zone: str, token: str, now_ms: int
    ) -> None:
        await self._offline_write(
            lambda ex, _: q.register_push(ex, user, device, provider, zone, token, now_ms)
        )

    async def drop_push_token(self, user: str, device: str, token: str) -> None:
        await self._offline_write(lambda ex, _: q.drop_push_token(ex, user, device, token))

    async def push_registrations(
        self, conversations: Sequence[bytes]
    ) -> dict[bytes, list[PushRegistration]]:
        return await self._offline_read(lambda ex, _: q.push_registrations(ex, conversations))

    async def record_deliveries(
        self, rows: Sequence[tuple[str, str, bytes, int]], now_ms: int
    ) -> None:
        if rows:
            await self._offline_write(lambda _, many: q.record_deliveries(many, rows, now_ms))

    async def delivery_state(
        self, conversation: bytes, sender: str, seqs: Sequence[int]
    ) -> list[DeliveryState]:
        return await self._offline_read(
            lambda ex, _: q.delivery_state(ex, conversation, sender, seqs)
        )

    async def set_read(self, conversation: bytes, user: str, seq: int, now_ms: int) -> int:
        return await self._offline_write(
            lambda ex, _: q.set_read(ex, conversation, user, seq, now_ms)
        )

    async def read_positions(self, conversation: bytes, user: str) -> dict[str, int]:
        return await self._offline_read(lambda ex, _: q.read_positions(ex, conversation, user))

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
        def job(ex: Exec, _: q.Many) -> None:
            if quota_bytes:  # one user's registrations one at a time (storage/quotas.py)
                quotas.lock(ex, self._quota_lock_sql, f"blobs:{user}")
            q.put_blob(ex, conversation, key, user, device, size, now_ms, quota_bytes)

        await self._offline_write(job)

    async def blob_for_reader(self, conversation: bytes, key: str, user: str) -> BlobInfo:
        return await self._offline_read(
            lambda ex, _: q.blob_for_reader(ex, conversation, key, user)
        )

    async def collect_blobs(self, orphaned_before_ms: int, limit: int) -> list[tuple[bytes, str]]:
        return await self._offline_read(
            lambda ex, _: q.collect_blobs(ex, orphaned_before_ms, limit)
        )

    async def forget_blobs(self, blobs: Sequence[tuple[bytes, str]]) -> None:
        if blobs:
            await self._offline_write(lambda _, many: q.forget_blobs(many, blobs))

    # --- retention and MLS reads (storage/retention_sql.py, storage/mls_sql.py) ---

    async def prune_group_infos(self, older_than_ms: int) -> int:
        return await self._offline_write(
            lambda ex, _: retention_sql.prune_group_infos(ex, older_than_ms)
        )

    async def consume_token(self, jti: str, user: str, expires_ms: int, now_ms: int) -> bool:
        return await self._offline_write(
            lambda ex, _: retention_sql.consume_token(ex, jti, user, expires_ms, now_ms)
        )

    async def purge_token_uses(self, now_ms: int) -> int:
        return await self._offline_write(lambda ex, _: retention_sql.purge_token_uses(ex, now_ms))

    async def key_package_counts(self, user: str, device: str, now_s: int) -> list[KeyPackageCount]:
        return await self._offline_read(
            lambda ex, _: mls_sql.key_package_counts(ex, user, device, now_s)
        )

    async def key_package_devices(self, user: str, device: str) -> tuple[bool, int]:
        return await self._offline_read(lambda ex, _: mls_sql.key_package_devices(ex, user, device))

    async def welcomes_for(self, user: str, device: str) -> list[PendingWelcome]:
        return await self._offline_read(lambda ex, _: mls_sql.welcomes_for(ex, user, device))

    async def latest_group_info(self, conversation: bytes, user: str) -> tuple[int, bytes]:
        return await self._offline_read(
            lambda ex, _: mls_sql.latest_group_info(ex, conversation, user)
        )
