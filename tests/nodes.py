"""Helpers for multi-node tests: PostgreSQL-only databases, relay subprocesses,
and a TCP proxy that can cut a node off from Redis."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import trio

from .relayclient import AUDIENCE, SECRET

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "relay.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_env(
    port: int, database_url: str, redis_url: str, prefix: str, **extra: str
) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RELAY_") and k not in ("DATABASE_URL", "REDIS_URL", "PORT")
    }
    env.update(
        PORT=str(port),
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        RELAY_REDIS_PREFIX=prefix,
        RELAY_JWT_SECRET=SECRET,
        RELAY_SERVICE_ID=AUDIENCE,
        RELAY_DEV_MODE="1",
        RELAY_HOST="127.0.0.1",
        RELAY_LOG_LEVEL="WARNING",
        RELAY_DRAIN_GRACE_S="0.5",  # the drain grace period, short for tests (test_drain.py)
        # Every test connects from 127.0.0.1, often in bursts; the connect rate
        # has its own tests (tests/hostile/test_quotas_connect.py).
        RELAY_CONNECT_RATE_PER_ADDRESS="0",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


async def migrate(env: dict[str, str]) -> None:
    with trio.fail_after(30):
        await trio.run_process([*CLI, "migrate"], env=env, capture_stdout=True)


def _open_log(path: Path | None) -> BinaryIO | None:
    return open(path, "ab") if path else None  # handed to the child, closed by start()


async def start(env: dict[str, str], *args: str, log: Path | None = None) -> trio.Process:
    """Start ``mls-relay serve`` (stderr to ``log`` so a failure can be shown)."""
    stderr = _open_log(log)
    try:
        return await trio.lowlevel.open_process(
            [*CLI, "serve", *args], env=env, stdin=None, stdout=stderr, stderr=stderr
        )
    finally:
        if stderr:
            stderr.close()


async def http_status(port: int, path: str) -> int | None:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return None
    async with stream:
        try:
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := await stream.receive_some(4096):
                data += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
    try:
        return int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


async def wait_ready(port: int, proc: trio.Process, deadline: float = 30) -> None:
    with trio.fail_after(deadline):
        while await http_status(port, "/health/ready") != 200:
            assert proc.returncode is None, f"relay exited with {proc.returncode}"
            await trio.sleep(0.1)


async def stop(proc: trio.Process, grace: float = 15) -> int:
    """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit status."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    with trio.move_on_after(grace):
        return await proc.wait()
    proc.kill()
    with trio.CancelScope(shield=True):
        return await proc.wait()


class RedisProxy:
    """A loopback TCP proxy in front of Redis that the test can cut and restore,
    which is how a node loses Redis without disturbing anyone else's tests."""

    def __init__(self, redis_url: str) -> None:
        parts = urlsplit(redis_url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self._rest = parts.path
        self._up = True
        self._links: set[trio.CancelScope] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}{self._rest}"

    def cut(self) -> None:
        self._up = False
        for scope in self._links:
            scope.cancel()

    def restore(self) -> None:
        self._up = True

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            if not self._up:
                return
            with trio.CancelScope() as scope:
                self._links.add(scope)
                try:
                    upstream = await trio.open_tcp_stream(*self._target)
                    async with upstream, trio.open_nursery() as nursery:
                        nursery.start_soon(_pipe, client, upstream, nursery.cancel_scope)
                        nursery.start_soon(_pipe, upstream, client, nursery.cancel_scope)
                finally:
                    self._links.discard(scope)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[RedisProxy]:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)
            yield self
            nursery.cancel_scope.cancel()


async def _pipe(src: trio.SocketStream, dst: trio.SocketStream, done: trio.CancelScope) -> None:
    try:
        while data := await src.receive_some(65536):
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    done.cancel()
