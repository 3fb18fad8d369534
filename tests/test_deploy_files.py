"""Deployment files: Procfile, docker-compose.yml, Dockerfile."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.conftest import in_ci
from tests.harness import running_relay
from tests.relayclient import AUDIENCE, SECRET

ROOT = Path(__file__).resolve().parent.parent
PROCFILE = ROOT / "Procfile"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

#: The CLI subcommands deployment files may refer to.
SUBCOMMANDS = {"serve", "migrate", "healthcheck"}

#: `mls-relay <sub>` as a shell word or as a JSON / YAML exec list.
_CLI_USE = re.compile(r"""mls-relay["']?\s*,?\s*["']?([a-z][a-z0-9-]*)""")


def compose_command() -> list[str]:
    """The docker-compose binary (v1) or `docker compose` (v2), or fail/skip."""
    exe = shutil.which("docker-compose")
    if exe:
        return [exe]
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    message = (
        "neither docker-compose nor `docker compose` is installed, so docker-compose.yml "
        "cannot be validated: apt-get install docker-compose (.ci/run does this as root)"
    )
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def compose_config(env_overrides: dict[str, str | None]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in env_overrides}
    env.update({k: v for k, v in env_overrides.items() if v is not None})
    return subprocess.run(
        [*compose_command(), "-f", str(COMPOSE), "config", "-q"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_compose_file_is_valid() -> None:
    result = compose_config({"POSTGRES_PASSWORD": "test-only", "RELAY_JWT_SECRET": "x" * 32})
    assert result.returncode == 0, result.stderr + result.stdout


@pytest.mark.parametrize("missing", ["POSTGRES_PASSWORD", "RELAY_JWT_SECRET"])
def test_compose_requires_secrets(missing: str) -> None:
    env: dict[str, str | None] = {"POSTGRES_PASSWORD": "test-only", "RELAY_JWT_SECRET": "x" * 32}
    env[missing] = None
    result = compose_config(env)
    assert result.returncode != 0
    assert f"set {missing}" in result.stderr + result.stdout


def _service_blocks(text: str) -> dict[str, list[str]]:
    """Top-level services of a compose file -> their lines (indentation-based, no YAML lib)."""
    blocks: dict[str, list[str]] = {}
    in_services = False
    current: list[str] | None = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            in_services = line.startswith("services:")
            current = None
        elif in_services and indent == 2:
            current = blocks.setdefault(line.strip().rstrip(":"), [])
        elif current is not None:
            current.append(line.strip())
    return blocks


def test_compose_text_rules() -> None:
    text = COMPOSE.read_text()
    # No well-known default passwords.
    assert "${POSTGRES_PASSWORD:?" in text
    assert "${RELAY_JWT_SECRET:?" in text
    for match in re.finditer(
        r"^\s*(?:-\s*)?(POSTGRES_PASSWORD|RELAY_JWT_SECRET)\s*[:=](.*)$", text, re.M
    ):
        name, value = match.group(1), match.group(2).strip()
        assert value.startswith(f"${{{name}:?"), f"{name} must be required, not {value!r}"
    services = _service_blocks(text)
    assert {"postgres", "redis", "relay"} <= set(services)
    # The database and Redis are never published on all interfaces.
    for name in ("postgres", "redis"):
        block = services[name]
        if "ports:" in block:
            entries = block[block.index("ports:") + 1 :]
            for entry in entries:
                if not entry.startswith("-"):
                    break
                value = entry.lstrip("- ").strip("\"'")
                assert value.startswith("127.0.0.1:"), f"{name} published publicly: {entry}"
    relay = services["relay"]
    assert "condition: service_healthy" in relay
    assert "stop_grace_period: 35s" in relay
    assert '- "3000:3000"' in relay
    assert "image: postgres:16" in services["postgres"]
    assert "image: redis:7" in services["redis"]


def test_procfile_lines() -> None:
    lines = [line.strip() for line in PROCFILE.read_text().splitlines() if line.strip()]
    assert "web: mls-relay serve" in lines
    assert "release: mls-relay migrate" in lines


def test_dockerfile_rules() -> None:
    text = DOCKERFILE.read_text()
    assert text.startswith("FROM python:3.11-slim")
    assert re.search(r"^USER (?!root\b)\S+", text, re.M), "the image must not run as root"
    assert 'CMD ["mls-relay", "serve"]' in text


def _cli_uses() -> dict[str, set[str]]:
    """Subcommand -> the files that invoke it."""
    uses: dict[str, set[str]] = {}
    for path in (PROCFILE, COMPOSE, DOCKERFILE):
        for sub in _CLI_USE.findall(path.read_text()):
            uses.setdefault(sub, set()).add(path.name)
    return uses


def test_deploy_files_use_only_known_subcommands() -> None:
    uses = _cli_uses()
    assert {"serve", "migrate", "healthcheck"} <= set(uses)
    unknown = set(uses) - SUBCOMMANDS
    assert not unknown, f"unknown mls-relay subcommands used: {unknown}"


def test_healthchecks_use_the_cli() -> None:
    compose = COMPOSE.read_text()
    assert '["CMD", "mls-relay", "healthcheck"]' in compose
    assert 'CMD ["mls-relay", "healthcheck"]' in DOCKERFILE.read_text()


def _mls_relay(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the installed console script, as the deployment files do."""
    exe = Path(sys.executable).with_name("mls-relay")
    assert exe.exists(), f"{exe} is not installed: pip install -e . provides it"
    return subprocess.run(
        [str(exe), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _deploy_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(
        DATABASE_URL=f"sqlite:///{tmp_path}/deploy.db",
        RELAY_JWT_SECRET=SECRET,
        RELAY_SERVICE_ID=AUDIENCE,
    )
    return env


def test_every_subcommand_the_files_use_is_a_command_of_the_cli(tmp_path: Path) -> None:
    env = _deploy_env(tmp_path)
    for sub in sorted(_cli_uses()):
        result = _mls_relay(sub, "--help", env=env)
        assert result.returncode == 0, (sub, result.stderr)
        assert result.stdout.startswith(f"usage: mls-relay {sub}"), (sub, result.stdout[:200])
    unknown = _mls_relay("no-such-command", "--help", env=env)  # the check can fail
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr


def test_release_command_migrates(tmp_path: Path) -> None:
    """Procfile's release and compose's migrate service: `mls-relay migrate`."""
    result = _mls_relay("migrate", env=_deploy_env(tmp_path))
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(tmp_path / "deploy.db") as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert {"messages", "conversations"} <= tables, tables
    again = _mls_relay("migrate", env=_deploy_env(tmp_path))  # every release runs it
    assert again.returncode == 0, again.stderr


@pytest.mark.timeout(60)
async def test_healthcheck_command_says_ready_only_when_ready(tmp_path: Path) -> None:
    """The HEALTHCHECK of the Dockerfile and compose: exit 0 against a ready
    relay on $PORT, non-zero once nothing answers there."""
    env = _deploy_env(tmp_path)
    with trio.fail_after(50):
        async with running_relay(env["DATABASE_URL"]) as r:
            env["PORT"] = str(r.port)
            ready = await trio.to_thread.run_sync(lambda: _mls_relay("healthcheck", env=env))
            assert ready.returncode == 0, ready.stderr
        gone = await trio.to_thread.run_sync(lambda: _mls_relay("healthcheck", env=env))
    assert gone.returncode == 1 and "not ready" in gone.stderr
