"""Helpers for storage tests: throwaway PostgreSQL databases on a shared server,
and small wrappers the contract suite drives both backends through.

Never touches a database it did not create: every name carries a random
suffix and only those names are dropped.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from storage.base import Storage
from storage.connpool import ConnectionPool
from storage.postgres import PostgresStorage
from storage.sqlite import SqliteStorage

ADMIN_URL = os.environ.get("MLS_RELAY_TEST_PG", "postgresql://127.0.0.1:5432/test")

DATA_TABLES = (
    "messages", "cursors", "members", "conversations", "welcomes", "group_infos",
    "key_package_claims", "key_packages", "token_uses", "blobs", "devices", "deliveries",
    "read_positions", "deleted_conversations",
)  # fmt: skip


def url_for_database(admin_url: str, dbname: str) -> str:
    return urlunsplit(urlsplit(admin_url)._replace(path="/" + dbname))


def pg_reachable(admin_url: str = ADMIN_URL) -> bool:
    try:
        with psycopg.connect(admin_url, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@contextmanager
def throwaway_pg_database(prefix: str = "relay_contract") -> Iterator[str]:
    """Create ``<prefix>_<random>``, yield its URL, drop it afterwards."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield url_for_database(ADMIN_URL, name)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def truncate_pg(url: str) -> None:
    """Empty the data tables (much faster than a fresh database per test)."""
    with psycopg.connect(url, autocommit=True) as conn:
        tables = sql.SQL(", ").join(sql.Identifier(t) for t in DATA_TABLES)
        conn.execute(sql.SQL("TRUNCATE {}").format(tables))


def pg_scalar(url: str, query: str) -> object:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query.encode())
        row = cur.fetchone() if cur.description is not None else None
        return None if row is None else row[0]


class Backend:
    """Opens Storage instances on one empty database and closes them all."""

    def __init__(self, kind: str, location: str) -> None:
        self.kind = kind
        self.location = location  # PostgreSQL URL or SQLite file path
        self.opened: list[Storage] = []

    def new(self, **kwargs: Any) -> Storage:
        if self.kind == "postgres":
            s: Storage = PostgresStorage(self.location, **kwargs)
        else:
            s = SqliteStorage(self.location, **kwargs)
        self.opened.append(s)
        return s

    async def open(self) -> Storage:
        s = self.new()
        await s.migrate()
        return s

    def scalar(self, query: str) -> object:
        if self.kind == "postgres":
            return pg_scalar(self.location, query)
        with sqlite3.connect(self.location) as conn:
            row = conn.execute(query).fetchone()
        return None if row is None else row[0]


@dataclass
class PoolKit:
    """A one-connection pool plus dialect-specific SQL for the raw machinery."""

    kind: str
    pool: ConnectionPool[Any]
    slow: str  # runs far longer than any test waits

    def tx(self, *statements: str) -> Callable[[Any], None]:
        def job(conn: Any) -> None:
            if self.kind == "sqlite":
                conn.execute("BEGIN IMMEDIATE")
                for statement in statements:
                    conn.execute(statement)
                conn.execute("COMMIT")
            else:
                with conn.transaction():
                    for statement in statements:
                        conn.execute(statement.encode())

        return job

    async def probe_rows(self) -> int:
        query = "SELECT count(*) FROM contract_probe"
        rows = await self.pool.run(lambda c: c.execute(query).fetchall())
        return int(rows[0][0])
