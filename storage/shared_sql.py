"""The dialect-neutral executor and the membership statements both backends share.

Statements are written once with ``?`` placeholders; an :class:`Exec` runs
them on one connection (``storage.sqlite_append.ex_for`` as they are,
``storage.postgres_mls.pg_exec`` with ``%s``).  Each membership question
(is this user a member, what does the member see, who are the members) is
asked here and nowhere else, so the two backends cannot drift apart.  The
functions block: they run in a worker thread, inside the caller's
transaction when it has one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from protocol.errors import ConversationExists, FutureCursor, NotMember
from storage.records import ConversationInfo


class Exec(Protocol):
    def __call__(self, sql: str, params: Sequence[Any] = ()) -> Any: ...


def insert_conversation(
    ex: Exec,
    conversation: bytes,
    creator: str,
    now_ms: int,
    mls_group_id: bytes | None,
    external_join: bool,
    storage_model: str,
) -> None:
    """The conversation's row (its members are the caller's: each dialect
    inserts a set its own way); ConversationExists when the id is taken."""
    created = ex(
        "INSERT INTO conversations (id, creator, created_ms, mls_group_id, external_join,"
        " storage_model) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING RETURNING id",
        (conversation, creator, now_ms, mls_group_id, external_join, storage_model),
    ).fetchone()
    if created is None:
        raise ConversationExists("conversation already exists")


#: A conversation as one member sees it (ConversationInfo's fields, in order).
INFO_SQL = (
    "SELECT c.id, c.last_seq, m.joined_seq, c.first_seq"
    " FROM members m JOIN conversations c ON c.id = m.conversation_id"
)


def _info(row: Sequence[Any]) -> ConversationInfo:
    return ConversationInfo(bytes(row[0]), int(row[1]), int(row[2]), int(row[3]))


def member_info(ex: Exec, conversation: bytes, user: str) -> ConversationInfo:
    """The conversation as ``user`` sees it; NotMember when not a member
    (which also covers a conversation that does not exist)."""
    row = ex(INFO_SQL + " WHERE c.id = ? AND m.user_did = ?", (conversation, user)).fetchone()
    if row is None:
        raise NotMember("not a member of this conversation")
    return _info(row)


def conversations_of(ex: Exec, user: str) -> list[ConversationInfo]:
    """Every conversation ``user`` is a member of, by id."""
    return [_info(r) for r in ex(INFO_SQL + " WHERE m.user_did = ? ORDER BY c.id", (user,))]


#: One #listConversations page (see :func:`conversations_page`).
PAGE_SQL = INFO_SQL + (
    " WHERE m.user_did = ? AND m.conversation_id > ? ORDER BY m.conversation_id LIMIT ?"
)


def conversations_page(ex: Exec, user: str, after: bytes, limit: int) -> list[ConversationInfo]:
    """One #listConversations page: ``user``'s conversations after ``after``,
    by id.  m.conversation_id, not c.id: the order and the bound must be the
    index's columns ((user_did, conversation_id): PostgreSQL migration 0010;
    SQLite's WITHOUT ROWID members_user_did_idx holds both), so the page
    walks the index from ``after`` instead of reading every membership."""
    return [_info(r) for r in ex(PAGE_SQL, (user, after, limit))]


def is_member(ex: Exec, conversation: bytes, user: str) -> bool:
    row = ex(
        "SELECT 1 FROM members WHERE conversation_id = ? AND user_did = ?", (conversation, user)
    ).fetchone()
    return row is not None


def member_users(ex: Exec, conversation: bytes) -> list[str]:
    """The members' user DIDs, sorted in Python: the same (code point) order on
    both backends, whatever the database collation."""
    rows = ex("SELECT user_did FROM members WHERE conversation_id = ?", (conversation,))
    return sorted(r[0] for r in rows)


# --- cursors and MLS groups --------------------------------------------------------


def cursors_of(ex: Exec, user: str, device: str) -> dict[bytes, int]:
    rows = ex(
        "SELECT conversation_id, seq FROM cursors WHERE user_did = ? AND device_id = ?",
        (user, device),
    )
    return {bytes(r[0]): int(r[1]) for r in rows}


def set_cursor(ex: Exec, user: str, device: str, conversation: bytes, seq: int, now_ms: int) -> int:
    """Store a member device's cursor, never moving it back; returns the stored
    seq.  NotMember, or FutureCursor past the last message.  (A CASE, not
    greatest() or max(): the one spelling both dialects read.)"""
    last_seq = member_info(ex, conversation, user).last_seq
    if seq > last_seq:
        raise FutureCursor("cursor beyond the last message", last_seq=last_seq)
    (stored,) = ex(
        "INSERT INTO cursors (user_did, device_id, conversation_id, seq, updated_ms)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_did, device_id, conversation_id)"
        " DO UPDATE SET seq = CASE WHEN excluded.seq > cursors.seq"
        " THEN excluded.seq ELSE cursors.seq END,"
        " updated_ms = excluded.updated_ms RETURNING seq",
        (user, device, conversation, seq, now_ms),
    ).fetchone()
    return int(stored)


def mls_group(ex: Exec, conversation: bytes) -> tuple[bool, bytes | None]:
    """(exists, MLS group id or None for a plain conversation)."""
    row = ex("SELECT mls_group_id FROM conversations WHERE id = ?", (conversation,)).fetchone()
    if row is None:
        return False, None
    return True, None if row[0] is None else bytes(row[0])
