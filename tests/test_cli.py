"""`mls-relay check` and `mls-relay tail`, run as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import trio

from .conftest import RedisTarget
from .harness import running_relay
from .relayclient import connect, make_token

ALICE, BOB = "did:example:alice", "did:example:bob"
SECRET = "cli-test-secret-0123456789-abcdefghijklmnop"


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RELAY_") and k not in ("DATABASE_URL", "REDIS_URL", "PORT")
    }
    env.update(RELAY_DATA_DIR=str(tmp_path / "data"), RELAY_JWT_SECRET=SECRET, **extra)
    return env


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=45,
        check=False,
    )


def test_check_passes_and_redacts(tmp_path, redis_url: RedisTarget):
    env = clean_env(tmp_path, DATABASE_URL=f"sqlite:///{tmp_path}/c.db", REDIS_URL=redis_url.url)
    result = run_cli(["check"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert SECRET not in result.stdout
    config = json.loads(result.stdout.split("configuration:\n", 1)[1].split("connectivity:")[0])
    assert config["RELAY_JWT_SECRET"] == "<redacted>"
    assert "database: ok" in result.stdout and "redis: ok" in result.stdout


def test_check_fails_on_unreachable_services(tmp_path):
    env = clean_env(
        tmp_path,
        DATABASE_URL="postgresql://relay:hunter2-password@127.0.0.1:9/relay",
        REDIS_URL="redis://:redis-password@127.0.0.1:9/0",
    )
    result = run_cli(["check"], env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "database: FAILED" in result.stdout and "redis: FAILED" in result.stdout
    assert "hunter2-password" not in result.stdout + result.stderr
    assert "redis-password" not in result.stdout + result.stderr


def test_check_rejects_invalid_configuration(tmp_path):
    result = run_cli(["check"], clean_env(tmp_path, PORT="not-a-port"))
    assert result.returncode == 2 and "PORT" in result.stderr


async def test_tail_prints_events_as_json_lines(tmp_path):
    conv = b"\x00tail"
    with trio.fail_after(45):
        async with running_relay(f"sqlite:///{tmp_path}/r.db") as r:
            async with connect(r.ws_url, ALICE, "a1") as alice:
                await alice.ok("#createConversation", conversation=conv, members=[BOB])
                await alice.send(conv, b"\x01\x02first")
                await alice.send(conv, b"second")
            env = clean_env(tmp_path, RELAY_TOKEN=make_token(BOB, "tail"))
            result = await trio.run_process(
                [sys.executable, "-m", "relay.cli", "tail", "--url", r.ws_url, "--count", "2"],
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert result.returncode == 0, result.stderr.decode()
            lines = [json.loads(line) for line in result.stdout.decode().splitlines()]
            assert lines[0]["type"] == "connected" and lines[0]["device"] == "tail"
            messages = [line for line in lines if line["type"] == "message"]
            assert [(m["seq"], m["ciphertext"]) for m in messages] == [
                (1, b"\x01\x02first".hex()),
                (2, b"second".hex()),
            ]
            assert all(m["conversation"] == conv.hex() for m in messages)
            # tail does not acknowledge: the stored cursor did not move.
            assert await r.relay.storage.get_cursors(BOB, "tail") == {}
            async with connect(r.ws_url, BOB, "tail") as bob:  # an ack would have moved it
                await bob.ok("#ack", conversation=conv, seq=2)
            assert await r.relay.storage.get_cursors(BOB, "tail") == {conv: 2}


def test_tail_needs_a_token(tmp_path):
    result = run_cli(["tail", "--url", "ws://127.0.0.1:9/v1/ws"], clean_env(tmp_path))
    assert result.returncode == 2 and "RELAY_TOKEN" in result.stderr
