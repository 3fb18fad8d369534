"""Retention and single-use token SQL shared by both backends (blocking; worker thread).

Written once with ``?`` placeholders and run through :class:`storage.shared_sql.Exec`,
inside the caller's transaction (SQLite ``BEGIN IMMEDIATE``; PostgreSQL after the
candidate conversations' rows were locked in id order, like appends).

The retention rule, per conversation (docs/OPERATIONS.md, "Retention"):

* Only a *prefix* is deleted: every message with ``seq < bound``.  The retained
  history stays hole-free, so ``first_seq`` (the lowest retained seq) is exact
  and a cursor before it gets ``OutdatedCursor``.
* ``bound`` is the smallest of:

  - the seq of the oldest message created at or after the cutoff (everything
    before it is older than the cutoff; ``last_seq + 1`` when all are);
  - in an MLS conversation with a recorded commit, ``prev_commit_seq + 1``:
    the commit that produced the current epoch, every message after it, and
    the previous epoch (where that commit and the proposals it may reference
    by reference were sent) are NEVER pruned, however old.  A client that
    comes back after the retention period can still process the commit that
    brought the group to its current epoch;
  - ``seq + 1`` of the oldest Welcome still in some device's inbox: a Welcome
    is useless without the messages that follow its commit.

GroupInfo: older epochs' rows past the cutoff go; the newest epoch's is kept.
Welcomes: the inbox is emptied by acks (``mls_sql.ack_welcomes``) and member
removal, never by age.
"""

from __future__ import annotations

from storage.shared_sql import Exec


def prune_candidates(ex: Exec, older_than_ms: int) -> list[bytes]:
    """Conversations holding at least one message older than the cutoff, by id."""
    rows = ex(
        "SELECT DISTINCT conversation_id FROM messages WHERE created_ms < ?"
        " ORDER BY conversation_id",
        (older_than_ms,),
    ).fetchall()
    return [bytes(r[0]) for r in rows]


def prune_bound(ex: Exec, conversation: bytes, older_than_ms: int) -> int:
    """The lowest seq that must be kept (see the module docstring)."""
    row = ex(
        "SELECT c.last_seq, c.commit_seq, c.prev_commit_seq,"
        " (SELECT min(m.seq) FROM messages m WHERE m.conversation_id = c.id"
        "   AND m.created_ms >= ?),"
        " (SELECT min(w.seq) FROM welcomes w WHERE w.conversation_id = c.id)"
        " FROM conversations c WHERE c.id = ?",
        (older_than_ms, conversation),
    ).fetchone()
    if row is None:
        return 0  # no such conversation: nothing to keep, nothing to delete
    last_seq, commit_seq, prev_commit_seq, young, welcome = row
    bound = int(young) if young is not None else int(last_seq) + 1
    if commit_seq:
        bound = min(bound, int(prev_commit_seq) + 1)
    if welcome is not None:
        bound = min(bound, int(welcome) + 1)
    return bound


def prune_conversation(ex: Exec, conversation: bytes, older_than_ms: int) -> int:
    """Delete the conversation's prunable prefix; returns the number deleted."""
    bound = prune_bound(ex, conversation, older_than_ms)
    deleted = ex(
        "DELETE FROM messages WHERE conversation_id = ? AND seq < ?", (conversation, bound)
    ).rowcount
    if deleted:
        ex(
            "UPDATE conversations SET first_seq = coalesce("
            " (SELECT min(seq) FROM messages m WHERE m.conversation_id = conversations.id),"
            " last_seq + 1) WHERE id = ?",
            (conversation,),
        )
    return int(deleted)


def prune_group_infos(ex: Exec, older_than_ms: int) -> int:
    """Delete GroupInfo of older epochs past the cutoff; the newest one always stays."""
    return int(
        ex(
            "DELETE FROM group_infos WHERE created_ms < ? AND epoch < (SELECT max(g.epoch)"
            " FROM group_infos g WHERE g.conversation_id = group_infos.conversation_id)",
            (older_than_ms,),
        ).rowcount
    )


# --- single-use tokens --------------------------------------------------------------


def consume_token(ex: Exec, jti: str, user: str, expires_ms: int, now_ms: int) -> bool:
    """Record ``jti`` as used; False when it already was (a replay).

    A row whose token can no longer be accepted (expires_ms < now) is taken
    over, so a purge that has not run yet never refuses a fresh token."""
    row = ex(
        "INSERT INTO token_uses (jti, user_did, expires_ms, used_ms) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (jti) DO UPDATE SET user_did = excluded.user_did,"
        " expires_ms = excluded.expires_ms, used_ms = excluded.used_ms"
        " WHERE token_uses.expires_ms < ? RETURNING jti",
        (jti, user, expires_ms, now_ms, now_ms),
    ).fetchone()
    return row is not None


def purge_token_uses(ex: Exec, now_ms: int) -> int:
    """Forget used token ids whose tokens can no longer be accepted anyway."""
    return int(ex("DELETE FROM token_uses WHERE expires_ms < ?", (now_ms,)).rowcount)
