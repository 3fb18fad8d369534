"""SQL for offline devices and large payloads, shared by both backends.

Delivery state, read positions, devices with their push registration, blobs
and conversation deletion (docs/PROTOCOL.md, "Offline devices and blobs").
Written once with ``?`` placeholders, like :mod:`storage.mls_sql`; everything
runs inside the caller's transaction.  ``Many`` runs one statement for many
parameter rows (psycopg pipelines them; SQLite loops in C).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from protocol.errors import (
    BlobNotFound,
    BlobsDisabled,
    ConversationExists,
    Forbidden,
    FutureCursor,
    NotMember,
)
from storage.base import BlobInfo, ConversationKind, DeliveryState, NewMessage, PushRegistration
from storage.quotas import check_blob_bytes
from storage.shared_sql import Exec, member_info

#: Largest IN (...) list in one statement.
_CHUNK = 500


class Many(Protocol):
    def __call__(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any: ...


def _in(n: int) -> str:
    return "(" + ", ".join("?" * n) + ")"


def _member(ex: Exec, conversation: bytes, user: str) -> tuple[int, int]:
    """(joined_seq, last_seq) of a member; NotMember otherwise."""
    info = member_info(ex, conversation, user)
    return info.joined_seq, info.last_seq


# --- conversations ------------------------------------------------------------------


def check_not_deleted(ex: Exec, conversation: bytes) -> None:
    if ex("SELECT 1 FROM deleted_conversations WHERE id = ?", (conversation,)).fetchone():
        raise ConversationExists("a conversation with this id existed and was deleted")


def conversation_kind(ex: Exec, conversation: bytes) -> ConversationKind:
    row = ex(
        "SELECT mls_group_id, storage_model FROM conversations WHERE id = ?", (conversation,)
    ).fetchone()
    if row is None:
        return ConversationKind(False, None, "inline")
    return ConversationKind(True, None if row[0] is None else bytes(row[0]), row[1])


def delete_conversation(ex: Exec, conversation: bytes, actor: str, now_ms: int) -> list[str]:
    """The caller holds the conversation's row lock (or the SQLite writer)."""
    row = ex(
        "SELECT c.creator FROM members m JOIN conversations c ON c.id = m.conversation_id"
        " WHERE m.conversation_id = ? AND m.user_did = ?",
        (conversation, actor),
    ).fetchone()
    if row is None:
        raise NotMember("not a member of this conversation")
    if row[0] != actor:
        raise Forbidden("only the creator can delete a conversation")
    members = [r[0] for r in ex(
        "SELECT user_did FROM members WHERE conversation_id = ?", (conversation,)
    )]  # fmt: skip
    # messages, members and cursors cascade; the other tables have no foreign
    # key (see migrations 0002 and 0005) and go explicitly.
    for table in ("welcomes", "group_infos", "deliveries", "read_positions"):
        ex(f"DELETE FROM {table} WHERE conversation_id = ?", (conversation,))
    ex("DELETE FROM conversations WHERE id = ?", (conversation,))
    ex(
        "INSERT INTO deleted_conversations (id, deleted_ms, creator) VALUES (?, ?, ?)",
        (conversation, now_ms, actor),
    )
    return sorted(members)


# --- devices and push ------------------------------------------------------------------


def touch_devices(many: Many, devices: Sequence[tuple[str, str]], now_ms: int) -> None:
    many(
        "INSERT INTO devices (user_did, device_id, first_seen_ms, last_seen_ms)"
        " VALUES (?, ?, ?, ?) ON CONFLICT (user_did, device_id)"
        " DO UPDATE SET last_seen_ms = excluded.last_seen_ms",
        [(user, device, now_ms, now_ms) for user, device in devices],
    )


def register_push(
    ex: Exec, user: str, device: str, provider: str, zone: str, token: str, now_ms: int
) -> None:
    provider_or_null = provider or None
    ex(
        "INSERT INTO devices (user_did, device_id, first_seen_ms, last_seen_ms,"
        " push_provider, push_zone, push_token) VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (user_did, device_id) DO UPDATE SET push_provider = excluded.push_provider,"
        " push_zone = excluded.push_zone, push_token = excluded.push_token",
        (user, device, now_ms, now_ms, provider_or_null, zone, token if provider else None),
    )


def drop_push_token(ex: Exec, user: str, device: str, token: str) -> None:
    ex(
        "UPDATE devices SET push_provider = NULL, push_token = NULL"
        " WHERE user_did = ? AND device_id = ? AND push_token = ?",
        (user, device, token),
    )


def push_registrations(
    ex: Exec, conversations: Sequence[bytes]
) -> dict[bytes, list[PushRegistration]]:
    out: dict[bytes, list[PushRegistration]] = {c: [] for c in conversations}
    ids = list(out)
    for i in range(0, len(ids), _CHUNK):
        chunk = ids[i : i + _CHUNK]
        rows = ex(
            "SELECT m.conversation_id, d.user_did, d.device_id, d.push_provider, d.push_zone,"
            " d.push_token, m.joined_seq FROM members m JOIN devices d ON d.user_did = m.user_did"
            f" WHERE d.push_provider IS NOT NULL AND m.conversation_id IN {_in(len(chunk))}",
            chunk,
        ).fetchall()
        for conv, user, device, provider, zone, token, joined in rows:
            out[bytes(conv)].append(PushRegistration(user, device, provider, zone, token, joined))
    return out


# --- delivery state and read positions ---------------------------------------------------


def record_deliveries(many: Many, rows: Sequence[tuple[str, str, bytes, int]], now_ms: int) -> None:
    # WHERE EXISTS: a position for a conversation deleted meanwhile is dropped.
    # A plain read under MVCC: it takes no lock an append would wait for.
    many(
        "INSERT INTO deliveries (conversation_id, user_did, device_id, seq, updated_ms)"
        " SELECT ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM conversations WHERE id = ?)"
        " ON CONFLICT (conversation_id, user_did, device_id)"
        " DO UPDATE SET seq = excluded.seq, updated_ms = excluded.updated_ms"
        " WHERE excluded.seq > deliveries.seq",
        [(conv, user, device, seq, now_ms, conv) for user, device, conv, seq in rows],
    )


def delivery_state(
    ex: Exec, conversation: bytes, sender: str, seqs: Sequence[int]
) -> list[DeliveryState]:
    _member(ex, conversation, sender)
    wanted = sorted(set(seqs))
    if not wanted:
        return []
    mine = ex(
        "SELECT seq, sender_device FROM messages WHERE conversation_id = ? AND sender_did = ?"
        f" AND seq IN {_in(len(wanted))} ORDER BY seq",
        (conversation, sender, *wanted),
    ).fetchall()
    # Every known device of every current member, with how far it got.
    devices = ex(
        "SELECT d.user_did, d.device_id, m.joined_seq, coalesce(dl.seq, 0), coalesce(cu.seq, 0)"
        " FROM members m JOIN devices d ON d.user_did = m.user_did"
        " LEFT JOIN deliveries dl ON dl.conversation_id = m.conversation_id"
        "  AND dl.user_did = d.user_did AND dl.device_id = d.device_id"
        " LEFT JOIN cursors cu ON cu.conversation_id = m.conversation_id"
        "  AND cu.user_did = d.user_did AND cu.device_id = d.device_id"
        " WHERE m.conversation_id = ?",
        (conversation,),
    ).fetchall()
    out = []
    for seq, sender_device in mine:
        total = delivered = acked = 0
        for user, device, joined, got, acked_to in devices:
            if joined >= seq or (user == sender and device == sender_device):
                continue
            total += 1
            delivered += max(got, acked_to) >= seq
            acked += acked_to >= seq
        out.append(DeliveryState(seq, total, delivered, acked))
    return out


def set_read(ex: Exec, conversation: bytes, user: str, seq: int, now_ms: int) -> int:
    _, last_seq = _member(ex, conversation, user)
    if seq > last_seq:
        raise FutureCursor(f"seq {seq} is beyond the end of the conversation ({last_seq})")
    ex(
        "INSERT INTO read_positions (conversation_id, user_did, seq, updated_ms)"
        " VALUES (?, ?, ?, ?) ON CONFLICT (conversation_id, user_did)"
        " DO UPDATE SET seq = excluded.seq, updated_ms = excluded.updated_ms"
        " WHERE excluded.seq > read_positions.seq",
        (conversation, user, seq, now_ms),
    )
    row = ex(
        "SELECT seq FROM read_positions WHERE conversation_id = ? AND user_did = ?",
        (conversation, user),
    ).fetchone()
    return int(row[0])


def read_positions(ex: Exec, conversation: bytes, user: str) -> dict[str, int]:
    _member(ex, conversation, user)
    rows = ex(
        "SELECT r.user_did, r.seq FROM read_positions r JOIN members m"
        " ON m.conversation_id = r.conversation_id AND m.user_did = r.user_did"
        " WHERE r.conversation_id = ?",
        (conversation,),
    ).fetchall()
    return {user_did: int(seq) for user_did, seq in rows}


# --- blobs ------------------------------------------------------------------------------


def put_blob(
    ex: Exec,
    conversation: bytes,
    key: str,
    user: str,
    device: str,
    size: int,
    now_ms: int,
    quota_bytes: int = 0,
) -> None:
    """The caller holds the user's quota lock when ``quota_bytes`` is set."""
    _member(ex, conversation, user)
    if conversation_kind(ex, conversation).storage_model != "blob":
        raise BlobsDisabled("this conversation keeps ciphertext inline; it takes no blobs")
    check_blob_bytes(ex, user, size, quota_bytes)
    ex(
        "INSERT INTO blobs (conversation_id, blob_key, uploader_did, uploader_device, size,"
        " created_ms) VALUES (?, ?, ?, ?, ?, ?)",
        (conversation, key, user, device, size, now_ms),
    )


def blob_for_reader(ex: Exec, conversation: bytes, key: str, user: str) -> BlobInfo:
    row = ex(
        "SELECT b.size, b.uploader_did, m.joined_seq, (SELECT max(g.seq) FROM messages g"
        "  WHERE g.conversation_id = b.conversation_id AND g.blob_key = b.blob_key)"
        " FROM blobs b JOIN members m ON m.conversation_id = b.conversation_id"
        " WHERE b.conversation_id = ? AND b.blob_key = ? AND m.user_did = ?",
        (conversation, key, user),
    ).fetchone()
    if row is None:
        raise BlobNotFound("no such blob")
    size, uploader, joined, newest_ref = row
    visible = newest_ref is not None and newest_ref > joined
    if not visible and uploader != user:
        raise BlobNotFound("no such blob")
    return BlobInfo(int(size), uploader)


def attach_blob(ex: Exec, message: NewMessage, seq: int) -> None:
    """In the append transaction: the message at ``seq`` is out of line."""
    ex(
        "UPDATE messages SET blob_key = ?, blob_size = ? WHERE conversation_id = ? AND seq = ?",
        (message.blob_key, message.blob_size, message.conversation, seq),
    )


_UNREFERENCED = (
    "NOT EXISTS (SELECT 1 FROM messages g WHERE g.conversation_id = b.conversation_id"
    " AND g.blob_key = b.blob_key)"
)


def collect_blobs(ex: Exec, orphaned_before_ms: int, limit: int) -> list[tuple[bytes, str]]:
    rows = ex(
        f"SELECT b.conversation_id, b.blob_key FROM blobs b WHERE {_UNREFERENCED} AND"
        " (b.created_ms < ? OR NOT EXISTS (SELECT 1 FROM conversations c"
        "  WHERE c.id = b.conversation_id)) ORDER BY b.created_ms LIMIT ?",
        (orphaned_before_ms, limit),
    ).fetchall()
    return [(bytes(conv), key) for conv, key in rows]


def forget_blobs(many: Many, blobs: Sequence[tuple[bytes, str]]) -> None:
    many(
        "DELETE FROM blobs WHERE conversation_id = ? AND blob_key = ? AND NOT EXISTS"
        " (SELECT 1 FROM messages g WHERE g.conversation_id = blobs.conversation_id"
        " AND g.blob_key = blobs.blob_key)",
        list(blobs),
    )
