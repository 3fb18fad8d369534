"""SQLite backend (the embedded default), stdlib sqlite3 on Trio worker threads.

Same pool machinery as PostgreSQL (:mod:`storage.connpool`): a one-connection
writer pool serializes writers in Trio (a cancelled waiter never runs), and a
small reader pool serves reads concurrently thanks to WAL.  A running
statement is stopped with ``Connection.interrupt()``.  Every write is a
``BEGIN IMMEDIATE`` transaction: it takes the database write lock up front,
which also serializes other processes on the same file, and it is where seqs
are assigned from ``conversations.last_seq``.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from protocol.errors import (
    InvalidRequest,
    RelayError,
    StorageError,
    Unavailable,
)
from storage import mls_sql, offline_sql, quotas, retention_sql, shared_sql
from storage.base import (
    AddedMember,
    Appended,
    ClaimResult,
    ConversationInfo,
    NewKeyPackage,
    NewMessage,
    Storage,
    StoredMessage,
    within_bytes,
)
from storage.connpool import ConnectionPool, Driver
from storage.migrate import migrate_sqlite
from storage.offline import Job, OfflineStorage
from storage.sqlite_append import append_blob_aware, ex_for, many_for

T = TypeVar("T")
Conn = sqlite3.Connection


# Error classes that mean "the database cannot be used right now" (locked for
# longer than busy_timeout, disk trouble): retryable, like a PostgreSQL outage.
_OUTAGE_PREFIXES = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_IOERR",
    "SQLITE_CANTOPEN",
    "SQLITE_FULL",
    "SQLITE_PROTOCOL",
    "SQLITE_READONLY",
    "SQLITE_INTERRUPT",
)


def translate_sqlite_error(exc: Exception) -> RelayError | None:
    if isinstance(exc, OSError):  # e.g. the database directory cannot be created
        return Unavailable(f"database unavailable ({type(exc).__name__})")
    if not isinstance(exc, sqlite3.Error):
        return None
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(_OUTAGE_PREFIXES):
        return Unavailable(f"database unavailable ({name})")
    return StorageError(f"database error ({name or type(exc).__name__})")


def _enable_wal(conn: Conn, patience_s: float) -> None:
    """Switch a (possibly brand-new) database to WAL.  When several
    connections open a new file at once, SQLite answers SQLITE_BUSY at once
    to all but one (deadlock avoidance: the busy timeout does not apply), so
    retry briefly.  Runs in a worker thread: sleeping blocks nobody."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc).lower():
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def sqlite_connect(path: Path, busy_timeout_ms: int) -> Conn:
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: the sqlite3 module issues no implicit BEGIN/COMMIT;
    # transactions are explicit.  The pool guarantees one thread at a time.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        _enable_wal(conn, busy_timeout_ms / 1000)
        # FULL: an acknowledged send survives a power loss, not just a crash.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def sqlite_pool(
    path: Path, *, min_size: int = 0, max_size: int = 4, busy_timeout_ms: int = 5000
) -> ConnectionPool[Conn]:
    driver: Driver[Conn] = Driver(
        connect=functools.partial(sqlite_connect, path, busy_timeout_ms),
        cancel=lambda conn: conn.interrupt(),
        reusable=lambda conn: not conn.in_transaction,
        close=lambda conn: conn.close(),
        translate=translate_sqlite_error,
    )
    return ConnectionPool(driver, min_size=min_size, max_size=max_size)


def _transaction(begin: str, job: Callable[[Conn], T], conn: Conn) -> T:
    conn.execute(begin)
    try:
        result = job(conn)
        conn.execute("COMMIT")
        return result
    except BaseException:
        # An interrupted statement may already have rolled the transaction back.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _member_info(conn: Conn, conversation: bytes, user: str) -> ConversationInfo:
    return shared_sql.member_info(ex_for(conn), conversation, user)


class SqliteStorage(OfflineStorage, Storage):
    def __init__(self, path: str | Path, *, readers: int = 4, busy_timeout_ms: int = 5000) -> None:
        if str(path) in ("", ":memory:"):
            raise ValueError("SQLite storage needs a file (readers use separate connections)")
        # The one-connection writer pool is the Trio-side writer lock.
        self._writer = sqlite_pool(Path(path), max_size=1, busy_timeout_ms=busy_timeout_ms)
        self._readers = sqlite_pool(Path(path), max_size=readers, busy_timeout_ms=busy_timeout_ms)

    async def _write(self, job: Callable[[Conn], T]) -> T:
        return await self._writer.run(functools.partial(_transaction, "BEGIN IMMEDIATE", job))

    async def _read(self, job: Callable[[Conn], T]) -> T:
        # A read transaction gives multi-statement reads one consistent snapshot.
        return await self._readers.run(functools.partial(_transaction, "BEGIN", job))

    # --- lifecycle -------------------------------------------------------------

    async def _offline_read(self, job: Job[T]) -> T:
        return await self._read(lambda conn: job(ex_for(conn), many_for(conn)))

    async def _offline_write(self, job: Job[T]) -> T:
        return await self._write(lambda conn: job(ex_for(conn), many_for(conn)))

    async def migrate(self) -> None:
        await self._writer.run(migrate_sqlite)

    async def ping(self) -> None:
        await self._readers.run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def aclose(self) -> None:
        await self._writer.aclose()
        await self._readers.aclose()

    # --- conversations and members -----------------------------------------

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
        users = list(dict.fromkeys([creator, *members]))
        quotas.check_member_count(len(users), max_members)

        def job(conn: Conn) -> ConversationInfo:
            ex = ex_for(conn)
            offline_sql.check_not_deleted(ex, conversation)
            quotas.check_conversations(ex, creator, max_created, now_ms)
            shared_sql.insert_conversation(
                ex, conversation, creator, now_ms, mls_group_id, external_join, storage_model
            )
            conn.executemany(
                "INSERT INTO members (conversation_id, user_did, joined_seq, added_ms)"
                " VALUES (?, ?, 0, ?)",
                [(conversation, u, now_ms) for u in users],
            )
            return ConversationInfo(conversation, last_seq=0, joined_seq=0, first_seq=1)

        return await self._write(job)

    async def add_members(
        self,
        conversation: bytes,
        actor: str,
        users: Sequence[str],
        now_ms: int,
        *,
        max_members: int = 0,
    ) -> list[AddedMember]:
        def job(conn: Conn) -> list[AddedMember]:
            last_seq = _member_info(conn, conversation, actor).last_seq
            added = []
            for user in dict.fromkeys(users):
                if conn.execute(
                    "INSERT INTO members (conversation_id, user_did, joined_seq, added_ms)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING 1",
                    (conversation, user, last_seq, now_ms),
                ).fetchone():
                    added.append(AddedMember(user, last_seq))
            if added:  # raising rolls the additions back
                quotas.check_members(ex_for(conn), conversation, max_members)
            return added

        return await self._write(job)

    async def remove_members(
        self, conversation: bytes, actor: str, users: Sequence[str]
    ) -> list[str]:
        def job(conn: Conn) -> list[str]:
            _member_info(conn, conversation, actor)
            removed = []
            for user in dict.fromkeys(users):
                if conn.execute(
                    "DELETE FROM members WHERE conversation_id = ? AND user_did = ? RETURNING 1",
                    (conversation, user),
                ).fetchone():
                    removed.append(user)
                    # Its read positions and pending Welcomes are meaningless now
                    # (and must not reach it on resume); its messages stay.
                    for table in ("cursors", "welcomes"):
                        conn.execute(
                            f"DELETE FROM {table} WHERE conversation_id = ? AND user_did = ?",
                            (conversation, user),
                        )
            return removed

        return await self._write(job)

    async def list_conversations(self, user: str) -> list[ConversationInfo]:
        def job(conn: Conn) -> list[ConversationInfo]:
            return shared_sql.conversations_of(ex_for(conn), user)

        return await self._read(job)

    async def list_conversations_page(
        self, user: str, after: bytes, limit: int
    ) -> list[ConversationInfo]:
        def job(conn: Conn) -> list[ConversationInfo]:
            return shared_sql.conversations_page(ex_for(conn), user, after, limit)

        return await self._read(job)

    async def conversation_for_member(self, conversation: bytes, user: str) -> ConversationInfo:
        job = functools.partial(_member_info, conversation=conversation, user=user)
        return await self._read(job)

    async def members(self, conversation: bytes) -> list[str]:
        def job(conn: Conn) -> list[str]:
            return shared_sql.member_users(ex_for(conn), conversation)

        return await self._read(job)

    # --- messages -------------------------------------------------------------

    async def append_messages(self, batch: Sequence[NewMessage]) -> list[Appended | RelayError]:
        if not batch:
            return []
        items = list(batch)
        return await self._write(lambda conn: [append_blob_aware(conn, m) for m in items])

    async def read_messages(
        self, conversation: bytes, user: str, after_seq: int, limit: int, max_bytes: int = 0
    ) -> list[StoredMessage]:
        def job(conn: Conn) -> list[StoredMessage]:
            joined = _member_info(conn, conversation, user).joined_seq
            after, n = max(after_seq, joined), max(limit, 0)
            if max_bytes:  # the sizes first (length() reads no blob), then the rows that fit
                sizes = conn.execute(
                    "SELECT length(ciphertext) FROM messages"
                    " WHERE conversation_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                    (conversation, after, n),
                )
                n = within_bytes([r[0] or 0 for r in sizes], max_bytes)
            rows = conn.execute(
                "SELECT seq, sender_did, sender_device, ciphertext, created_ms, blob_key, blob_size"
                " FROM messages WHERE conversation_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (conversation, after, n),
            )
            return [
                StoredMessage(
                    conversation, r[0], r[1], r[2], bytes(r[3]), r[4], r[5] or "", r[6] or 0
                )
                for r in rows
            ]

        return await self._read(job)

    async def prune_messages(self, older_than_ms: int) -> int:
        def job(conn: Conn) -> int:  # BEGIN IMMEDIATE: no append runs meanwhile
            ids = retention_sql.prune_candidates(ex_for(conn), older_than_ms)
            return sum(
                retention_sql.prune_conversation(ex_for(conn), c, older_than_ms) for c in ids
            )

        return await self._write(job)

    # --- cursors ------------------------------------------------------------

    async def get_cursors(self, user: str, device: str) -> dict[bytes, int]:
        def job(conn: Conn) -> dict[bytes, int]:
            return shared_sql.cursors_of(ex_for(conn), user, device)

        return await self._read(job)

    async def set_cursor(self, user: str, device: str, conversation: bytes, seq: int) -> int:
        if seq < 0:
            raise InvalidRequest("cursor seq must not be negative")

        def job(conn: Conn) -> int:
            ex, now_ms = ex_for(conn), time.time_ns() // 1_000_000
            stored = shared_sql.set_cursor(ex, user, device, conversation, seq, now_ms)
            mls_sql.ack_welcomes(ex, user, device, conversation, seq)
            return stored

        return await self._write(job)

    # --- MLS delivery service -------------------------------------------------

    async def mls_group(self, conversation: bytes) -> tuple[bool, bytes | None]:
        def job(conn: Conn) -> tuple[bool, bytes | None]:
            return shared_sql.mls_group(ex_for(conn), conversation)

        return await self._read(job)

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
        return await self._write(
            lambda conn: mls_sql.put_key_packages(
                ex_for(conn), user, device, packages, now_ms, max_stored, max_devices
            )
        )

    async def claim_key_packages(
        self, claimer: str, users: Sequence[str], cipher_suite: int, now_s: int, now_ms: int
    ) -> ClaimResult:
        return await self._write(
            lambda conn: mls_sql.claim_key_packages(
                ex_for(conn), claimer, users, cipher_suite, now_s, now_ms
            )
        )
