"""Schema migrations shared by both backends.

Migrations are plain SQL files named ``NNNN_name.sql`` in
``migrations/<dialect>/``.  Each file is applied in its own transaction
together with its ``schema_migrations`` row, so a crash leaves either the
whole file applied and recorded, or nothing.  The functions here are
blocking; the backends run them in a Trio worker thread.
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

import migrations

_FILE_RE = re.compile(r"^(\d+)_(\w+)\.sql$")

#: Arbitrary constant: the pg_advisory_lock key that serializes migrate() runs
#: of every node sharing one database (advisory locks are per database).
PG_MIGRATION_LOCK_KEY = 0x6D6C_7372_656C_6179 & 0x7FFF_FFFF_FFFF_FFFF  # "mlsrelay"

_CREATE_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_ms BIGINT NOT NULL)"
)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(dialect: str) -> list[Migration]:
    """Every migration of ``dialect`` ('postgresql' or 'sqlite'), by version."""
    directory = Path(migrations.__file__).parent / dialect
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_RE.match(path.name)
        if match is None:
            raise RuntimeError(f"badly named migration file: {path}")
        version = int(match.group(1))
        if version in found:
            raise RuntimeError(f"two migrations with version {version} in {directory}")
        found[version] = Migration(version, match.group(2), path.read_text("utf-8"))
    return [found[v] for v in sorted(found)]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- PostgreSQL ----------------------------------------------------------------


def migrate_postgres(conn: psycopg.Connection[Any]) -> list[int]:
    """Apply the missing migrations on ``conn`` (an autocommit connection used
    for nothing else) and return the versions applied."""
    # Session-level lock: held across the per-file transactions below, and
    # released automatically if this node dies mid-way.
    conn.execute("SELECT pg_advisory_lock(%s)", (PG_MIGRATION_LOCK_KEY,))
    try:
        conn.execute(_CREATE_TABLE)
        applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        done: list[int] = []
        for mig in load_migrations("postgresql"):
            if mig.version in applied:
                continue
            with conn.transaction():
                # No parameters: psycopg sends the file as one simple query,
                # so it may hold several statements.
                conn.execute(mig.sql.encode())
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_ms) VALUES (%s, %s, %s)",
                    (mig.version, mig.name, _now_ms()),
                )
            done.append(mig.version)
        return done
    finally:
        if not conn.closed and not conn.broken:
            conn.execute("SELECT pg_advisory_unlock(%s)", (PG_MIGRATION_LOCK_KEY,))


# --- SQLite --------------------------------------------------------------------


def split_sqlite_script(sql: str) -> list[str]:
    """Split a script into statements.  ``executescript`` would COMMIT first,
    which breaks one-transaction-per-file, so statements run one by one."""
    statements: list[str] = []
    buffer = ""
    for line in sql.splitlines(keepends=True):
        buffer += line
        # complete_statement understands strings, comments and trigger bodies.
        if sqlite3.complete_statement(buffer):
            statement = buffer.strip()
            if statement.rstrip(";").strip():
                statements.append(statement)
            buffer = ""
    if buffer.strip() and not _only_comments(buffer):
        raise RuntimeError(f"unterminated SQL statement in migration: {buffer[:80]!r}")
    return statements


def _only_comments(text: str) -> bool:
    return all(not ln.strip() or ln.strip().startswith("--") for ln in text.splitlines())


def migrate_sqlite(conn: sqlite3.Connection) -> list[int]:
    """Apply the missing migrations on ``conn`` (autocommit mode,
    ``isolation_level=None``) and return the versions applied."""
    done: list[int] = []
    for mig in load_migrations("sqlite"):
        # BEGIN IMMEDIATE takes the write lock before reading the bookkeeping,
        # so two processes cannot both decide to apply the same file.
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_CREATE_TABLE)
            row = conn.execute(
                "SELECT 1 FROM schema_migrations WHERE version = ?", (mig.version,)
            ).fetchone()
            if row is None:
                for statement in split_sqlite_script(mig.sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_ms) VALUES (?, ?, ?)",
                    (mig.version, mig.name, _now_ms()),
                )
                done.append(mig.version)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return done
