"""What one user may keep stored: the quota checks, shared by both backends.

Each check runs inside the transaction that stores what it counts, after
the rows of the request are written (or just before, where the count does
not depend on them), and raises a :class:`~protocol.errors.QuotaExceeded`
that rolls the whole request back: nothing of a refused request is stored.
They are race-free because whatever they count is serialized: SQLite has one
writer (``BEGIN IMMEDIATE``); on PostgreSQL the caller holds the conversation
row lock (members) or the advisory lock of :func:`lock` (per device, per
user).  A limit of 0 disables a check.

Counting uses the indexes of migration 0008 (and 0002's for KeyPackages), so
a check costs one index range count, however close to its limit the user is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.errors import (
    BlobQuotaExceeded,
    TooManyConversations,
    TooManyDevices,
    TooManyKeyPackages,
    TooManyMembers,
)
from storage.shared_sql import is_member

if TYPE_CHECKING:
    from storage.base import NewMessage
    from storage.shared_sql import Exec

#: PostgreSQL: serializes every transaction taking the same key until commit.
PG_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtext(?))"
#: Each blob counts at least this many bytes against the quota, as a file
#: system charges whole blocks: the number of blobs (rows, files, objects) a
#: user can keep is bounded too (1 GiB / 4 KiB = 262,144), not just their bytes.
BLOB_MIN_CHARGE = 4096
#: A deleted conversation counts against its creator's quota this long.
DELETED_COUNT_MS = 24 * 3600 * 1000


def lock(ex: Exec, lock_sql: str, key: str) -> None:
    """Take the transaction-scoped lock of ``key`` (``lock_sql`` is "" on SQLite,
    whose writer is serial already)."""
    if lock_sql:
        ex(lock_sql, (key,))


def check_key_packages(ex: Exec, user: str, device: str, now_s: int, limit: int) -> None:
    """After an upload's rows are in: the device's claimable KeyPackages
    (unclaimed, not expired; last-resort ones included) must not pass
    ``limit``.  Expired unclaimed ones nobody claimed are deleted first: they
    can never be handed out, and counting them would lock out a device whose
    packages merely aged, while not counting them would let short-lived
    uploads pile up for ever."""
    if not limit:
        return
    ex(
        "DELETE FROM key_packages WHERE user_did = ? AND device_id = ? AND claimed_ms IS NULL"
        " AND not_after < ? AND NOT EXISTS (SELECT 1 FROM key_package_claims c"
        " WHERE c.ref = key_packages.ref)",
        (user, device, now_s),
    )
    (stored,) = ex(
        "SELECT count(*) FROM key_packages WHERE user_did = ? AND device_id = ?"
        " AND claimed_ms IS NULL",
        (user, device),
    ).fetchone()
    if stored > limit:
        raise TooManyKeyPackages(
            f"a device keeps at most {limit} unclaimed KeyPackages; this upload would make"
            f" {stored}",
            limit=limit,
        )


def check_key_package_device(ex: Exec, user: str, device: str, limit: int) -> None:
    """Before a device's first upload: the user's devices that ever uploaded
    must be fewer than ``limit``.  They count for ever, as they do in claims
    (one package or one ``missing`` entry per device that ever uploaded);
    a device already known is never refused, whatever the limit is now."""
    if not limit or device_known(ex, user, device):
        return
    (devices,) = ex(
        "SELECT count(DISTINCT device_id) FROM key_packages WHERE user_did = ?", (user,)
    ).fetchone()
    if devices >= limit:
        raise TooManyDevices(
            f"a user may upload KeyPackages from at most {limit} devices",
            limit=limit,
            used=int(devices),
        )


def device_known(ex: Exec, user: str, device: str) -> bool:
    row = ex(
        "SELECT 1 FROM key_packages WHERE user_did = ? AND device_id = ? LIMIT 1", (user, device)
    ).fetchone()
    return row is not None


def check_blob_bytes(ex: Exec, user: str, size: int, quota: int) -> None:
    """Before a blob is registered: the user's registered blob bytes plus
    ``size`` must fit ``quota`` (each blob charged at least BLOB_MIN_CHARGE).
    Every blob row counts until the collector forgets it, so an upload counts
    from its registration, before its bytes."""
    if not quota:
        return
    (used,) = ex(
        "SELECT coalesce(sum(CASE WHEN size < ? THEN ? ELSE size END), 0) FROM blobs"
        " WHERE uploader_did = ?",
        (BLOB_MIN_CHARGE, BLOB_MIN_CHARGE, user),
    ).fetchone()
    if int(used) + max(size, BLOB_MIN_CHARGE) > quota:
        raise BlobQuotaExceeded(
            f"stored blobs are limited to {quota} bytes per user; {used} are in use",
            limit=quota,
            used=int(used),
        )


def check_conversations(ex: Exec, creator: str, limit: int, now_ms: int) -> None:
    """Before a conversation is created: its creator's existing conversations
    (whether or not it is still a member: leaving gives none back), and those
    it deleted within DELETED_COUNT_MS, must be fewer than ``limit``.  A deleted
    id is kept for ever (never reused), so without the second term a
    create-delete loop would grow that table at the request rate.  Memberships
    are not counted: anyone can add anyone, so counting them would let others
    use up a victim's quota."""
    if not limit:
        return
    (held,) = ex("SELECT count(*) FROM conversations WHERE creator = ?", (creator,)).fetchone()
    (gone,) = ex(
        "SELECT count(*) FROM deleted_conversations WHERE creator = ? AND deleted_ms > ?",
        (creator, now_ms - DELETED_COUNT_MS),
    ).fetchone()
    if held + gone >= limit:
        raise TooManyConversations(
            f"a user may hold at most {limit} conversations it created (those it deleted"
            " count for a day)",
            limit=limit,
            used=int(held + gone),
        )


def check_member_count(count: int, limit: int) -> None:
    if limit and count > limit:
        raise TooManyMembers(f"a conversation has at most {limit} members", limit=limit)


def check_members(ex: Exec, conversation: bytes, limit: int) -> None:
    """After members are added (in the same transaction, under the
    conversation's lock): the conversation must not have more than ``limit``."""
    if not limit:
        return
    (count,) = ex(
        "SELECT count(*) FROM members WHERE conversation_id = ?", (conversation,)
    ).fetchone()
    check_member_count(int(count), limit)


def commit_members(
    ex: Exec, msg: NewMessage, targets: list[tuple[str, str]]
) -> TooManyMembers | None:
    """Before an MLS commit is applied: the refusal if the members it leaves
    (those there, plus its Welcome's users and an external joiner that are
    not, less the members it removes) would pass ``msg.max_members``.
    Mirrors what storage.mls_sql.apply_commit will do."""
    if not msg.max_members:
        return None
    joiners = [user for user, _ in targets]
    if msg.kind == "external_commit":
        joiners.append(msg.sender)
    if not joiners:
        return None  # removing only never passes a bound
    conv = msg.conversation

    new = [u for u in dict.fromkeys(joiners) if not is_member(ex, conv, u)]
    gone = [u for u in dict.fromkeys(msg.removes) if u not in new and is_member(ex, conv, u)]
    (count,) = ex("SELECT count(*) FROM members WHERE conversation_id = ?", (conv,)).fetchone()
    after = int(count) + len(new) - len(gone)
    if after > msg.max_members:
        return TooManyMembers(
            f"a conversation has at most {msg.max_members} members; this commit would make {after}",
            limit=msg.max_members,
        )
    return None
