"""kill -9 during sustained sends: every acknowledged message survives exactly
once, nothing is half-stored, and retries of unacknowledged sends are stored
at most once."""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from .nodes import free_port, wait_ready
from .relayclient import AUDIENCE, SECRET, ConnectionLost, connect

CONV = b"crash"
SENDERS = [f"did:example:s{i}" for i in range(8)]
READER = "did:example:reader"


def _env(port: int, database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(
        PORT=str(port),
        DATABASE_URL=database_url,
        RELAY_JWT_SECRET=SECRET,
        RELAY_SERVICE_ID=AUDIENCE,
        RELAY_DEV_MODE="1",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    return env


def _payload(user: str, i: int) -> bytes:
    body = f"{user}/{i}".encode() * 40
    return hashlib.sha256(body).digest() + body


async def _start(port: int, database_url: str, cwd: Path) -> trio.Process:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relay.cli", "serve"], cwd=cwd, env=_env(port, database_url)
    )
    await wait_ready(port, proc)
    return proc


@pytest.mark.timeout(120)
async def test_kill_9_loses_no_acknowledged_message(database_url, tmp_path):
    port = free_port()
    url = f"ws://127.0.0.1:{port}/v1/ws"
    acked: dict[tuple[str, int], int] = {}
    attempted: dict[str, int] = {}
    proc = await _start(port, database_url, tmp_path)
    try:
        with trio.fail_after(60):
            async with connect(url, READER, "r") as c:
                await c.ok("#createConversation", conversation=CONV, members=SENDERS)

            async def sender(user: str) -> None:
                try:
                    async with connect(url, user, "d") as c:
                        i = 0
                        while True:
                            attempted[user] = i
                            seq = await c.send(CONV, _payload(user, i), f"{user}/{i}")
                            acked[(user, i)] = seq
                            i += 1
                except* (
                    ConnectionClosed,
                    ConnectionLost,
                    HandshakeError,
                    OSError,
                    trio.BrokenResourceError,
                ):
                    pass  # the relay was killed under this sender

            async with trio.open_nursery() as nursery:
                for user in SENDERS:
                    nursery.start_soon(sender, user)
                while len(acked) < 200:  # noqa: ASYNC110 (waiting for traffic to build up)
                    await trio.sleep(0.01)
                proc.send_signal(signal.SIGKILL)
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    proc = await _start(port, database_url, tmp_path)
    try:
        with trio.fail_after(60):
            # Senders retry everything they attempted, with the same ids.
            retried: dict[tuple[str, int], int] = {}
            for user in SENDERS:
                async with connect(url, user, "d") as c:
                    for i in range(attempted.get(user, -1) + 1):
                        retried[(user, i)] = await c.send(CONV, _payload(user, i), f"{user}/{i}")
            for key, seq in acked.items():
                assert retried[key] == seq, f"acknowledged {key} moved from {seq}"
            async with connect(url, READER, "r", subscribe=True) as reader:
                stored = await reader.messages(len(retried))
            seqs = [m["seq"] for m in stored]
            assert seqs == list(range(1, len(retried) + 1))
            for m in stored:  # never half-stored
                ct = m["ciphertext"]
                assert hashlib.sha256(ct[32:]).digest() == ct[:32]
            keys = [(m["sender"], m["ciphertext"][32:]) for m in stored]
            assert len(set(keys)) == len(keys), "a retried message was stored twice"
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(30):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
