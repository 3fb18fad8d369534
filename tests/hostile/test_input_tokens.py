"""Tokens are checked for text the relay can store before anything is
registered (issue 12 point 3): a refused handshake always gets an HTTP JSON
answer and leaves no slot, lease or queue entry behind.

Measured before: a signed token whose ``device`` held a NUL was accepted
(and then poisoned every delivery-state flush of the node); a lone surrogate
in ``sub``, ``device`` or ``jti`` broke the handshake with no HTTP answer and
leaked a connection slot (a fresh device of that user was still refused 30
minutes later); a surrogate ``sub`` stuck in the Redis lease-release queue,
paused the shared Redis client on every later close, and the cross-node
connection limit then admitted 24 of 24 devices with a limit of 20.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio

from relay.cluster.presence import Lease, Presence
from relay.cluster.sharedlimits import SharedRedis
from relay.node import Relay
from storage import open_storage

from ..conftest import RedisTarget, _Resp
from ..harness import Running
from ..harness import test_config as relay_config
from ..relayclient import connect
from .inputs import raw_http, sse, token, upgrade

ALICE = "did:example:alice"
LIMIT = 5

#: (claim, value): every one of them must be refused with 401 naming the claim.
BAD_CLAIMS: list[tuple[str, Any]] = [
    ("sub", "did:example:\x00evil"),
    ("sub", "did:example:\ud800"),
    ("sub", "did:example:" + "a" * 3000),
    ("sub", "did:example:a b"),
    ("device", "\x00"),
    ("device", "d\ud800"),
    ("device", "line\nbreak"),
    ("device", "x" * 129),
    ("jti", "j\x00"),
    ("jti", "\udfff"),
    ("jti", "j" * 257),
]


def _bad_token(claim: str, value: Any) -> str:
    claims = {"jti": secrets.token_hex(8)}
    claims[claim] = value
    user = claims.pop("sub", ALICE)
    device = claims.pop("device", "d1")
    return token(user, device, **claims)


@asynccontextmanager
async def _node(database_url: str, redis: str, prefix: str, name: str) -> AsyncIterator[Running]:
    cfg = relay_config(
        database_url,
        redis_url=redis,
        redis_prefix=prefix,
        node_id=name,
        connections_per_user=LIMIT,
    )
    storage = open_storage(database_url, pool_min=1, pool_max=cfg.pool_max)
    await storage.migrate()
    relay = Relay(cfg, storage)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run, listeners)
        yield Running(relay, listeners[0].socket.getsockname()[1])
        nursery.cancel_scope.cancel()


def _redis_keys(redis: RedisTarget, pattern: str) -> list[bytes]:
    conn = _Resp(redis.url)
    try:
        found: list[bytes] = []
        cursor = b"0"
        while True:
            cursor, keys = conn.call("SCAN", cursor, "MATCH", pattern, "COUNT", "1000")
            found += keys
            if cursor == b"0":
                return found
    finally:
        conn.close()


def _nothing_held(r: Running) -> None:
    relay = r.relay
    assert relay.node_limits._users == {}, "a connection slot was left behind"
    assert relay.presence._leases == {}, "a lease was left behind"
    assert relay.presence._released == [], "a lease release is queued"
    assert relay.registry.sessions == {}
    assert relay.presence.redis.up and relay.presence.redis.outages == 0
    assert relay.presence.redis.fallbacks == {}  # every admission asked Redis
    assert relay.metrics.incidents.counts == {}  # refusals, not incidents


@pytest.mark.timeout(90)
async def test_bad_token_claims_get_401_json_and_leave_nothing_behind(database_url, redis_url):
    prefix = f"{redis_url.prefix}{secrets.token_hex(4)}:"
    with trio.fail_after(60):
        async with (
            _node(database_url, redis_url.url, prefix, "a") as a,
            _node(database_url, redis_url.url, prefix, "b") as b,
        ):
            for i, (claim, value) in enumerate(BAD_CLAIMS):
                node = (a, b)[i % 2]
                for request in (upgrade, sse):  # the WebSocket and the SSE handshake
                    status, body = await raw_http(node.port, request(_bad_token(claim, value)))
                    assert status == 401, (claim, value, request.__name__, status, body[:200])
                    answer = json.loads(body)
                    assert answer["error"] == "InvalidToken", answer
                    assert answer["claim"] == claim, answer
            await trio.sleep(0.2)  # a release would be flushed to Redis by now
            for node in (a, b):
                _nothing_held(node)
            assert _redis_keys(redis_url, f"{prefix}conns:*") == []
            # The cross-node limit still admits exactly its limit, on both nodes.
            async with AsyncExitStack() as stack:
                for n in range(LIMIT):
                    node = (a, b)[n % 2]
                    client = await stack.enter_async_context(connect(node.ws_url, ALICE, f"d{n}"))
                    assert (await client.request("#listConversations")).ok
                for node in (a, b):
                    status, body = await raw_http(node.port, upgrade(token(ALICE, "extra")))
                    assert status == 429, (status, body)
                    assert json.loads(body)["error"] == "TooManyConnections"
                assert len(_redis_keys(redis_url, f"{prefix}conns:*")) == 1  # ALICE's set
            for node in (a, b):
                assert node.relay.presence.redis.fallbacks == {}


@pytest.mark.timeout(30)
async def test_presence_refuses_text_redis_cannot_hold_before_counting(redis_url):
    """The backstop behind the token checks: admission refuses a name Redis
    cannot encode before it takes a slot, and a lease that could never be
    released (built around admission) is dropped and counted, not queued."""
    from relay.base.ratelimits import RateLimits

    prefix = f"{redis_url.prefix}{secrets.token_hex(4)}:"
    limits = RateLimits(connections_per_user=2)
    presence = Presence(limits, SharedRedis(redis_url.url, prefix), "node")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(presence.run)
            for user, device in (("did:x:\ud800", "d"), (ALICE, "\udc00"), (ALICE, "")):
                with pytest.raises(Exception) as refused:
                    await presence.admit(user, device)
                assert type(refused.value).__name__ == "InvalidRequest"
            assert limits._users == {}
            presence.release(Lease(ALICE, "d", "never admitted"))  # not held: ignored
            presence._leases["m"] = poisoned = Lease("did:x:\ud800", "d", "m")
            limits.connect(poisoned.user, "d")
            presence.release(poisoned)
            assert presence._released == []
            assert presence.incidents.dropped["lease_release"] == 1
            lease = await presence.admit(ALICE, "d1")  # Redis is still in use
            assert len(_redis_keys(redis_url, f"{prefix}conns:*")) == 1
            presence.release(lease)
            with trio.fail_after(5):  # the maintenance task removes it from Redis
                while True:
                    if not _redis_keys(redis_url, f"{prefix}conns:*"):
                        break
                    await trio.sleep(0.05)
            assert presence.redis.up and presence.redis.fallbacks == {}
            nursery.cancel_scope.cancel()


@pytest.mark.timeout(30)
async def test_lease_releases_are_not_retried_past_the_lease_expiry(redis_url):
    """Releases that Redis cannot take (here: unreachable) stay queued only
    until their lease would have expired in Redis anyway, then go: the queue
    is never retried forever.  Before, they stayed until the node stopped."""
    from relay.base.ratelimits import RateLimits

    from ..nodes import RedisProxy

    prefix = f"{redis_url.prefix}{secrets.token_hex(4)}:"
    ttl = 0.9
    with trio.fail_after(20):
        async with RedisProxy(redis_url.url).running() as proxy, trio.open_nursery() as nursery:
            presence = Presence(RateLimits(), SharedRedis(proxy.url, prefix), "node", lease_ttl=ttl)
            await nursery.start(presence.run)
            leases = [await presence.admit(ALICE, f"d{i}") for i in range(3)]
            assert presence.redis.fallbacks == {}
            proxy.cut()
            for lease in leases:
                presence.release(lease)
            assert len(presence._released) == 3
            released_at = trio.current_time()
            while True:  # the maintenance task retries, then lets them go
                if not presence._released:
                    break
                await trio.sleep(0.05)
            assert trio.current_time() - released_at >= ttl  # not before their expiry
            assert presence.redis.fallbacks["release"] >= 1
            nursery.cancel_scope.cancel()
