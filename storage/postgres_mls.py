"""PostgreSQL appends: the set-based function for opaque conversations and the
per-message MLS function (epoch check under the conversation row lock).

Both run inside :meth:`storage.postgres.PostgresStorage.append_messages`'
transaction, after it locked every conversation of the batch in id order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from protocol.errors import InternalBug, MLSValidationError, NotMember, RelayError
from storage import mls_sql, quotas, shared_sql
from storage.base import Appended, NewMessage
from storage.pgconn import PgConn

# %b: parameters in binary format.  psycopg's text dumping of a bytea[] of
# 1 KiB ciphertexts (escaping every byte, holding the GIL) took 5 ms per batch
# of 50, binary 0.9 ms: it was the committer's largest cost.
_APPEND_PLAIN_SQL = """
SELECT r_ord, r_status, r_seq, r_created_ms FROM relay_append_plain(
    %b::bytea[], %b::text[], %b::text[], %b::text[], %b::bytea[], %b::bigint[])
"""


def append_plain_batch(conn: PgConn, msgs: list[NewMessage]) -> list[Appended | RelayError]:
    """A batch without MLS items as ONE autocommit statement (the function
    locks, checks and inserts; its implicit transaction commits on return):
    one round trip per group commit instead of four."""
    params = (
        [m.conversation for m in msgs],
        [m.sender for m in msgs],
        [m.device for m in msgs],
        [m.client_message_id for m in msgs],
        [m.ciphertext for m in msgs],
        [m.created_ms for m in msgs],
    )
    rows = conn.execute(_APPEND_PLAIN_SQL, params, binary=True).fetchall()
    if len(rows) != len(msgs):
        raise InternalBug("append returned a wrong number of results")
    out: list[Appended | RelayError] = []
    for (_, status, seq, created_ms), msg in zip(rows, msgs, strict=True):
        if status == "mls":
            out.append(
                MLSValidationError(
                    "this MLS conversation accepts MLSMessages only", field="ciphertext"
                )
            )
        elif status == "not_member" or seq is None or created_ms is None:
            out.append(NotMember("not a member of this conversation"))
        else:
            out.append(Appended(msg.conversation, seq, created_ms, status == "duplicate"))
    return out


def pg_exec(conn: PgConn) -> shared_sql.Exec:
    def ex(sql: str, params: Sequence[Any] = ()) -> Any:
        return conn.execute(sql.replace("?", "%s"), params)

    return ex


def append_plain(
    conn: PgConn, msgs: list[NewMessage], where: list[int], out: list[Appended | RelayError | None]
) -> None:
    """Plain items of a mixed batch (inside its transaction): the same function."""
    for i, result in zip(where, append_plain_batch(conn, msgs), strict=True):
        out[i] = result


def append_mls(conn: PgConn, ex: shared_sql.Exec, m: NewMessage) -> Appended | RelayError:
    """One MLS item (or opaque bytes sent to an MLS conversation), checks in
    mls_sql.CHECK_ORDER.  The Welcome refs are resolved first, in the same
    transaction, but only reported where the order puts them: the function
    answers every earlier check (membership, duplicate, epoch) before it."""
    targets = mls_sql.welcome_targets(ex, m)
    refusal = targets if isinstance(targets, RelayError) else None
    if refusal is None and m.kind in mls_sql.COMMIT_KINDS and not isinstance(targets, RelayError):
        refusal = quotas.commit_members(ex, m, targets)
    # The function answers every earlier check first and, with refs_ok false,
    # writes nothing: a crowded commit is refused there like an unknown ref.
    refs_ok = refusal is None
    row = conn.execute(
        "SELECT * FROM relay_append_mls_v2(%s, %s, %s, %s, %b, %s, %s, %s, %s, %s, %s)",
        (m.conversation, m.sender, m.device, m.client_message_id, m.ciphertext,
         m.created_ms, m.kind, m.epoch, m.group_id, m.epoch_window, refs_ok),
    ).fetchone()  # fmt: skip
    assert row is not None  # the function always returns one row
    if refusal is not None or isinstance(targets, RelayError):
        if row[0] == "unknown_key_package" and refusal is not None:
            return refusal
        targets = []  # another check answered first (nothing is applied)
    return mls_sql.finish_append(ex, m, row[0], (row[1], row[2], row[3]), targets)
