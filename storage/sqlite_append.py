"""SQLite appends and statement adapters (split from storage/sqlite.py).

Appends run one message at a time inside the writer's ``BEGIN IMMEDIATE``
transaction: SQLite has one writer, so the transaction is the lock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from protocol.errors import MLSValidationError, NotMember, RelayError
from storage import mls_sql, offline_sql, shared_sql
from storage.base import Appended, NewMessage

Conn = sqlite3.Connection


def ex_for(conn: Conn) -> shared_sql.Exec:
    def ex(sql: str, params: Sequence[Any] = ()) -> Any:
        return conn.execute(sql, params)

    return ex


def _append_one(conn: Conn, msg: NewMessage) -> Appended | RelayError:
    if msg.kind:
        return mls_sql.append_mls_sqlite(ex_for(conn), msg)
    row = conn.execute(
        "SELECT c.mls_group_id IS NOT NULL FROM members m JOIN conversations c"
        " ON c.id = m.conversation_id WHERE m.conversation_id = ? AND m.user_did = ?",
        (msg.conversation, msg.sender),
    ).fetchone()
    if row is None:
        return NotMember("not a member of this conversation")
    if row[0]:
        return MLSValidationError(
            "this MLS conversation accepts MLSMessages only", field="ciphertext"
        )
    dup = conn.execute(
        "SELECT seq, created_ms FROM messages WHERE conversation_id = ? AND sender_did = ?"
        " AND sender_device = ? AND client_message_id = ?",
        (msg.conversation, msg.sender, msg.device, msg.client_message_id),
    ).fetchone()
    if dup is not None:
        return Appended(msg.conversation, dup[0], dup[1], duplicate=True)
    (seq,) = conn.execute(
        "UPDATE conversations SET last_seq = last_seq + 1 WHERE id = ? RETURNING last_seq",
        (msg.conversation,),
    ).fetchone()
    conn.execute(
        "INSERT INTO messages (conversation_id, seq, sender_did, sender_device,"
        " client_message_id, ciphertext, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (msg.conversation, seq, msg.sender, msg.device, msg.client_message_id,
         msg.ciphertext, msg.created_ms),
    )  # fmt: skip
    return Appended(msg.conversation, seq, msg.created_ms, duplicate=False)


def many_for(conn: Conn) -> offline_sql.Many:
    def many(sql: str, rows: Sequence[Sequence[Any]]) -> None:
        conn.executemany(sql, rows)

    return many


def append_blob_aware(conn: Conn, msg: NewMessage) -> Appended | RelayError:
    result = _append_one(conn, msg)
    if msg.blob_key and isinstance(result, Appended) and not result.duplicate:
        offline_sql.attach_blob(ex_for(conn), msg, result.seq)
    return result
