"""``mls-relay inspect`` (relay.inspect.main): one JSON object per run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from relay.ops.inspect import main
from tests.vectorfiles import vector_path

PROJECT = Path(__file__).resolve().parents[1]


def vector(name: str, index: int = 0) -> dict[str, Any]:
    entry: dict[str, Any] = json.loads(vector_path(name).read_text())[index]
    return entry


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    status = main(list(argv))
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # exactly one JSON object
    report: dict[str, Any] = json.loads(out)
    return status, report


def write(tmp_path: Path, name: str, data: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return str(path)


def test_key_package_hex_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    e = vector("mlswg/welcome.json", 1)  # suite 2, P-256
    welcome = json.loads(
        subprocess.run(
            [sys.executable, "-m", "relay.ops.inspect", "--hex"],
            input=e["welcome"].encode(),
            capture_output=True,
            check=True,
            cwd=PROJECT,
        ).stdout
    )
    status, report = run(capsys, write(tmp_path, "kp.hex", e["key_package"] + "\n"))
    assert status == 0
    assert report["wire_format"] == "mls_key_package"
    assert report["cipher_suite"] == 2
    assert report["signatures_valid"] is True
    assert report["credential"]["type"] == "basic"
    assert report["lifetime"] == {"not_before": 0, "not_after": 2**64 - 1}
    assert [report["key_package_ref"]] == welcome["new_members"]
    assert welcome["wire_format"] == "mls_welcome" and welcome["cipher_suite"] == 2
    assert "group_id" not in report and "epoch" not in report


def test_binary_and_bare_key_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    e = vector("mlswg-subsets/passive-client-welcome.cs1-3.json")
    data = bytes.fromhex(e["key_package"])
    status, framed = run(capsys, write(tmp_path, "kp.bin", data), "--binary")
    assert status == 0 and framed["signatures_valid"] is True
    status, bare = run(capsys, write(tmp_path, "bare.bin", data[4:]), "--bare-key-package")
    assert status == 0 and bare["bare"] is True
    assert bare["key_package_ref"] == framed["key_package_ref"]
    assert bare["credential"] == framed["credential"]
    identity = bytes.fromhex(framed["credential"]["identity_hex"])
    if "identity" in framed["credential"]:
        assert framed["credential"]["identity"] == identity.decode()


def test_bad_signature_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = bytearray.fromhex(vector("mlswg/welcome.json")["key_package"])
    data[-1] ^= 0x01  # last byte of the KeyPackage signature
    status, report = run(capsys, write(tmp_path, "kp.bin", bytes(data)))
    assert status == 0 and report["signatures_valid"] is False


def test_public_and_private_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    e = vector("mlswg/message-protection.json")
    status, commit = run(capsys, write(tmp_path, "c.hex", e["commit_pub"]))
    assert status == 0
    assert commit["wire_format"] == "mls_public_message"
    assert commit["group_id"] == e["group_id"] and commit["epoch"] == e["epoch"]
    assert commit["content_type"] == "commit"
    assert commit["sender"] == {"type": "member", "leaf_index": 1}
    assert "proposals" in commit and "has_path" in commit
    status, proposal = run(capsys, write(tmp_path, "p.hex", e["proposal_pub"]))
    assert proposal["content_type"] == "proposal" and "proposal_type" in proposal
    status, private = run(capsys, write(tmp_path, "a.hex", e["application_priv"]))
    assert private["wire_format"] == "mls_private_message"
    assert private["content_type"] == "application" and "sender" not in private


def test_external_join_and_group_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    commit = vector("mlswg/interop-passive-external_join.json")["epochs"][0]["commit"]
    status, report = run(capsys, write(tmp_path, "c.hex", commit))
    assert status == 0 and report["sender"] == {"type": "new_member_commit"}
    info = vector("mlswg-subsets/messages.30-entries.json")["mls_group_info"]
    status, report = run(capsys, write(tmp_path, "gi.hex", info))
    assert report["wire_format"] == "mls_group_info"
    assert {"group_id", "epoch", "cipher_suite", "signer"} <= set(report)


@pytest.mark.parametrize(
    ("content", "flags", "error", "field"),
    [
        ("0001000100", [], "MalformedMLS", "mls_message.public_message.content.epoch"),
        ("00010009", [], "UnsupportedMLS", "mls_message.wire_format"),
        ("00020001", [], "UnsupportedMLS", "mls_message.version"),
        ("zz", ["--hex"], "MalformedMLS", "input"),
        ("abc", ["--hex"], "MalformedMLS", "input"),
        ("", [], "MalformedMLS", "mls_message.version"),
        ("0001", ["--bare-key-package"], "MalformedMLS", "key_package.cipher_suite"),
    ],
)
def test_malformed_input(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str,
    flags: list[str],
    error: str,
    field: str,
) -> None:
    status, report = run(capsys, write(tmp_path, "bad.hex", content), *flags)
    assert status == 1
    assert report["error"] == error
    assert report["field"] == field
    assert "offset" in report or field == "input"
    assert report["message"]


def test_trailing_bytes_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kp = vector("mlswg/welcome.json")["key_package"]
    status, report = run(capsys, write(tmp_path, "kp.hex", kp + "00"))
    assert status == 1 and "trailing" in report["message"]
    assert report["offset"] == len(kp) // 2


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, report = run(capsys, str(tmp_path / "nope.bin"))
    assert status == 1 and report["error"] == "InputError"


def test_subprocess_reads_stdin_and_fails_nonzero() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "relay.ops.inspect", "-"],
        input=b"\x00\x01\x00\x05\x00",
        capture_output=True,
        cwd=PROJECT,
    )
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["error"] == "MalformedMLS"
    assert report["field"].startswith("mls_message.key_package")
