"""The Python client stands on its own: in a fresh venv holding only
mls-relay-client (clients/python) and the dependencies it declares, none of
the server's packages is installed, and the SDK connects to a relay process
(started from the main venv), subscribes, sends and receives.

The venv is cached under .venv/client-standalone, rebuilt when any file of
clients/python changes (a first build takes ~15 s: pip installs the client's
wheel and trio, trio-websocket, cbor2 from the configured index).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import trio

from . import nodes
from .relayclient import make_token

ROOT = Path(__file__).resolve().parents[1]
CLIENT_DIR = ROOT / "clients" / "python"
CACHE = ROOT / ".venv" / "client-standalone"
SCRIPT = Path(__file__).with_name("client_standalone_run.py")
ALICE, BOB = "did:example:alice", "did:example:bob"
#: Distributions of the server's stack (PyPI names): none may be in the venv.
SERVER_DISTRIBUTIONS = {
    "mls-relay",
    "psycopg",
    "psycopg-binary",
    "hypercorn",
    "quart",
    "quart-trio",
    "coredis",
    "prometheus-client",
    "pyjwt",
    "structlog",
    "httpx",
}


def client_sources_digest() -> str:
    """What the cached venv was built from: every file of clients/python."""
    digest = hashlib.sha256()
    for path in sorted(CLIENT_DIR.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and ".egg-info" not in str(path):
            digest.update(str(path.relative_to(CLIENT_DIR)).encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()


async def client_venv() -> Path:
    """The cached venv's python; built afresh when the client's files changed,
    into a side directory renamed into place once complete (an interrupted
    build is never taken for a good one)."""
    want = client_sources_digest()
    python = CACHE / "bin" / "python"
    if (CACHE / "built-from").exists() and (CACHE / "built-from").read_text() == want:
        return python
    building = CACHE.with_name(f"{CACHE.name}.building")
    shutil.rmtree(building, ignore_errors=True)
    with trio.fail_after(300):  # venv + wheel build + dependencies, on a loaded machine
        # sys.executable is the main venv's python: venv bases the new one on the
        # interpreter beneath it, without the main venv's packages.
        await trio.run_process([sys.executable, "-m", "venv", str(building)])
        await trio.run_process(
            [building / "bin" / "python", "-m", "pip", "install", "--quiet", str(CLIENT_DIR)],
            capture_stdout=True,
        )
    (building / "built-from").write_text(want)
    shutil.rmtree(CACHE, ignore_errors=True)
    # Only bin/python is run, and it finds its site-packages from where it is.
    building.rename(CACHE)
    return python


@pytest.mark.timeout(420)
async def test_client_works_without_the_server_installed(tmp_path: Path) -> None:
    python = await client_venv()
    port = nodes.free_port()
    env = nodes.node_env(port, f"sqlite:///{tmp_path}/relay.db", "", "standalone")
    proc = await nodes.start(env, log=tmp_path / "relay.log")
    try:
        await nodes.wait_ready(port, proc)
        with trio.fail_after(90):
            done = await trio.run_process(
                # -I: no PYTHONPATH, no user site, not the script's directory
                # (tests/), so nothing of the checkout is importable by accident.
                [python, "-I", SCRIPT, f"ws://127.0.0.1:{port}/v1/ws",
                 make_token(ALICE, "a1"), make_token(BOB, "b1")],
                cwd=tmp_path,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )  # fmt: skip
    finally:
        await nodes.stop(proc)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = json.loads(done.stdout)
    assert report["importable"] == [], "server modules in the client's venv"
    assert not SERVER_DISTRIBUTIONS & set(report["distributions"]), report["distributions"]
    assert "mls-relay-client" in report["distributions"]
    assert report["client_file"].startswith(str(CACHE)), "the installed client, not the checkout"
    assert report["members"] == sorted([ALICE, BOB])
    assert report["received"] == [report["sent_seq"], ALICE, "sent by a standalone client"]
    assert report["acked"] == report["sent_seq"] == 1
    assert report["hello"] == {"user": BOB, "device": "b1"}


# The server's side: it runs without the client, and only `mls-relay tail` needs it.
_WITHOUT_CLIENT = (
    "import sys; sys.modules['mls_relay_client'] = None  # as if not installed\n"
    "from relay.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [["tail", "--token", "t"], ["tail", "--help"]])
async def test_tail_without_the_client_says_how_to_install_it(args: list[str]) -> None:
    with trio.fail_after(50):
        done = await trio.run_process(
            [sys.executable, "-c", _WITHOUT_CLIENT, *args],
            cwd=ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 2, done.stderr
    assert b"pip install ./clients/python" in done.stderr, done.stderr


@pytest.mark.timeout(60)
async def test_the_server_cli_answers_without_the_client() -> None:
    with trio.fail_after(50):
        done = await trio.run_process(
            [sys.executable, "-c", _WITHOUT_CLIENT, "--help"],
            cwd=ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    assert b"tail" in done.stdout and b"serve" in done.stdout
