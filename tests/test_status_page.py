"""/status in headless Chromium, under traffic; /status.json's numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import trio

from .conftest import in_ci
from .harness import running_relay
from .relayclient import connect
from .test_relay_edges import http_request

ALICE, BOB = "did:example:alice", "did:example:bob"
CHROMIUM = "/usr/bin/chromium"


def chromium() -> str:
    if Path(CHROMIUM).exists():
        return CHROMIUM
    message = f"{CHROMIUM} is missing: apt-get install chromium (.ci/run installs it as root)"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


async def run_chromium(exe: str, tmp_path: Path, url: str, *mode: str) -> bytes:
    result = await trio.run_process(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--window-size=1200,900",
            "--virtual-time-budget=5000",
            *mode,
            url,
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return bytes(result.stdout)


async def get_json(port: int, path: str) -> dict:
    req = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    status, headers, body = await http_request(port, req)
    assert status == 200 and headers["content-type"].startswith("application/json")
    return json.loads(body)


@pytest.mark.timeout(90)
async def test_status_page_renders_live_figures(tmp_path):
    exe = chromium()
    conv = b"status-room"
    with trio.fail_after(80):
        async with (
            running_relay(f"sqlite:///{tmp_path}/r.db") as r,
            connect(r.ws_url, ALICE, "a1") as alice,
            connect(r.ws_url, BOB, "b1", subscribe=True) as bob,
            trio.open_nursery() as traffic,
        ):
            await alice.ok("#createConversation", conversation=conv, members=[BOB])
            await alice.request("#send", conversation="bad")  # one error to show

            async def chat() -> None:
                i = 0
                while True:
                    await alice.send(conv, b"msg-%d" % i)
                    i += 1
                    await trio.sleep(0.02)

            traffic.start_soon(chat)
            # A few one-second samples with traffic in them.
            with trio.fail_after(20):
                while True:
                    status = await get_json(r.port, "/status.json")
                    if len(status["series"]) >= 3 and status["messages_per_second"] > 0:
                        break
                    await trio.sleep(0.5)
            assert status["connections"] == {"websocket": 2, "sse": 0, "total": 2}
            assert status["errors_recent"] == {"InvalidRequest": 1}
            assert status["nodes"][0]["node"] == r.relay.node_id and status["nodes"][0]["self"]
            assert "did:" not in json.dumps(status)

            page = f"http://127.0.0.1:{r.port}/status"
            dom = (await run_chromium(exe, tmp_path, page, "--dump-dom")).decode()
            figures = {
                key: re.search(rf'id="{key}">([^<]*)<', dom)
                for key in ("connections", "mps", "committed", "node")
            }
            assert all(figures.values()), dom[:3000]
            values = {k: m.group(1) for k, m in figures.items() if m}
            assert values["connections"] == "2"
            assert float(values["mps"]) > 0
            assert int(values["committed"]) > 0
            assert values["node"] == r.relay.node_id
            assert re.search(r'<polyline class="series-mps"[^>]* points="[\d., ]{20,}"', dom)
            assert "InvalidRequest" in dom and "(this node)" in dom

            shot = tmp_path / "status.png"
            await run_chromium(exe, tmp_path, page, f"--screenshot={shot}")
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
            traffic.cancel_scope.cancel()
            await bob.messages(1)
