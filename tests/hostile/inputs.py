"""Shared helpers of the hostile-input tests (tests/hostile/test_input_*.py).

Faults behind the edge are injected through the real database: a trigger
that refuses some rows, exactly as a constraint or a storage limit would.
No mock of our storage anywhere.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import psycopg
import trio

from .. import relayclient

#: Bounded reads of a raw HTTP answer.
MAX_ANSWER = 1 << 20


def _sqlite_path(database_url: str) -> str:
    return urlsplit(database_url).path


def install_refusal(database_url: str, table: str, condition: str) -> None:
    """A trigger that refuses (raises on) every row of ``table`` matching
    ``condition`` (SQL over ``NEW``), on either backend."""
    if database_url.startswith("sqlite"):
        with sqlite3.connect(_sqlite_path(database_url)) as conn:
            conn.execute(
                f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} WHEN {condition}"
                " BEGIN SELECT RAISE(ABORT, 'refused by the test trigger'); END"
            )
        return
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            f"CREATE FUNCTION refuse_{table}() RETURNS trigger LANGUAGE plpgsql AS $$"
            f" BEGIN IF {condition} THEN RAISE EXCEPTION 'refused by the test trigger';"
            " END IF; RETURN NEW; END $$"
        )
        for event in ("INSERT", "UPDATE"):
            conn.execute(
                f"CREATE TRIGGER refuse_{table}_{event.lower()} BEFORE {event} ON {table}"
                f" FOR EACH ROW EXECUTE FUNCTION refuse_{table}()"
            )


def remove_refusal(database_url: str, table: str) -> None:
    if database_url.startswith("sqlite"):
        with sqlite3.connect(_sqlite_path(database_url)) as conn:
            conn.execute(f"DROP TRIGGER refuse_{table}")
        return
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"DROP FUNCTION refuse_{table}() CASCADE")


def count_rows(database_url: str, sql: str, params: tuple[Any, ...] = ()) -> int:
    """One COUNT(*)-style query on either backend (``?`` placeholders)."""
    if database_url.startswith("sqlite"):
        with sqlite3.connect(_sqlite_path(database_url)) as conn:
            return int(conn.execute(sql, params).fetchone()[0])
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(sql.replace("?", "%s"), params).fetchone()
        assert row is not None
        return int(row[0])


async def raw_http(port: int, raw: bytes, within: float = 10) -> tuple[int | None, bytes]:
    """Send a raw HTTP request; (status, body), status None when the server
    closed without an HTTP answer."""
    with trio.fail_after(within):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(raw)
            data = b""
            try:
                while len(data) < MAX_ANSWER and (chunk := await stream.receive_some(65536)):
                    data += chunk
            except trio.BrokenResourceError:
                pass  # reset without an answer
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        return None, data
    return int(parts[1]), body


def upgrade(token: str) -> bytes:
    return (
        "GET /v1/ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()


def sse(token: str) -> bytes:
    return (
        "GET /v1/events HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode()


def token(user: str, device: str, **claims: Any) -> str:
    return relayclient.make_token(user, device, **claims)


@asynccontextmanager
async def clients(url: str, *users: str) -> AsyncIterator[list[relayclient.Client]]:
    """One connected client per user (device d1), closed together."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(relayclient.connect(url, u)) for u in users]
