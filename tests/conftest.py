"""Shared test fixtures.

Services come from the environment (``scripts/test`` sets these up):

* ``MLS_RELAY_TEST_PG``    a PostgreSQL DSN (default postgresql://127.0.0.1:5432/test)
  whose user may ``CREATE DATABASE``;
* ``MLS_RELAY_TEST_REDIS`` a Redis URL (default redis://127.0.0.1:6379/0).

A fixture that cannot reach its service fails the test when ``CI`` is true and
skips it otherwise, with a message saying what to do.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

# Per-test databases on both backends (the ``database_url`` fixture).
pytest_plugins = ["tests.backends", "tests.s3server"]

#: Default timeout (seconds) for tests that carry no ``@pytest.mark.timeout``.
DEFAULT_TEST_TIMEOUT = 60

PG_DEFAULT = "postgresql://127.0.0.1:5432/test"
REDIS_DEFAULT = "redis://127.0.0.1:6379/0"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def service_unavailable(message: str) -> NoReturn:
    """Fail under CI, skip elsewhere."""
    message += " (run the suite with scripts/test, which starts the services)"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A per-test default, unless the run chose one (--timeout, ini, PYTEST_TIMEOUT).
    if (
        config.getoption("timeout", None) is not None
        or config.getini("timeout")
        or os.environ.get("PYTEST_TIMEOUT")
    ):
        return
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TEST_TIMEOUT))


# --- PostgreSQL -----------------------------------------------------------------


def _with_dbname(dsn: str, dbname: str) -> str:
    if dsn.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(dsn)
        return urlunsplit(parts._replace(path="/" + dbname))
    return make_conninfo(dsn, dbname=dbname)


def _redact(dsn: str) -> str:
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "<unparsable DSN>"
    params.pop("password", None)
    return make_conninfo("", **params)


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """DSN of a fresh database created for this test session and dropped after it."""
    base = os.environ.get("MLS_RELAY_TEST_PG", PG_DEFAULT)
    try:
        admin = psycopg.connect(base, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        error = f"PostgreSQL at {_redact(base)} is unreachable: {exc}".strip()
    else:
        error = ""
    if error:
        service_unavailable(error)
    name = f"relay_test_{secrets.token_hex(6)}"
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_dbname(base, name)
    finally:
        # WITH (FORCE): connections a failed test leaked must not keep it alive.
        with psycopg.connect(base, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


# --- Redis -------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisTarget:
    """A Redis server and a key / channel prefix that belongs to this test session."""

    url: str
    prefix: str

    def key(self, name: str) -> str:
        return self.prefix + name


class _Resp:
    """Just enough RESP2 to probe a server and delete our own keys."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        parts = urlsplit(url)
        self._sock = socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or 6379), timeout=timeout
        )
        self._file = self._sock.makefile("rb")
        if parts.password:
            auth = [parts.username, parts.password] if parts.username else [parts.password]
            self.call("AUTH", *auth)
        db = parts.path.strip("/")
        if db and db != "0":
            self.call("SELECT", db)

    def call(self, *args: str | bytes) -> Any:
        out = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode() if isinstance(arg, str) else arg
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self._sock.sendall(b"".join(out))
        return self._read()

    def _read(self) -> Any:
        line = self._file.readline()
        if not line:
            raise ConnectionError("connection closed by Redis")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise ConnectionError(f"Redis error: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._file.read(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise ConnectionError(f"unexpected Redis reply {line!r}")

    def close(self) -> None:
        self._file.close()
        self._sock.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[RedisTarget]:
    """A Redis URL and a unique prefix; keys under the prefix are deleted at the end."""
    url = os.environ.get("MLS_RELAY_TEST_REDIS", REDIS_DEFAULT)
    try:
        probe = _Resp(url)
        probe.call("PING")
        probe.close()
    except (OSError, ConnectionError) as exc:
        parts = urlsplit(url)
        shown = urlunsplit(parts._replace(netloc=f"{parts.hostname}:{parts.port or 6379}"))
        error = f"Redis at {shown} is unreachable: {exc}"
    else:
        error = ""
    if error:
        service_unavailable(error)
    target = RedisTarget(url=url, prefix=f"relay-test-{secrets.token_hex(6)}:")
    try:
        yield target
    finally:
        conn = _Resp(url)
        try:
            cursor = b"0"
            while True:
                cursor, keys = conn.call(
                    "SCAN", cursor, "MATCH", target.prefix + "*", "COUNT", "500"
                )
                if keys:
                    conn.call("DEL", *keys)
                if cursor == b"0":
                    break
        finally:
            conn.close()
