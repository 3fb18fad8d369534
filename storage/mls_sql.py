"""MLS delivery-service SQL shared by both backends (blocking; run in a worker thread).

The statements are written once with ``?`` placeholders and run through an
:class:`Exec` that adapts them (``%s`` for psycopg).  Everything here runs
inside the caller's transaction: the SQLite writer's ``BEGIN IMMEDIATE`` or a
PostgreSQL transaction holding the conversation row locks.
"""

from __future__ import annotations

from collections.abc import Sequence

from protocol.errors import (
    ConversationNotFound,
    FutureEpoch,
    MLSValidationError,
    NotMember,
    NotMLSConversation,
    RelayError,
    StaleCommit,
    StaleEpoch,
    UnknownKeyPackage,
    WrongGroup,
)
from storage import quotas
from storage.base import (
    Appended,
    ClaimedKeyPackage,
    ClaimResult,
    KeyPackageCount,
    NewKeyPackage,
    NewMessage,
    PendingWelcome,
)
from storage.shared_sql import Exec, is_member

#: not_after values are clamped to fit a signed 64-bit column.
MAX_NOT_AFTER = 2**63 - 1
COMMIT_KINDS = ("commit", "external_commit")


def status_error(status: str, epoch: int | None) -> RelayError:
    """The error for a failed append status (shared with the PL/pgSQL function)."""
    e = {"epoch": epoch} if epoch is not None else {}
    if status == "not_member":
        return NotMember("not a member of this conversation")
    if status == "needs_mls":
        return MLSValidationError(
            "this MLS conversation accepts MLSMessages only", field="ciphertext"
        )
    if status == "not_mls":
        return NotMLSConversation("not an MLS conversation")
    if status == "wrong_group":
        return WrongGroup("group_id is not this conversation's MLS group", **e)
    if status == "stale_commit":
        return StaleCommit("a commit for this epoch was already accepted", **e)
    if status == "future_epoch":
        return FutureEpoch("message is for an epoch the group has not reached", **e)
    if status == "stale_epoch":
        return StaleEpoch("message is for an epoch no longer accepted", **e)
    if status == "unknown_key_package":
        return UnknownKeyPackage("the Welcome names a KeyPackage you did not claim")
    raise AssertionError(f"unknown append status {status!r}")


#: The order of checks of an MLS append, the same on both backends (the
#: PostgreSQL side: relay_append_mls_v2, migrations/postgresql/0007): the first
#: that fails answers.  Every refusal after "member" carries the group's epoch.
CHECK_ORDER = (
    "member",  # NotMember, no epoch: existence is not revealed
    "framing",  # InvalidMLS (opaque bytes, MLS conversation) / NotMLSConversation
    "duplicate",  # same client_message_id: the original seq, time and epoch
    "group",  # WrongGroup
    "epoch",  # FutureEpoch, StaleCommit, StaleEpoch
    "key_packages",  # UnknownKeyPackage: a Welcome ref the sender did not claim
    "members",  # TooManyMembers: the commit would pass RELAY_MAX_MEMBERS (storage/quotas.py)
)


def check_epoch(msg: NewMessage, epoch: int) -> str | None:
    """The epoch rule (mirrors relay_append_mls_v2 in the PostgreSQL migration)."""
    if msg.epoch > epoch:
        return "future_epoch"
    if msg.kind in COMMIT_KINDS and msg.epoch < epoch:
        return "stale_commit"
    if msg.kind == "proposal" and msg.epoch < epoch:
        return "stale_epoch"
    if msg.kind == "application" and msg.epoch < epoch - msg.epoch_window:
        return "stale_epoch"
    return None


def resolve_refs(ex: Exec, claimer: str, refs: Sequence[bytes]) -> list[tuple[str, str]]:
    """(user, device) of each ref the claimer claimed; UnknownKeyPackage otherwise."""
    out: list[tuple[str, str]] = []
    for ref in refs:
        row = ex(
            "SELECT k.user_did, k.device_id FROM key_packages k JOIN key_package_claims c"
            " ON c.ref = k.ref WHERE k.ref = ? AND c.claimer_did = ?",
            (ref, claimer),
        ).fetchone()
        if row is None:
            raise UnknownKeyPackage(
                "the Welcome names a KeyPackage you did not claim", ref=bytes(ref)
            )
        out.append((row[0], row[1]))
    return out


def apply_commit(
    ex: Exec, msg: NewMessage, seq: int, new_epoch: int, targets: list[tuple[str, str]]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """After a winning commit: members, Welcome inbox rows, GroupInfo.  Returns (added, removed)."""
    conv = msg.conversation
    # Retention keeps this commit and the epoch before it (storage/retention_sql.py);
    # SET expressions read the old row, so prev_commit_seq gets the previous commit.
    ex(
        "UPDATE conversations SET prev_commit_seq = commit_seq, commit_seq = ? WHERE id = ?",
        (seq, conv),
    )
    joiners = [user for user, _ in targets]
    if msg.kind == "external_commit":
        joiners.append(msg.sender)
    added: list[str] = []
    for user in dict.fromkeys(joiners):
        if ex(
            "INSERT INTO members (conversation_id, user_did, joined_seq, added_ms)"
            " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING user_did",
            (conv, user, seq, msg.created_ms),
        ).fetchone():
            added.append(user)
    removed: list[str] = []
    for user in dict.fromkeys(msg.removes):
        if user in added:
            continue
        if ex(
            "DELETE FROM members WHERE conversation_id = ? AND user_did = ? RETURNING user_did",
            (conv, user),
        ).fetchone():
            removed.append(user)
            ex("DELETE FROM cursors WHERE conversation_id = ? AND user_did = ?", (conv, user))
            ex("DELETE FROM welcomes WHERE conversation_id = ? AND user_did = ?", (conv, user))
    for user, device in dict.fromkeys(targets):
        ex(
            "INSERT INTO welcomes (user_did, device_id, conversation_id, seq, epoch, welcome,"
            " created_ms) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (user, device, conv, seq, new_epoch, msg.welcome, msg.created_ms),
        )
    if msg.group_info:
        ex(
            "INSERT INTO group_infos (conversation_id, epoch, group_info, created_ms)"
            " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (conv, new_epoch, msg.group_info, msg.created_ms),
        )
    return tuple(added), tuple(removed)


def welcome_targets(ex: Exec, msg: NewMessage) -> list[tuple[str, str]] | RelayError:
    """Resolve a commit's Welcome refs BEFORE anything is written for it."""
    if not msg.welcome_refs:
        return []
    try:
        return resolve_refs(ex, msg.sender, msg.welcome_refs)
    except RelayError as exc:
        return exc


def finish_append(
    ex: Exec,
    msg: NewMessage,
    status: str,
    row: tuple[int | None, int | None, int | None],
    targets: list[tuple[str, str]],
) -> Appended | RelayError:
    """Turn a (seq, created_ms, epoch) status row into a result; apply a winning commit."""
    seq, created, epoch = row
    if status == "duplicate" and seq is not None and created is not None:
        return Appended(msg.conversation, seq, created, duplicate=True, epoch=epoch)
    if status != "ok" or seq is None or created is None or epoch is None:
        return status_error(status, epoch)
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    if msg.kind in COMMIT_KINDS:
        added, removed = apply_commit(ex, msg, seq, epoch, targets)
    return Appended(msg.conversation, seq, created, False, epoch, added, removed)


def append_mls_sqlite(ex: Exec, msg: NewMessage) -> Appended | RelayError:
    """The whole MLS append in Python (SQLite: the caller holds BEGIN IMMEDIATE),
    checks in CHECK_ORDER."""
    conv = ex(
        "SELECT last_seq, epoch, mls_group_id, external_join FROM conversations WHERE id = ?",
        (msg.conversation,),
    ).fetchone()
    member = conv is not None and (
        is_member(ex, msg.conversation, msg.sender)
        or (msg.kind == "external_commit" and bool(conv[3]))
    )
    if conv is None or not member:
        return status_error("not_member", None)
    last_seq, epoch, group_id = conv[0], conv[1], conv[2]
    if group_id is None:
        return status_error("not_mls", None)
    dup = ex(
        "SELECT seq, created_ms, epoch FROM messages WHERE conversation_id = ? AND sender_did = ?"
        " AND sender_device = ? AND client_message_id = ?",
        (msg.conversation, msg.sender, msg.device, msg.client_message_id),
    ).fetchone()
    if dup is not None:  # the epoch this message produced (NULL: stored before 0006)
        produced = dup[2] if dup[2] is not None else epoch
        return finish_append(ex, msg, "duplicate", (dup[0], dup[1], produced), [])
    if bytes(group_id) != msg.group_id:
        return status_error("wrong_group", epoch)
    bad = check_epoch(msg, epoch)
    if bad is not None:
        return status_error(bad, epoch)
    targets = welcome_targets(ex, msg)  # before any write: an unknown ref refuses the commit
    if isinstance(targets, RelayError):
        return targets
    if msg.kind in COMMIT_KINDS and (crowded := quotas.commit_members(ex, msg, targets)):
        return crowded
    new_epoch = epoch + (1 if msg.kind in COMMIT_KINDS else 0)
    seq = last_seq + 1
    ex(
        "UPDATE conversations SET last_seq = ?, epoch = ? WHERE id = ?",
        (seq, new_epoch, msg.conversation),
    )
    ex(
        "INSERT INTO messages (conversation_id, seq, sender_did, sender_device,"
        " client_message_id, ciphertext, created_ms, epoch) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (msg.conversation, seq, msg.sender, msg.device, msg.client_message_id,
         msg.ciphertext, msg.created_ms, new_epoch),
    )  # fmt: skip
    return finish_append(ex, msg, "ok", (seq, msg.created_ms, new_epoch), targets)


# --- key packages ---------------------------------------------------------------


def put_key_packages(
    ex: Exec,
    user: str,
    device: str,
    packages: Sequence[NewKeyPackage],
    now_ms: int,
    max_stored: int = 0,
    max_devices: int = 0,
) -> list[bool]:
    """The caller serializes one user's uploads (the last-resort swap reads
    then writes, and the quotas count what the upload wrote)."""
    quotas.check_key_package_device(ex, user, device, max_devices)
    stored: list[bool] = []
    for kp in packages:
        new = ex(
            "INSERT INTO key_packages (ref, user_did, device_id, cipher_suite, data,"
            " last_resort, not_after, uploaded_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING RETURNING ref",
            (kp.ref, user, device, kp.cipher_suite, kp.data, kp.last_resort,
             min(kp.not_after, MAX_NOT_AFTER), now_ms),
        ).fetchone() is not None  # fmt: skip
        if new and kp.last_resort:  # one last resort per device and suite: retire the old one
            ex(
                "UPDATE key_packages SET claimed_ms = ? WHERE user_did = ? AND device_id = ?"
                " AND cipher_suite = ? AND last_resort AND claimed_ms IS NULL AND ref <> ?",
                (now_ms, user, device, kp.cipher_suite, kp.ref),
            )
        stored.append(new)
    # Raising rolls the upload back whole: nothing of it is stored.
    quotas.check_key_packages(ex, user, device, now_ms // 1000, max_stored)
    return stored


def key_package_devices(ex: Exec, user: str, device: str) -> tuple[bool, int]:
    """(whether ``device`` ever uploaded, how many devices of the user did)."""
    (devices,) = ex(
        "SELECT count(DISTINCT device_id) FROM key_packages WHERE user_did = ?", (user,)
    ).fetchone()
    return quotas.device_known(ex, user, device), int(devices)


def key_package_counts(ex: Exec, user: str, device: str, now_s: int) -> list[KeyPackageCount]:
    rows = ex(
        "SELECT cipher_suite, sum(CASE WHEN last_resort THEN 0 ELSE 1 END),"
        " max(CASE WHEN last_resort THEN 1 ELSE 0 END) FROM key_packages"
        " WHERE user_did = ? AND device_id = ? AND claimed_ms IS NULL AND not_after >= ?"
        " GROUP BY cipher_suite ORDER BY cipher_suite",
        (user, device, now_s),
    ).fetchall()
    return [KeyPackageCount(r[0], int(r[1]), bool(r[2])) for r in rows]


def claim_key_packages(
    ex: Exec,
    claimer: str,
    users: Sequence[str],
    suite: int,
    now_s: int,
    now_ms: int,
    lock: str = "",
) -> ClaimResult:
    """``lock`` is appended to the row pick (PostgreSQL: FOR UPDATE SKIP LOCKED)."""
    claimed: list[ClaimedKeyPackage] = []
    missing: list[tuple[str, str | None]] = []
    pick = (
        "SELECT ref, data, last_resort FROM key_packages WHERE user_did = ? AND device_id = ?"
        " AND cipher_suite = ? AND claimed_ms IS NULL AND not_after >= ? AND {}"
        " ORDER BY uploaded_ms, ref LIMIT 1"
    )
    for user in dict.fromkeys(users):
        devices = [
            r[0]
            for r in ex(
                "SELECT DISTINCT device_id FROM key_packages WHERE user_did = ? ORDER BY device_id",
                (user,),
            ).fetchall()
        ]
        if not devices:
            missing.append((user, None))
        for device in devices:
            args = (user, device, suite, now_s)
            row = ex(pick.format("NOT last_resort") + lock, args).fetchone()
            if row is not None:
                ex("UPDATE key_packages SET claimed_ms = ? WHERE ref = ?", (now_ms, row[0]))
            else:  # not consumed, so not locked: concurrent claimers all get it
                row = ex(pick.format("last_resort"), args).fetchone()
            if row is None:
                missing.append((user, device))
                continue
            ex(
                "INSERT INTO key_package_claims (ref, claimer_did, claimed_ms) VALUES (?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (row[0], claimer, now_ms),
            )
            claimed.append(
                ClaimedKeyPackage(user, device, bytes(row[0]), bytes(row[1]), bool(row[2]))
            )
    return ClaimResult(claimed, missing)


def welcomes_for(ex: Exec, user: str, device: str) -> list[PendingWelcome]:
    rows = ex(
        "SELECT conversation_id, seq, epoch, welcome FROM welcomes WHERE user_did = ?"
        " AND device_id = ? ORDER BY conversation_id, seq",
        (user, device),
    ).fetchall()
    return [PendingWelcome(bytes(r[0]), r[1], r[2], bytes(r[3])) for r in rows]


def ack_welcomes(ex: Exec, user: str, device: str, conversation: bytes, seq: int) -> None:
    ex(
        "DELETE FROM welcomes WHERE user_did = ? AND device_id = ? AND conversation_id = ?"
        " AND seq <= ?",
        (user, device, conversation, seq),
    )


def latest_group_info(ex: Exec, conversation: bytes, user: str) -> tuple[int, bytes]:
    row = ex(
        "SELECT c.external_join, EXISTS (SELECT 1 FROM members m WHERE m.conversation_id = c.id"
        " AND m.user_did = ?) FROM conversations c WHERE c.id = ?",
        (user, conversation),
    ).fetchone()
    if row is None or not (row[0] or row[1]):
        raise NotMember("not a member of this conversation")
    info = ex(
        "SELECT epoch, group_info FROM group_infos WHERE conversation_id = ?"
        " ORDER BY epoch DESC LIMIT 1",
        (conversation,),
    ).fetchone()
    if info is None:
        raise ConversationNotFound("no GroupInfo stored for this conversation")
    return int(info[0]), bytes(info[1])
