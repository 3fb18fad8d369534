"""Helpers for the HTTP-edge attack tests: a relay subprocess whose memory,
descriptors and latency the test measures, and raw HTTP on loopback.

Every helper is bounded in time; the relay is stopped by the context manager
whatever the test does."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from tests.nodes import CLI, free_port, node_env, stop, wait_ready


@dataclass
class Node:
    proc: trio.Process
    port: int
    log: Path

    def rss_mb(self) -> float:
        """Resident memory of the relay process now, MiB."""
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@asynccontextmanager
async def relay_node(
    tmp_path: Path,
    database_url: str = "",
    *,
    nofile: int | None = None,
    **settings: str,
) -> AsyncIterator[Node]:
    """``mls-relay serve`` on a free loopback port (SQLite in ``tmp_path``
    unless ``database_url``), optionally under RLIMIT_NOFILE ``nofile``."""
    port = free_port()
    url = database_url or f"sqlite:///{tmp_path}/relay.db"
    env = node_env(port, url, "", "", RELAY_DATA_DIR=str(tmp_path / "data"), **settings)
    env.pop("REDIS_URL")
    if "REDIS_URL" in settings:
        env["REDIS_URL"] = settings["REDIS_URL"]
    if database_url:
        with trio.fail_after(30):
            await trio.run_process([*CLI, "migrate"], env=env, capture_stdout=True)
    log = tmp_path / f"relay-{port}.log"

    def limit_fds() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with open(log, "ab") as out:  # noqa: ASYNC230 - once, before the relay starts
        proc = await trio.lowlevel.open_process(
            [*CLI, "serve"], env=env, stdin=None, stdout=out, stderr=out, preexec_fn=limit_fds
        )
    try:
        await wait_ready(port, proc)
        yield Node(proc, port, log)
    finally:
        with trio.CancelScope(shield=True):
            await stop(proc, grace=5)


async def exchange(
    port: int, raw: bytes, *, host: str = "127.0.0.1", limit: float = 30
) -> tuple[int, dict[str, str], bytes]:
    """Send a raw request; read the response until the server closes."""
    with trio.fail_after(limit):
        stream = await open_from(host, port)
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                # (the server may answer and close before taking it all)
                await stream.send_all(raw)
            data = b""
            try:
                while chunk := await stream.receive_some(65536):
                    data += chunk
            except trio.BrokenResourceError:
                pass
    return parse_response(data)


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return int(lines[0].split()[1]), headers, body


def dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if not size:
            break
        out, body = out + body[:size], body[size + 2 :]
    return out


async def open_from(host: str, port: int) -> trio.SocketStream:
    """A TCP connection to 127.0.0.1:port whose source address is ``host``
    (127.0.0.2 etc.: a second client address on loopback)."""
    sock = trio.socket.socket()
    try:
        await sock.bind((host, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def request(
    method: str,
    path: str,
    token: str | None = None,
    body: bytes = b"",
    *,
    content_type: str | None = None,
    length: int | None = -1,
) -> bytes:
    """A request head (and body); ``length`` None sends no Content-Length."""
    head = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: close"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    if content_type:
        head.append(f"Content-Type: {content_type}")
    if length is not None:
        head.append(f"Content-Length: {len(body) if length == -1 else length}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def error_of(status_headers_body: tuple[int, dict[str, str], bytes]) -> tuple[int, str]:
    """(status, error) of a JSON error answer; fails unless it is {error, message}."""
    status, headers, body = status_headers_body
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body)
    parsed = json.loads(body)
    assert isinstance(parsed.get("error"), str) and isinstance(parsed.get("message"), str), parsed
    return status, parsed["error"]


@dataclass
class Prober:
    """Asks /health/live every ``period`` s and records each answer's latency."""

    port: int
    period: float = 0.02
    host: str = "127.0.0.2"
    latencies: list[float] = field(default_factory=list)
    failures: int = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            started = time.perf_counter()
            try:
                status, _, _ = await exchange(
                    self.port, request("GET", "/health/live"), host=self.host, limit=10
                )
                if status != 200:
                    self.failures += 1
            except (OSError, trio.TooSlowError, ValueError, IndexError):
                self.failures += 1
            self.latencies.append(time.perf_counter() - started)
            await trio.sleep(self.period)

    @property
    def worst_ms(self) -> float:
        return 1000 * max(self.latencies) if self.latencies else float("inf")


#: The slowest /health/live answer allowed while under attack, but for one
#: in a hundred (a loaded 2-core machine preempts the relay, or the test
#: process that asks, now and then), and the slowest of all: an event loop
#: blocked by the attack (2.8 s for the SSE cursor attack of issue 12) fails.
LIVE_MS, LIVE_WORST_MS = 250, 1000


def live(prober: Prober) -> str:
    """The 99th percentile and worst /health/live latency, for the report."""
    ms = sorted(1000 * x for x in prober.latencies)
    return f"{ms[len(ms) * 99 // 100]:.0f}/{ms[-1]:.0f}" if ms else "none"


def check_live(prober: Prober, min_samples: int = 10) -> None:
    """Every /health/live answered 200 while under attack, in time (above);
    short attacks pass a smaller ``min_samples`` (then none may be slow)."""
    ms = sorted(1000 * x for x in prober.latencies)
    assert prober.failures == 0 and len(ms) >= min_samples, (prober.failures, len(ms))
    slow = [round(x) for x in ms if x >= LIVE_MS]
    assert len(slow) <= len(ms) // 100 and ms[-1] < LIVE_WORST_MS, (slow, len(ms))


async def metric(port: int, name: str, labels: str = "", host: str = "127.0.0.250") -> float:
    """One sample of /metrics (0 when absent), asked from ``host``."""
    status, _, body = await exchange(port, request("GET", "/metrics"), host=host)
    assert status == 200, body
    wanted = name + (f"{{{labels}}}" if labels else "")
    for line in body.decode().splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


async def during(prober: Prober, work: Callable[[], Any]) -> Any:
    """Run ``work()`` while ``prober`` measures; returns what work returned."""
    async with trio.open_nursery() as nursery:
        await nursery.start(prober.run)
        result = await work()
        nursery.cancel_scope.cancel()
    return result
