"""Connection caps per source address and per node, and accept under EMFILE.

Before: one address held 5,000 idle sockets; under `ulimit -n 1024`, 11 of
14 legitimate connects failed over 40 s and the log filled with 469 EMFILE
tracebacks.  Loopback has many source addresses (127.0.0.2, ...): the
attacker and the honest clients use different ones."""

from __future__ import annotations

import json
import resource

import pytest
import trio

from tests.relayclient import make_token

from .httpnode import Node, error_of, exchange, metric, open_from, relay_node, request


def _upgrade(token: str) -> bytes:
    return (
        "GET /v1/ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()


async def _hold(node: Node, host: str, count: int, opened: list[trio.SocketStream]) -> None:
    """Open ``count`` idle sockets from ``host`` (paced: 2 ms apart)."""
    for _ in range(count):
        opened.append(await open_from(host, node.port))
        await trio.sleep(0.002)


async def _answers(sockets: list[trio.SocketStream], wait: float = 2.0) -> list[bytes]:
    """What each socket received within ``wait`` s (b"" for silence)."""
    got = [b""] * len(sockets)

    async def read(i: int) -> None:
        with trio.move_on_after(wait):
            try:
                while chunk := await sockets[i].receive_some(65536):
                    got[i] += chunk
            except trio.BrokenResourceError:
                pass

    async with trio.open_nursery() as nursery:
        for i in range(len(sockets)):
            nursery.start_soon(read, i)
    return got


async def _honest(node: Node, host: str, n: int) -> int:
    """``n`` honest connects from ``host`` (WebSocket upgrades and /health/live);
    returns how many failed."""
    failed = 0
    for i in range(n):
        try:
            if i % 2:
                status, _, _ = await exchange(node.port, request("GET", "/health/live"), host=host)
                failed += status != 200
            else:
                with trio.fail_after(10):
                    stream = await open_from(host, node.port)
                    async with stream:
                        await stream.send_all(_upgrade(make_token("did:example:honest", f"d{i}")))
                        failed += not (await stream.receive_some(4096)).startswith(b"HTTP/1.1 101")
        except (OSError, trio.TooSlowError):
            failed += 1
    return failed


def _refusal(raw: bytes) -> tuple[int, str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), raw[:200]
    parsed = json.loads(body)
    assert isinstance(parsed["message"], str)
    return int(head.split()[1]), parsed["error"]


async def _close_all(sockets: list[trio.SocketStream]) -> None:
    for s in sockets:
        await trio.aclose_forcefully(s)
    sockets.clear()


@pytest.mark.timeout(120)
async def test_one_address_is_capped_and_others_still_get_in(tmp_path) -> None:
    with trio.fail_after(100):
        async with relay_node(
            tmp_path, RELAY_CONNECTIONS_PER_ADDRESS="50", RELAY_HANDSHAKE_TIMEOUT_S="60"
        ) as node:
            attacker: list[trio.SocketStream] = []
            try:
                await _hold(node, "127.0.0.1", 200, attacker)
                answers = await _answers(attacker)
                silent = [a for a in answers if not a]
                refused = [_refusal(a) for a in answers if a]
                # Pending handshakes count: the first 50 sit idle, the rest are refused.
                print(f"one address, 200 sockets: {len(silent)} held, {len(refused)} refused")
                assert len(silent) == 50
                assert refused == [(429, "TooManyConnectionsFromAddress")] * 150
                assert await _honest(node, "127.0.0.2", 14) == 0
                refused_metric = await metric(
                    node.port, "relay_connections_refused_total", 'cap="per_address"'
                )
                assert refused_metric == 150
            finally:
                await _close_all(attacker)
            # Freed: the address gets in again.
            with trio.fail_after(10):
                while await _honest(node, "127.0.0.1", 2):  # noqa: ASYNC110 (polling the relay)
                    await trio.sleep(0.1)
            assert "Traceback" not in node.log_text()


@pytest.mark.timeout(150)
async def test_node_cap_below_a_low_fd_limit_and_emfile_backoff(tmp_path) -> None:
    with trio.fail_after(140):
        async with relay_node(
            tmp_path,
            nofile=256,
            RELAY_CONNECTIONS_PER_ADDRESS="50",
            RELAY_HANDSHAKE_TIMEOUT_S="60",
        ) as node:
            cap = await metric(node.port, "relay_sockets_cap")
            assert cap == 256 - 128, cap  # the soft limit was already the hard one
            attacker: list[trio.SocketStream] = []
            try:
                # One address: capped at 50; the node has room for honest users.
                await _hold(node, "127.0.0.1", 120, attacker)
                assert await _honest(node, "127.0.0.2", 14) == 0
                # Many addresses: the node cap (below the fd limit) refuses with 503.
                for host in range(3, 9):
                    await _hold(node, f"127.0.0.{host}", 40, attacker)
                answers = await _answers(attacker)
                kinds = {_refusal(a) for a in answers if a}
                assert kinds == {
                    (429, "TooManyConnectionsFromAddress"),
                    (503, "NodeBusy"),
                }, kinds
                # Every socket was admitted or refused: the admitted ones (no
                # answer) never outnumber the cap, honest sockets included.
                print(
                    f"fd limit 256, cap {cap:.0f}: {sum(not a for a in answers)} of "
                    f"{len(answers)} admitted, refusals {sorted(kinds)}"
                )
                assert sum(not a for a in answers) <= cap
                status, error = error_of(
                    await exchange(node.port, request("GET", "/health/live"), host="127.0.0.9")
                )
                assert (status, error) == (503, "NodeBusy")
                assert "Too many open files" not in node.log_text()
            finally:
                await _close_all(attacker)
            with trio.fail_after(10):
                while await _honest(node, "127.0.0.2", 1):  # noqa: ASYNC110 (sockets closing)
                    await trio.sleep(0.1)
            assert await metric(node.port, "relay_connections_refused_total", 'cap="node"') > 0

            # Descriptors taken elsewhere: lower the process's limit below what
            # it holds (the soft limit; the hard one stays), so that accept(2) fails with EMFILE.
            resource.prlimit(node.proc.pid, resource.RLIMIT_NOFILE, (node.fds(), 256))
            waiting: list[trio.SocketStream] = []
            try:
                await _hold(node, "127.0.0.2", 20, waiting)  # they wait in the backlog
                await trio.sleep(3)
                resource.prlimit(node.proc.pid, resource.RLIMIT_NOFILE, (256, 256))
                assert await _honest(node, "127.0.0.3", 4) == 0  # accepting again
            finally:
                await _close_all(waiting)
            log = node.log_text()
            assert log.count("accept failed") == 1, log[-3000:]
            assert log.count("accepting again") == 1
            assert "Traceback" not in log, log[-3000:]
            assert await metric(node.port, "relay_accept_errors_total") >= 2
