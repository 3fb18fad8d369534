"""Connection and claim limits that hold across nodes sharing a Redis
(relay/cluster/presence.py, relay/cluster/sharedlimits.py), and fail open when it is gone.

Two relays run in the test's Trio loop on one PostgreSQL database and one
Redis (each test under its own key prefix), with real WebSocket clients.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio
from trio_websocket import ConnectionRejected

from relay.base.ratelimits import RateLimits
from relay.node import Relay
from storage import open_storage

from .conftest import RedisTarget
from .harness import Running
from .harness import test_config as relay_config
from .nodes import RedisProxy, free_port
from .relayclient import Client, connect, make_token
from .test_relay_edges import http_request, upgrade_request

ALICE, BOB, CAROL, DAN = (f"did:example:{n}" for n in ("alice", "bob", "carol", "dan"))
#: Short leases so that a vanished node's slots free up within the test.
LEASE_TTL = 2.0


def _prefix(redis: RedisTarget) -> str:
    return f"{redis.prefix}{secrets.token_hex(4)}:"


@asynccontextmanager
async def _node(
    database_url: str, redis_url: str, prefix: str, name: str, **overrides: Any
) -> AsyncIterator[Running]:
    """tests/harness.py's running_relay, with short presence leases."""
    cfg = relay_config(
        database_url, redis_url=redis_url, redis_prefix=prefix, node_id=name, **overrides
    )
    storage = open_storage(database_url, pool_min=1, pool_max=cfg.pool_max)
    await storage.migrate()
    relay = Relay(cfg, storage)
    relay.presence.lease_ttl = LEASE_TTL
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run, listeners)
        yield Running(relay, listeners[0].socket.getsockname()[1])
        nursery.cancel_scope.cancel()


async def _refused(r: Running, user: str, device: str) -> dict[str, Any]:
    """Upgrade and expect today's typed refusal before the upgrade: 429 JSON."""
    status, _, body = await http_request(
        r.port, upgrade_request("/v1/ws", make_token(user, device))
    )
    assert status == 429, (status, body)
    return dict(json.loads(body))


@asynccontextmanager
async def _admitted(r: Running, user: str, device: str, within: float) -> AsyncIterator[Client]:
    """Connect, retrying while refused with 429 (a slot frees up asynchronously)."""
    deadline = trio.current_time() + within
    while True:
        stack = AsyncExitStack()
        try:
            client = await stack.enter_async_context(connect(r.ws_url, user, device))
        except ConnectionRejected as exc:
            assert exc.status_code == 429
            assert trio.current_time() < deadline, f"still refused after {within}s"
            await trio.sleep(0.05)
            continue
        async with stack:
            yield client
        return


async def _online_becomes(
    r: Running, pairs: list[tuple[str, str]], expected: set[tuple[str, str]], within: float
) -> None:
    with trio.fail_after(within):
        while True:
            if await r.relay.presence.online(pairs) == expected:
                return
            await trio.sleep(0.05)


def _scrape(r: Running) -> str:
    return r.relay.metrics.exposition().decode()


def test_a_device_reconnecting_replaces_itself_in_the_local_count():
    limits = RateLimits(connections_per_user=2)
    assert limits.connect(ALICE, "d1") and limits.connect(ALICE, "d2")
    assert not limits.connect(ALICE, "d3")
    assert limits.connect(ALICE, "d1")  # the relay closes the older d1 connection
    limits.disconnect(ALICE, "d1")
    assert not limits.connect(ALICE, "d3")  # d1 still has a connection
    limits.disconnect(ALICE, "d1")
    assert limits.connect(ALICE, "d3")
    assert limits.rejected == {"TooManyConnections": 2}


async def test_connections_per_user_hold_across_nodes(pg_database_url, redis_url):
    prefix = _prefix(redis_url)
    with trio.fail_after(40):
        async with (
            _node(pg_database_url, redis_url.url, prefix, "a", connections_per_user=2) as a,
            _node(pg_database_url, redis_url.url, prefix, "b", connections_per_user=2) as b,
        ):
            async with connect(a.ws_url, ALICE, "d1") as d1, connect(b.ws_url, ALICE, "d2"):
                for node in (a, b):
                    assert await _refused(node, ALICE, "d3") == {
                        "error": "TooManyConnections",
                        "message": "at most 2 connections per user",
                    }
                    assert node.relay.node_limits.rejected == {"TooManyConnections": 1}
                    assert 'relay_errors_total{type="TooManyConnections"} 1.0' in _scrape(node)
                async with connect(a.ws_url, BOB, "b1"):  # another user is not affected
                    pass
                # The same device again, at the limit: a replacement, admitted; the
                # older connection (on the other node) is closed.
                async with connect(b.ws_url, ALICE, "d1") as again:
                    with trio.fail_after(5):
                        await d1.closed.wait()
                    assert d1.close_code == 4409
                    assert (await again.request("#listConversations")).ok
            # Closed connections free their slots on every node.
            async with (
                _admitted(a, ALICE, "d3", within=5) as d3,
                _admitted(b, ALICE, "d4", within=5) as d4,
            ):
                assert (await d3.request("#listConversations")).ok
                assert (await d4.request("#listConversations")).ok
                await _refused(a, ALICE, "d5")
            assert a.relay.presence.redis.fallbacks == {}
            assert b.relay.presence.redis.fallbacks == {}


async def test_online_sees_devices_on_every_node(pg_database_url, redis_url):
    prefix = _prefix(redis_url)
    with trio.fail_after(30):
        async with (
            _node(pg_database_url, redis_url.url, prefix, "a") as a,
            _node(pg_database_url, redis_url.url, prefix, "b") as b,
            connect(a.ws_url, ALICE, "d1"),
        ):
            asked = [(ALICE, "d1"), (BOB, "b1"), (BOB, "other"), (CAROL, "c1"), (ALICE, "d1")]
            async with connect(b.ws_url, BOB, "b1"):
                for node in (a, b):
                    assert await node.relay.presence.online(asked) == {(ALICE, "d1"), (BOB, "b1")}
            await _online_becomes(a, asked, {(ALICE, "d1")}, within=5)


async def test_a_vanished_node_frees_its_slots_after_the_lease_ttl(pg_database_url, redis_url):
    """Node b loses Redis and dies without removing its leases: they still
    count on node a until they expire, then a admits again."""
    prefix = _prefix(redis_url)
    with trio.fail_after(40):
        async with (
            RedisProxy(redis_url.url).running() as proxy,
            _node(pg_database_url, redis_url.url, prefix, "a", connections_per_user=2) as a,
        ):
            async with (
                _node(pg_database_url, proxy.url, prefix, "b", connections_per_user=2) as b,
                connect(b.ws_url, ALICE, "d1"),
                connect(b.ws_url, ALICE, "d2"),
            ):
                proxy.cut()
                cut_at = trio.current_time()
                await _refused(a, ALICE, "d3")
            # b is gone; its leases were neither refreshed nor removed.
            async with _admitted(a, ALICE, "d3", within=LEASE_TTL + 5) as d3:
                assert a.relay.presence.redis.fallbacks == {}
                # Refreshed at most LEASE_TTL / 3 before the cut: alive well after it.
                assert trio.current_time() - cut_at > LEASE_TTL / 2
                assert (await d3.request("#listConversations")).ok


async def test_claims_per_target_and_per_claimer_hold_across_nodes(pg_database_url, redis_url):
    prefix = _prefix(redis_url)
    rates = {"claim_rate_per_min": 3, "claim_target_rate_per_min": 2}
    with trio.fail_after(40):
        async with (
            _node(pg_database_url, redis_url.url, prefix, "a", **rates) as a,
            _node(pg_database_url, redis_url.url, prefix, "b", **rates) as b,
            connect(a.ws_url, ALICE, "a1") as alice_a,
            connect(b.ws_url, ALICE, "a2") as alice_b,
            connect(b.ws_url, CAROL, "c1") as carol_b,
            connect(a.ws_url, DAN, "d1") as dan_a,
        ):
            # Per target: BOB is claimed once on each node, then refused on either.
            await alice_a.ok("#claimKeyPackages", users=[BOB], cipher_suite=1)
            await carol_b.ok("#claimKeyPackages", users=[BOB], cipher_suite=1)
            for client in (dan_a, carol_b):
                reply = await client.request("#claimKeyPackages", users=[BOB], cipher_suite=1)
                assert not reply.ok and reply.body["error"] == "RateLimited", reply.body
                assert reply.body["user"] == BOB and reply.body["retryable"]
                assert reply.body["retry_after_ms"] > 0
            # Per claimer: alice's claims on both nodes share one budget (3 per minute).
            await alice_b.ok("#claimKeyPackages", users=["did:example:x1"], cipher_suite=1)
            await alice_a.ok("#claimKeyPackages", users=["did:example:x2"], cipher_suite=1)
            reply = await alice_b.request(
                "#claimKeyPackages", users=["did:example:x3"], cipher_suite=1
            )
            assert not reply.ok and reply.body["error"] == "RateLimited"
            assert "user" not in reply.body and reply.body["retry_after_ms"] > 0
            assert 'relay_errors_total{type="RateLimited"} 1.0' in _scrape(a)
            assert 'relay_errors_total{type="RateLimited"} 2.0' in _scrape(b)
            assert a.relay.presence.redis.fallbacks == {}


async def test_without_redis_a_node_serves_within_its_own_limits(tmp_path):
    """REDIS_URL points at a closed port: connections, requests and claims are
    served and limited by this node's own counts; the fallbacks are counted."""
    closed = f"redis://127.0.0.1:{free_port()}/0"
    with trio.fail_after(30):
        async with (
            _node(
                f"sqlite:///{tmp_path}/r.db",
                closed,
                "mls-relay-test:",
                "alone",
                connections_per_user=2,
                claim_target_rate_per_min=1,
            ) as r,
            connect(r.ws_url, ALICE, "d1") as d1,
        ):
            async with connect(r.ws_url, ALICE, "d2"):
                assert (await _refused(r, ALICE, "d3"))["error"] == "TooManyConnections"
                async with connect(r.ws_url, ALICE, "d2") as again:  # a replacement
                    assert (await again.request("#listConversations")).ok
            async with _admitted(r, ALICE, "d3", within=5) as d3:  # d2's slot is free
                await d3.ok("#createConversation", conversation=b"c", members=[BOB])
                assert await d3.send(b"c", b"served") == 1
            await d1.ok("#claimKeyPackages", users=[BOB], cipher_suite=1)
            reply = await d1.request("#claimKeyPackages", users=[BOB], cipher_suite=1)
            assert reply.body["error"] == "RateLimited" and reply.body["user"] == BOB
            assert await r.relay.presence.online([(ALICE, "d1"), (BOB, "b")]) == {(ALICE, "d1")}
            redis = r.relay.presence.redis
            assert not redis.up and redis.outages == 1
            assert redis.fallbacks["connections"] >= 1 and redis.fallbacks["claims"] >= 1
            scraped = _scrape(r)
            assert 'relay_shared_limit_fallbacks_total{check="connections"}' in scraped
            assert "relay_shared_limit_outages_total 1.0" in scraped


async def test_leases_taken_during_an_outage_are_shared_once_redis_is_back(
    pg_database_url, redis_url
):
    prefix = _prefix(redis_url)
    with trio.fail_after(40):
        async with (
            RedisProxy(redis_url.url).running() as proxy,
            _node(pg_database_url, redis_url.url, prefix, "a", connections_per_user=2) as a,
            _node(pg_database_url, proxy.url, prefix, "b", connections_per_user=2) as b,
            connect(b.ws_url, ALICE, "d1"),
        ):
            proxy.cut()
            async with connect(b.ws_url, ALICE, "d2") as d2:  # b alone decides: admitted
                assert (await d2.request("#listConversations")).ok
                await _refused(b, ALICE, "d3")  # b's own count still holds
                assert b.relay.presence.redis.fallbacks["connections"] >= 1
                proxy.restore()
                # b's next refresh puts d2's lease back: node a sees both.
                await _online_becomes(a, [(ALICE, "d2")], {(ALICE, "d2")}, within=LEASE_TTL + 5)
                await _refused(a, ALICE, "d3")
                assert b.relay.presence.redis.up
