"""Every ``mls-relay`` command answers --help, and options work in any order
(the commands run as real subprocesses, as a user types them)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vectorfiles import load_vectors

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        input=stdin,
        capture_output=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def subcommands() -> list[str]:
    """The commands ``mls-relay --help`` lists (so a new one is tested too)."""
    out = cli("--help")
    assert out.returncode == 0, out.stderr
    match = re.search(rb"\{([a-z,-]+)\}", out.stdout)
    assert match, out.stdout
    return match.group(1).decode().split(",")


def test_the_command_list_is_complete():
    assert set(subcommands()) >= {
        "serve", "migrate", "healthcheck", "config", "token", "inspect", "check", "bench", "tail",
    }  # fmt: skip


@pytest.mark.parametrize("command", subcommands())
def test_every_command_answers_help(command: str):
    out = cli(command, "--help")
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.startswith(b"usage: "), out.stdout[:200]
    if command != "bench":  # bench/run.py prints its own usage line
        assert out.stdout.startswith(f"usage: mls-relay {command}".encode()), out.stdout[:200]


def bare_key_package_hex() -> str:
    kp = load_vectors("mlswg/welcome.json")[0]["key_package"]
    return str(kp[8:])  # without the 4-byte MLSMessage header


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "--bare-key-package"],
        ["inspect", "--bare-key-package", "-"],
        ["inspect", "-", "--bare-key-package"],
        ["inspect", "--hex", "--bare-key-package"],
        ["inspect", "--bare-key-package", "--hex", "-"],
    ],
)
def test_inspect_options_in_any_order(args: list[str]):
    out = cli(*args, stdin=bare_key_package_hex().encode() + b"\n")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["bare"] is True and report["wire_format"] == "mls_key_package"
    assert report["signatures_valid"] is True


def test_inspect_reads_a_file_with_options_before_it(tmp_path: Path):
    path = tmp_path / "kp.hex"
    path.write_text(bare_key_package_hex())
    out = cli("inspect", "--bare-key-package", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["bare"] is True


def test_inspect_usage_errors_exit_2():
    out = cli("inspect", "--no-such-option")
    assert out.returncode == 2 and b"unrecognized arguments: --no-such-option" in out.stderr
