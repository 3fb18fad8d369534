"""``mls-relay serve --workers 2``: two processes on one port, fanning out to
each other through Redis, supervised (restart on crash, SIGTERM forwarded)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError

from .backends import clone_database
from .nodes import CLI, free_port, migrate, node_env, start, stop, wait_ready
from .relayclient import Client, connect

ALICE, BOB = "did:example:alice", "did:example:bob"


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    with clone_database(pg_template) as url:
        yield url


def _pid(node: str) -> int:
    # Without RELAY_NODE_ID a node is named host-pid (relay.app).
    return int(node.rsplit("-", 1)[1])


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text(errors="replace").lower()
    except FileNotFoundError:
        return False


async def _clients_on_both(
    stack: AsyncExitStack, url: str, users: list[str], attempts: int = 200
) -> dict[str, Client]:
    """Connect until one client of each user sits on a different worker; which
    worker accepts is the kernel's choice (and a worker may still be starting:
    readiness only proves one is up), so this is bounded retrying."""
    by_node: dict[str, Client] = {}
    for i in range(attempts):
        user = users[len(by_node)]
        inner = AsyncExitStack()
        try:
            client = await inner.enter_async_context(connect(url, user, f"d{i}"))
        except (HandshakeError, ConnectionClosed, OSError, trio.BrokenResourceError) as exc:
            # Refused (503) by a worker that is draining, or reset by one that died
            # with the connection in its accept queue; any other failure is a bug.
            if isinstance(exc, ConnectionRejected):
                assert exc.status_code == 503, exc
            await trio.sleep(0.1)
            continue
        node = client.hello["node"]
        if node in by_node:
            await inner.aclose()
            await trio.sleep(0.1)
            continue
        by_node[node] = client
        stack.push_async_exit(inner)
        if len(by_node) == len(users):
            return by_node
    raise AssertionError(f"connections never reached {len(users)} workers: {list(by_node)}")


@pytest.mark.timeout(120)
async def test_two_workers_share_a_port_and_fan_out_through_redis(pg_url, redis_url, tmp_path):
    prefix = f"{redis_url.prefix}{secrets.token_hex(4)}:"
    port = free_port()
    env = node_env(port, pg_url, redis_url.url, prefix)
    url = f"ws://127.0.0.1:{port}/v1/ws"
    conv = b"workers"
    proc = None
    try:
        with trio.fail_after(100):
            await migrate(env)
            proc = await start(env, "--workers", "2", log=tmp_path / "serve.log")
            await wait_ready(port, proc, deadline=40)
            async with AsyncExitStack() as stack:
                clients = await _clients_on_both(stack, url, [ALICE, BOB])
                (node_a, alice), (node_b, bob) = clients.items()
                assert _pid(node_a) != _pid(node_b)
                await alice.ok("#createConversation", conversation=conv, members=[BOB])
                await bob.ok("#subscribe")
                await alice.ok("#subscribe")
                await bob.caught_up()
                await alice.caught_up()
                sent = [await alice.send(conv, b"a%d" % i) for i in range(20)]
                assert [m["seq"] for m in await bob.messages(20, conv)] == sent
                seq = await bob.send(conv, b"from b")
                assert [m["seq"] for m in await alice.messages(1, conv)] == [seq]

                # A worker that dies is restarted; the other keeps serving.
                os.kill(_pid(node_b), signal.SIGKILL)
                await bob.closed.wait()
                seq = await alice.send(conv, b"while b restarts")
                async with AsyncExitStack() as again:
                    fresh = await _clients_on_both(again, url, [ALICE, BOB])
                    assert node_a in fresh and node_b not in fresh, list(fresh)
                    (new_node,) = set(fresh) - {node_a}
                    assert _alive(_pid(new_node))
            pids = [_pid(node_a), _pid(new_node)]
            assert proc.returncode is None
            # SIGTERM to the supervisor drains every worker, then it exits 0.
            assert await stop(proc, grace=40) == 0
            assert not any(_alive(pid) for pid in pids)
    finally:
        if proc is not None:
            with trio.CancelScope(shield=True):
                await stop(proc)
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert "restarting" in log


def test_workers_need_redis_and_postgresql(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    for name in ("REDIS_URL", "DATABASE_URL"):
        env.pop(name, None)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run(
        [*CLI, "serve", "--workers", "2"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "needs REDIS_URL" in out.stderr, out.stderr
    env["REDIS_URL"] = "redis://127.0.0.1:1/0"
    out = subprocess.run(
        [*CLI, "serve", "--workers", "2"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "PostgreSQL" in out.stderr, out.stderr
