"""A ``database_url`` fixture: each test gets an empty, migrated database on
each backend (SQLite file; PostgreSQL database cloned from a migrated template)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import trio
from psycopg import sql

from storage import open_storage


def _with_db(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


@pytest.fixture(scope="session")
def pg_template(postgres_dsn: str) -> Iterator[str]:
    """A migrated database that only ever serves as a template: tests clone it
    (CREATE DATABASE … TEMPLATE).  Not the session database itself, which
    other tests write to: a clone would inherit their rows."""
    name = f"relay_tmpl_{secrets.token_hex(5)}"
    admin_dsn = _with_db(postgres_dsn, "postgres")
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    template = _with_db(postgres_dsn, name)

    async def migrate() -> None:
        storage = open_storage(template, pool_min=0, pool_max=1)
        try:
            await storage.migrate()
        finally:
            await storage.aclose()

    try:
        trio.run(migrate)
        yield template
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@contextmanager
def clone_database(template: str) -> Iterator[str]:
    """A per-test PostgreSQL database cloned from the migrated template."""
    name = f"relay_t_{secrets.token_hex(5)}"
    admin_dsn = _with_db(template, "postgres")
    template_name = urlsplit(template).path.lstrip("/")
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template_name)
            )
        )
    try:
        yield _with_db(template, name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/relay.db"
        return
    with clone_database(request.getfixturevalue("pg_template")) as url:
        yield url


@pytest.fixture
def pg_database_url(pg_template: str) -> Iterator[str]:
    """An empty, migrated PostgreSQL database of this test's own (multi-node tests)."""
    with clone_database(pg_template) as url:
        yield url
