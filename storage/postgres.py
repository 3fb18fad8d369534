"""PostgreSQL backend: sync psycopg 3 on Trio worker threads (see storage/connpool.py).

Every write that touches a conversation first locks its ``conversations``
row (``FOR UPDATE``); that row's ``last_seq`` is the only source of seqs, so
seqs stay gapless across any number of relay nodes.  Each job is one
``with conn.transaction():`` block on an autocommit connection.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from protocol.errors import (
    InternalBug,
    InvalidRequest,
    NotMember,
    RelayError,
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
)
from storage.migrate import migrate_postgres
from storage.pgconn import NO_STATEMENT_BOUNDS, PgConn, PgTimeouts, pg_pool
from storage.postgres_mls import append_mls, append_plain, append_plain_batch, pg_exec
from storage.postgres_offline import PgOfflineStorage

T = TypeVar("T")

#: The retention prune runs this many times the usual deadline (one job, many statements).
PRUNE_DEADLINE_FACTOR = 20


def _lock_for_member(conn: PgConn, conversation: bytes, actor: str) -> int:
    """Lock the conversation row and return last_seq; NotMember if the actor is
    not a member (which also covers a nonexistent conversation)."""
    row = conn.execute(
        "SELECT c.last_seq FROM conversations c JOIN members m ON m.conversation_id = c.id"
        " WHERE c.id = %s AND m.user_did = %s FOR UPDATE OF c",
        (conversation, actor),
    ).fetchone()
    if row is None:
        raise NotMember("not a member of this conversation")
    return int(row[0])


class PostgresStorage(PgOfflineStorage, Storage):
    def __init__(
        self,
        conninfo: str,
        *,
        pool_min: int = 2,
        pool_max: int = 10,
        connect_timeout: float = 3.0,
        timeouts: PgTimeouts | None = None,
    ) -> None:
        self._conninfo = conninfo
        self._connect_timeout = connect_timeout
        self._timeouts = PgTimeouts() if timeouts is None else timeouts
        self._pool = pg_pool(
            conninfo,
            min_size=pool_min,
            max_size=pool_max,
            connect_timeout=connect_timeout,
            timeouts=self._timeouts,
        )

    async def _tx(self, job: Callable[[PgConn], T], *, deadline_s: float | None = None) -> T:
        """Run ``job`` inside one transaction on a pooled connection."""

        def in_transaction(conn: PgConn) -> T:
            with conn.transaction():
                return job(conn)

        return await self._pool.run(in_transaction, deadline_s=deadline_s)

    @property
    def abandoned_jobs(self) -> int:
        """Jobs given up at their deadline (RELAY_DB_DEADLINE_S), for metrics."""
        return self._pool.abandoned

    # --- lifecycle -------------------------------------------------------------

    async def migrate(self) -> None:
        # A dedicated one-connection pool: the advisory lock is session-level
        # and must not leak into a pooled connection; closing it releases the
        # lock even if migrate_postgres() could not unlock.
        # No statement bounds: DDL may run long, and no request waits on it.
        dedicated = pg_pool(
            self._conninfo,
            min_size=0,
            max_size=1,
            connect_timeout=self._connect_timeout,
            timeouts=dataclasses.replace(NO_STATEMENT_BOUNDS, tcp_s=self._timeouts.tcp_s),
        )
        try:
            await dedicated.run(migrate_postgres)
        finally:
            await dedicated.aclose()
        await self._pool.fill()

    async def ping(self) -> None:
        await self._pool.run(lambda conn: conn.execute("SELECT 1").fetchone())

    async def aclose(self) -> None:
        await self._pool.aclose()

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

        def job(conn: PgConn) -> ConversationInfo:
            ex = pg_exec(conn)
            offline_sql.check_not_deleted(ex, conversation)
            if max_created:  # one creator's creations one at a time: the count holds
                quotas.lock(ex, quotas.PG_LOCK_SQL, f"conversations:{creator}")
                quotas.check_conversations(ex, creator, max_created, now_ms)
            shared_sql.insert_conversation(
                ex, conversation, creator, now_ms, mls_group_id, external_join, storage_model
            )
            conn.execute(
                "INSERT INTO members (conversation_id, user_did, joined_seq, added_ms)"
                " SELECT %s, u, 0, %s FROM unnest(%s::text[]) AS u",
                (conversation, now_ms, users),
            )
            return ConversationInfo(conversation, last_seq=0, joined_seq=0, first_seq=1)

        return await self._tx(job)

    async def add_members(
        self,
        conversation: bytes,
        actor: str,
        users: Sequence[str],
        now_ms: int,
        *,
        max_members: int = 0,
    ) -> list[AddedMember]:
        wanted = list(dict.fromkeys(users))

        def job(conn: PgConn) -> list[AddedMember]:
            last_seq = _lock_for_member(conn, conversation, actor)
            rows = conn.execute(
                "INSERT INTO members (conversation_id, user_did, joined_seq, added_ms)"
                " SELECT %s, u, %s, %s FROM unnest(%s::text[]) AS u"
                " ON CONFLICT DO NOTHING RETURNING user_did",
                (conversation, last_seq, now_ms, wanted),
            ).fetchall()
            added = {r[0] for r in rows}
            if added:  # under the conversation's row lock; raising rolls the additions back
                quotas.check_members(pg_exec(conn), conversation, max_members)
            return [AddedMember(u, last_seq) for u in wanted if u in added]

        return await self._tx(job)

    async def remove_members(
        self, conversation: bytes, actor: str, users: Sequence[str]
    ) -> list[str]:
        wanted = list(dict.fromkeys(users))

        def job(conn: PgConn) -> list[str]:
            _lock_for_member(conn, conversation, actor)
            rows = conn.execute(
                "DELETE FROM members WHERE conversation_id = %s AND user_did = ANY(%s::text[])"
                " RETURNING user_did",
                (conversation, wanted),
            ).fetchall()
            removed = {r[0] for r in rows}
            # A removed member's read positions and pending Welcomes are meaningless
            # (and must not reach it on resume); its messages stay.
            for table in ("cursors", "welcomes"):
                conn.execute(
                    f"DELETE FROM {table} WHERE conversation_id = %s"
                    " AND user_did = ANY(%s::text[])",
                    (conversation, list(removed)),
                )
            return [u for u in wanted if u in removed]

        return await self._tx(job)

    async def list_conversations(self, user: str) -> list[ConversationInfo]:
        def job(conn: PgConn) -> list[ConversationInfo]:
            return shared_sql.conversations_of(pg_exec(conn), user)

        return await self._pool.run(job)

    async def list_conversations_page(
        self, user: str, after: bytes, limit: int
    ) -> list[ConversationInfo]:
        def job(conn: PgConn) -> list[ConversationInfo]:
            return shared_sql.conversations_page(pg_exec(conn), user, after, limit)

        return await self._pool.run(job)

    async def conversation_for_member(self, conversation: bytes, user: str) -> ConversationInfo:
        def job(conn: PgConn) -> ConversationInfo:
            return shared_sql.member_info(pg_exec(conn), conversation, user)

        return await self._pool.run(job)

    async def members(self, conversation: bytes) -> list[str]:
        def job(conn: PgConn) -> list[str]:
            return shared_sql.member_users(pg_exec(conn), conversation)

        return await self._pool.run(job)

    # --- messages -------------------------------------------------------------

    async def append_messages(self, batch: Sequence[NewMessage]) -> list[Appended | RelayError]:
        if not batch:
            return []
        items = list(batch)
        if not any(m.kind or m.blob_key for m in items):
            # The common case: opaque or plain items only, one statement.
            return await self._pool.run(functools.partial(append_plain_batch, msgs=items))

        def job(conn: PgConn) -> list[Appended | RelayError]:
            # Every conversation of the batch, locked in id order (the order the
            # append function and prune use): no deadlock between nodes.
            flags = dict(
                conn.execute(
                    "SELECT id, mls_group_id IS NOT NULL FROM conversations"
                    " WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
                    (sorted({m.conversation for m in items}),),
                ).fetchall()
            )
            out: list[Appended | RelayError | None] = [None] * len(items)
            plain = [i for i, m in enumerate(items) if not m.kind and not flags.get(m.conversation)]
            if plain:
                append_plain(conn, [items[i] for i in plain], plain, out)
            ex = pg_exec(conn)
            for i, m in enumerate(items):
                if out[i] is None:
                    out[i] = append_mls(conn, ex, m)
            for m, r in zip(items, out, strict=True):
                if m.blob_key and isinstance(r, Appended) and not r.duplicate:
                    offline_sql.attach_blob(ex, m, r.seq)
            return [r for r in out if r is not None]

        results = await self._tx(job)
        if len(results) != len(items):
            raise InternalBug("append returned a wrong number of results")
        return results

    async def read_messages(
        self, conversation: bytes, user: str, after_seq: int, limit: int, max_bytes: int = 0
    ) -> list[StoredMessage]:
        # One round trip: the membership row, laterally joined to the page,
        # cut where the ciphertexts before a row reach max_bytes (a running
        # sum over the LIMITed rows; octet_length reads no TOAST value).
        sql = """
        SELECT g.seq, g.sender_did, g.sender_device, g.ciphertext, g.created_ms,
               g.blob_key, g.blob_size
          FROM members m LEFT JOIN LATERAL (
              SELECT * FROM (
                  SELECT p.*, sum(octet_length(p.ciphertext)) OVER (ORDER BY p.seq)
                              - octet_length(p.ciphertext) AS before
                    FROM (SELECT seq, sender_did, sender_device, ciphertext, created_ms,
                                 blob_key, blob_size
                            FROM messages
                           WHERE conversation_id = m.conversation_id
                             AND seq > greatest(%s, m.joined_seq)
                           ORDER BY seq LIMIT %s) p) w
               WHERE w.before < %s) g ON true
         WHERE m.conversation_id = %s AND m.user_did = %s ORDER BY g.seq
        """

        def job(conn: PgConn) -> list[StoredMessage]:
            # Binary results: ciphertext arrives as raw bytes, not hex text
            # decoded under the GIL (the catch-up path reads 1,000 rows a page).
            budget = max_bytes or 1 << 62
            params = (after_seq, max(limit, 0), budget, conversation, user)
            rows = conn.execute(sql, params, binary=True).fetchall()
            if not rows:
                raise NotMember("not a member of this conversation")
            return [
                StoredMessage(
                    conversation, r[0], r[1], r[2], bytes(r[3]), r[4], r[5] or "", r[6] or 0
                )
                for r in rows
                if r[0] is not None
            ]

        return await self._pool.run(job)

    async def prune_messages(self, older_than_ms: int) -> int:
        def job(conn: PgConn) -> int:
            ex = pg_exec(conn)
            ids = retention_sql.prune_candidates(ex, older_than_ms)
            if not ids:
                return 0
            # Same lock order as appends (no deadlock); once locked, the statements
            # below (new snapshots under READ COMMITTED) see every committed append
            # and commit, so neither first_seq nor the kept commit can be stale.
            conn.execute(
                "SELECT 1 FROM conversations WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (ids,)
            )
            return sum(retention_sql.prune_conversation(ex, c, older_than_ms) for c in ids)

        # One transaction over every candidate conversation: each statement is
        # bounded by statement_timeout, the whole job gets a longer deadline.
        deadline = self._timeouts.deadline_s
        if deadline is not None:
            deadline *= PRUNE_DEADLINE_FACTOR
        return await self._tx(job, deadline_s=deadline)

    # --- cursors ------------------------------------------------------------

    async def get_cursors(self, user: str, device: str) -> dict[bytes, int]:
        def job(conn: PgConn) -> dict[bytes, int]:
            return shared_sql.cursors_of(pg_exec(conn), user, device)

        return await self._pool.run(job)

    async def set_cursor(self, user: str, device: str, conversation: bytes, seq: int) -> int:
        if seq < 0:
            raise InvalidRequest("cursor seq must not be negative")

        def job(conn: PgConn) -> int:
            ex, now_ms = pg_exec(conn), time.time_ns() // 1_000_000
            stored = shared_sql.set_cursor(ex, user, device, conversation, seq, now_ms)
            mls_sql.ack_welcomes(ex, user, device, conversation, seq)
            return stored

        return await self._tx(job)

    # --- MLS delivery service -------------------------------------------------

    async def mls_group(self, conversation: bytes) -> tuple[bool, bytes | None]:
        def job(conn: PgConn) -> tuple[bool, bytes | None]:
            return shared_sql.mls_group(pg_exec(conn), conversation)

        return await self._pool.run(job)

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
        def job(conn: PgConn) -> list[bool]:
            # Serialize uploads of one user (the last-resort swap reads then
            # writes; the quotas count what the upload wrote, the device bound
            # across the user's devices).
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"kp:{user}",))
            return mls_sql.put_key_packages(
                pg_exec(conn), user, device, packages, now_ms, max_stored, max_devices
            )

        return await self._tx(job)

    async def claim_key_packages(
        self, claimer: str, users: Sequence[str], cipher_suite: int, now_s: int, now_ms: int
    ) -> ClaimResult:
        def job(conn: PgConn) -> ClaimResult:
            return mls_sql.claim_key_packages(
                pg_exec(conn), claimer, users, cipher_suite, now_s, now_ms,
                lock=" FOR UPDATE SKIP LOCKED",
            )  # fmt: skip

        return await self._tx(job)
