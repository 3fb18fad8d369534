"""New connections per source address per second are bounded at accept, before
any of the request is read (no token parsed, no signature checked), and the
bucket table is bounded without a pruning the attacker could use.

Before: one address could open handshakes as fast as it liked; only the
number of connections open at once was capped."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from relay.base.config import ConfigError, from_env
from relay.edge.connrate import OVERFLOW, ConnectRate
from tests.harness import running_relay
from tests.relayclient import make_token

from .httpnode import open_from, parse_response

RATE, BURST = 0.5, 5  # slow refill: one token per 2 s, so a loaded machine cannot blur counts


async def knock(port: int, host: str, head: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Connect from ``host``; send ``head`` (maybe nothing); read the answer."""
    with trio.fail_after(20):
        stream = await open_from(host, port)
        async with stream:
            if head:
                await stream.send_all(head)
            data = b""
            with trio.move_on_after(5 if head else 1):
                while part := await stream.receive_some(65536):
                    data += part
    return parse_response(data) if data else (0, {}, b"")


LIVE = b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def refusal(answer: tuple[int, dict[str, str], bytes]) -> bool:
    status, _, body = answer
    return status == 429 and b"TooManyConnectionAttempts" in body


@pytest.mark.timeout(90)
async def test_connect_rate_per_address(tmp_path: Path) -> None:
    async with running_relay(
        f"sqlite:///{tmp_path}/relay.db",
        connect_rate_per_address=RATE,
        connect_burst_per_address=BURST,
    ) as r:
        started = time.monotonic()
        answers = [await knock(r.port, "127.0.0.2", LIVE) for _ in range(3 * BURST)]
        elapsed = time.monotonic() - started
        served = sum(a[0] == 200 for a in answers)
        refused = sum(refusal(a) for a in answers)
        # The burst, plus what refilled meanwhile; every other one refused.
        assert BURST <= served <= BURST + int(elapsed * RATE) + 1, (served, elapsed)
        assert served + refused == len(answers)
        _, headers, body = next(a for a in answers if refusal(a))
        assert headers["content-type"].startswith("application/json")
        assert b'"retry_after_ms"' in body
        # Refused before a byte of the request is read: the answer comes to a
        # socket that never sends anything, and costs no token work.
        assert refusal(await knock(r.port, "127.0.0.2"))
        # Another address is not affected, and a WebSocket handshake from the
        # limited one is refused the same way, token unread.
        assert (await knock(r.port, "127.0.0.3", LIVE))[0] == 200
        upgrade = (
            f"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {make_token('did:example:a', 'd')}\r\n\r\n"
        ).encode()
        assert refusal(await knock(r.port, "127.0.0.2", upgrade))
        gate_refused = await _metric(r.port, "rate_per_address")
        assert gate_refused >= refused + 2


async def _metric(port: int, cap: str) -> float:
    _, _, body = await knock(port, "127.0.0.4", b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
                             b"Connection: close\r\n\r\n")  # fmt: skip
    for line in body.decode().splitlines():
        if line.startswith(f'relay_connections_refused_total{{cap="{cap}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no refused metric for {cap}")


@pytest.mark.timeout(90)
async def test_connect_rate_behind_trusted_proxy(tmp_path: Path) -> None:
    async with running_relay(
        f"sqlite:///{tmp_path}/relay.db",
        connect_rate_per_address=RATE,
        connect_burst_per_address=BURST,
        trusted_proxies="127.0.0.5",
    ) as r:

        def via(client: str) -> bytes:
            return (
                f"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {client}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()

        # The proxy itself is never limited; the client it names is.
        answers = [await knock(r.port, "127.0.0.5", via("198.51.100.7")) for _ in range(2 * BURST)]
        served = sum(a[0] == 200 for a in answers)
        assert BURST <= served < 2 * BURST and all(a[0] == 200 or refusal(a) for a in answers)
        assert (await knock(r.port, "127.0.0.5", via("198.51.100.8")))[0] == 200


def test_bucket_table_is_bounded_and_cannot_be_reset() -> None:
    now = [0.0]
    rate = ConnectRate(1.0, 2, clock=lambda: now[0], max_addresses=100)
    assert rate.take("victim") == 0 and rate.take("victim") == 0 and rate.take("victim") > 0
    # A flood from many other addresses within one refill time (2 s)...
    for i in range(10_000):
        rate.take(f"10.0.{i // 256}.{i % 256}")
    assert len(rate.buckets) <= 101  # the table, and the one shared overflow bucket
    assert OVERFLOW in rate.buckets
    # ...neither lifts the victim's limit (its entry is recent, so it stays)...
    assert rate.take("victim") > 0
    # ...nor lets the flood go on: the addresses it could not track share one bucket.
    assert rate.take("192.0.2.1") > 0
    # Idle for a full refill, an entry is dropped: it was full again anyway.
    now[0] = 2.0
    assert rate.take("victim") == 0
    assert len(rate.buckets) == 1
    assert ConnectRate(0, 1).take("x") == 0  # 0 disables


@pytest.mark.parametrize(
    "name",
    [
        "RELAY_CONNECT_RATE_PER_ADDRESS",
        "RELAY_CONNECT_BURST_PER_ADDRESS",
        "RELAY_MAX_KEYPACKAGES_PER_DEVICE",
        "RELAY_MAX_KEYPACKAGE_DEVICES_PER_USER",
        "RELAY_BLOB_QUOTA_BYTES",
        "RELAY_MAX_CONVERSATIONS_PER_USER",
        "RELAY_MAX_MEMBERS",
    ],
)
def test_quota_settings_are_validated(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        from_env({name: "-1", "RELAY_DEV_MODE": "1"})
    with pytest.raises(ConfigError, match="RELAY_CONNECT_BURST_PER_ADDRESS"):
        from_env({"RELAY_CONNECT_BURST_PER_ADDRESS": "0", "RELAY_DEV_MODE": "1"})
    if name != "RELAY_CONNECT_BURST_PER_ADDRESS":
        assert from_env({"RELAY_DEV_MODE": "1", name: "0"})  # 0 disables each
    defaults = from_env({"RELAY_DEV_MODE": "1"})
    assert (
        defaults.connect_rate_per_address, defaults.connect_burst_per_address,
        defaults.max_keypackages_per_device, defaults.max_keypackage_devices_per_user,
        defaults.blob_quota_bytes, defaults.max_conversations_per_user, defaults.max_members,
    ) == (20.0, 40, 1000, 100, 1024**3, 10000, 1000)  # fmt: skip
