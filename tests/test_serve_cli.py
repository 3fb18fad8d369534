"""`mls-relay serve` as a newcomer runs it: no configuration at all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from .nodes import free_port, wait_ready
from .relayclient import connect

ALICE, BOB = "did:example:alice", "did:example:bob"
CLI = [sys.executable, "-m", "relay.cli"]


def _env(port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    for name in ("DATABASE_URL", "REDIS_URL"):
        env.pop(name, None)
    env["PORT"] = str(port)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return env


async def _token(cwd: Path, port: int, user: str, device: str) -> str:
    with trio.fail_after(30):
        out = await trio.run_process(
            [*CLI, "token", user, "--device", device],
            cwd=cwd,
            env=_env(port),
            capture_stdout=True,
        )
    return bytes(out.stdout).decode().strip()


async def _stop(proc: trio.Process) -> int:
    proc.send_signal(signal.SIGTERM)
    with trio.move_on_after(30):
        return await proc.wait()
    proc.kill()
    return await proc.wait()


@pytest.mark.timeout(90)
async def test_embedded_default_serves_drains_on_sigterm_and_keeps_data(tmp_path):
    port = free_port()
    url = f"ws://127.0.0.1:{port}/v1/ws"
    conv = b"cli-conv"
    proc = await trio.lowlevel.open_process([*CLI, "serve"], cwd=tmp_path, env=_env(port))
    try:
        await wait_ready(port, proc)
        assert (tmp_path / "data" / "relay.db").exists()
        secret = tmp_path / "data" / "jwt-secret"
        assert secret.stat().st_mode & 0o777 == 0o600
        alice = await _token(tmp_path, port, ALICE, "a1")
        with trio.fail_after(30):
            async with connect(url, ALICE, "a1", token=alice) as a:
                await a.ok("#createConversation", conversation=conv, members=[BOB])
                assert await a.send(conv, b"kept") == 1
                proc.send_signal(signal.SIGTERM)
                await a.closed.wait()
                assert a.close_code == 1012
        with trio.fail_after(30):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            await _stop(proc)
    # Restart on the same data directory: the acknowledged message is there.
    proc = await trio.lowlevel.open_process([*CLI, "serve"], cwd=tmp_path, env=_env(port))
    try:
        await wait_ready(port, proc)
        bob = await _token(tmp_path, port, BOB, "b1")
        with trio.fail_after(30):
            async with connect(url, BOB, "b1", token=bob, subscribe=True) as b:
                [m] = await b.messages(1)
                assert (m["seq"], m["ciphertext"]) == (1, b"kept")
    finally:
        assert await _stop(proc) == 0


def test_refuses_well_known_secret_outside_dev_mode(tmp_path):
    env = _env(free_port())
    env["RELAY_JWT_SECRET"] = "test_secret_for_local_development_only_change_in_production"
    out = subprocess.run(
        [*CLI, "serve"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    assert "well-known" in out.stderr


# The deployment note of the service we replace shipped these (shared/LESSONS.md).
CATBIRD_JWT = "test_secret_for_local_development_only_change_in_production"
CATBIRD_DB = "catbird_secure_password_change_in_production"
CATBIRD_REDIS = "redis_secure_password_change_in_production"


def _serve_refuses(tmp_path: Path, **env_vars: str) -> str:
    env = _env(free_port())
    env.update(env_vars)
    out = subprocess.run(
        [*CLI, "serve"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2, out.stderr
    assert not (tmp_path / "data" / "relay.db").exists()  # refused before touching anything
    return out.stderr


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"RELAY_JWT_SECRET": CATBIRD_JWT}, "RELAY_JWT_SECRET"),
        ({"RELAY_JWT_SECRET": CATBIRD_DB}, "RELAY_JWT_SECRET"),
        ({"RELAY_JWT_SECRET": CATBIRD_REDIS}, "RELAY_JWT_SECRET"),
        ({"DATABASE_URL": f"postgresql://cb:{CATBIRD_DB}@127.0.0.1:1/cb"}, "DATABASE_URL"),
        ({"REDIS_URL": f"redis://:{CATBIRD_REDIS}@127.0.0.1:1/0"}, "REDIS_URL"),
        ({"RELAY_JWT_SECRET": "changeme"}, "RELAY_JWT_SECRET"),
    ],
)
def test_refuses_each_well_known_secret(tmp_path, variables, named):
    stderr = _serve_refuses(tmp_path, **variables)
    assert named in stderr and "well-known" in stderr


def test_refuses_a_short_secret(tmp_path):
    stderr = _serve_refuses(tmp_path, RELAY_JWT_SECRET="only-31-bytes-of-random-0123456")
    assert "at least 32 bytes" in stderr


@pytest.mark.timeout(60)
async def test_dev_mode_allows_the_placeholder(tmp_path):
    port = free_port()
    env = _env(port) | {"RELAY_JWT_SECRET": CATBIRD_JWT, "RELAY_DEV_MODE": "1"}
    proc = await trio.lowlevel.open_process([*CLI, "serve"], cwd=tmp_path, env=env)
    try:
        await wait_ready(port, proc)
    finally:
        assert await _stop(proc) == 0


def test_compose_file_ships_no_default_secret():
    compose = (Path(__file__).resolve().parents[1] / "docker-compose.yml").read_text()
    for placeholder in (CATBIRD_JWT, CATBIRD_DB, CATBIRD_REDIS, "change_in_production"):
        assert placeholder not in compose
    # Every secret is required from the environment: ${VAR:?message}, never ${VAR:-default}.
    for name in ("RELAY_JWT_SECRET", "POSTGRES_PASSWORD"):
        uses = [line for line in compose.splitlines() if "${" + name in line]
        assert uses, name
        assert all("${" + name + ":?" in line for line in uses), uses
