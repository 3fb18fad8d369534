"""Several relay nodes sharing PostgreSQL and Redis (relay.redisbus).

In-process tests run two nodes in the test's Trio loop, each with its own
Redis connections; the kill test runs three ``mls-relay serve`` processes and
SIGKILLs one in the middle of traffic.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from relay.cluster.redisbus import RedisFanOut

from .backends import clone_database
from .conftest import RedisTarget
from .harness import Running, running_relay
from .nodes import RedisProxy
from .relayclient import Client, ConnectionLost, connect
from .test_relay_edges import http_request

ALICE, BOB, CAROL = "did:example:alice", "did:example:bob", "did:example:carol"


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    with clone_database(pg_template) as url:
        yield url


def _prefix(redis: RedisTarget) -> str:
    # Per test: the session prefix is shared by every test of this run.
    return f"{redis.prefix}{secrets.token_hex(4)}:"


@asynccontextmanager
async def _node(pg_url: str, redis_url: str, prefix: str, name: str) -> AsyncIterator[Running]:
    async with running_relay(pg_url, redis_url=redis_url, redis_prefix=prefix, node_id=name) as r:
        assert isinstance(r.relay.fanout, RedisFanOut)
        yield r


def _bus(r: Running) -> RedisFanOut:
    assert isinstance(r.relay.fanout, RedisFanOut)
    return r.relay.fanout


async def _wait_for(predicate, what: str, limit: float = 10) -> None:  # type: ignore[no-untyped-def]
    with trio.move_on_after(limit):
        while not predicate():  # noqa: ASYNC110 (polling the relay's bus state)
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting until {what}")


async def test_messages_membership_and_ephemeral_cross_nodes(pg_url, redis_url):
    prefix = _prefix(redis_url)
    conv = b"cross"
    with trio.fail_after(40):
        async with (
            _node(pg_url, redis_url.url, prefix, "a") as a,
            _node(pg_url, redis_url.url, prefix, "b") as b,
            connect(a.ws_url, ALICE, "a1", subscribe=True) as alice,
            connect(b.ws_url, BOB, "b1", subscribe=True) as bob,
        ):
            await alice.caught_up()
            await bob.caught_up()
            # Created on node a: bob, live on node b, learns it through Redis.
            await alice.ok("#createConversation", conversation=conv, members=[BOB])
            _, change = await bob.next_event("#membership")
            assert change["conversation"] == conv and BOB in change["added"]
            sent_a = [await alice.send(conv, b"a%d" % i) for i in range(30)]
            got = await bob.messages(30, conv)
            assert [m["seq"] for m in got] == sent_a
            assert [m["ciphertext"] for m in got] == [b"a%d" % i for i in range(30)]
            seq = await bob.send(conv, b"from b")
            (back,) = await alice.messages(1, conv)
            assert (back["seq"], back["ciphertext"], back["sender"]) == (seq, b"from b", BOB)
            await alice.ok("#send", conversation=conv, ciphertext=b"typing", ephemeral=True)
            _, eph = await bob.next_event("#ephemeral")
            assert eph["ciphertext"] == b"typing"
            # A member added on node b starts receiving on node a.
            async with connect(a.ws_url, CAROL, "c1", subscribe=True) as carol:
                await carol.caught_up()
                await bob.ok("#addMembers", conversation=conv, members=[CAROL])
                await carol.next_event("#membership")
                seq = await bob.send(conv, b"hello carol")
                (m,) = await carol.messages(1, conv)
                assert m["seq"] == seq
            assert _bus(a).healthy and _bus(b).healthy
            # The status page of either node lists both nodes.
            await _wait_for(lambda: _status_nodes(a) == ["a", "b"], "a's status shows b", 15)
            assert _status_nodes(b) == ["b", "a"]
            # Batches that came from node a through Redis are in b's fan-out lag.
            scraped = b.relay.metrics.exposition().decode()
            lag = re.search(r"relay_fanout_lag_seconds_count (\S+)", scraped)
            assert lag is not None and float(lag.group(1)) > b.relay.committer.batches

            assert _bus(b).stats.received_events > 0


def _status_nodes(r: Running) -> list[str]:
    from relay.ops.status import status

    return [n["node"] for n in status(r.relay.metrics, r.relay.state.shutting_down)["nodes"]]


async def test_concurrent_senders_on_two_nodes_are_delivered_in_order_once(pg_url, redis_url):
    """Publishers on two nodes race through Redis: receivers see out-of-order
    seqs, repair the gap from storage and drop the late copy."""
    prefix = _prefix(redis_url)
    conv = b"race"
    per_sender = 60
    senders = [f"did:example:s{i}" for i in range(4)]
    with trio.fail_after(50):
        async with (
            _node(pg_url, redis_url.url, prefix, "a") as a,
            _node(pg_url, redis_url.url, prefix, "b") as b,
        ):
            async with connect(a.ws_url, ALICE, "setup") as c:
                await c.ok("#createConversation", conversation=conv, members=[BOB, *senders])
            async with (
                connect(a.ws_url, ALICE, "r", subscribe=True) as ra,
                connect(b.ws_url, BOB, "r", subscribe=True) as rb,
            ):

                async def sender(i: int, user: str) -> None:
                    node = a if i % 2 else b
                    async with connect(node.ws_url, user, "d") as s:
                        for j in range(per_sender):
                            await s.send(conv, f"{user}/{j}".encode())

                async with trio.open_nursery() as nursery:
                    for i, user in enumerate(senders):
                        nursery.start_soon(sender, i, user)
                total = per_sender * len(senders)
                for reader in (ra, rb):
                    got = [m["seq"] for m in await reader.messages(total, conv)]
                    assert got == list(range(1, total + 1))
                # Markers, b's first and a's last: a late copy of anything either
                # node published earlier travels ahead of its marker.
                for node, user in ((b, senders[0]), (a, senders[1])):
                    async with connect(node.ws_url, user, "marker") as s:
                        await s.send(conv, b"marker")
                for reader in (ra, rb):
                    got = [m["seq"] for m in await reader.messages(2, conv)]
                    assert got == [total + 1, total + 2], (reader.user, got)
                # Each node has received every event the other published...
                await _wait_for(
                    lambda: (
                        (_bus(b).stats.received_events, _bus(a).stats.received_events)
                        == (_bus(a).stats.published_events, _bus(b).stats.published_events)
                    ),
                    "each node received all the other published",
                )
                # ...and no reader has (or gets) anything more: no duplicates after the repair.
                await no_more_messages(ra, rb)


async def no_more_messages(*clients: Client, window: float = 0.5) -> None:
    """Every client (each one, concurrently) has no #message beyond those the test
    consumed: a request's round trip first, so that every frame the relay wrote
    before its reply has been read; then a quiet window for stragglers."""
    extra: dict[str, list[int]] = {}

    async def check(c: Client) -> None:
        await c.ok("#listConversations")
        with trio.move_on_after(window):
            while True:
                _, body = await c.next_event("#message")
                extra.setdefault(f"{c.user}/{c.device}", []).append(body["seq"])

    async with trio.open_nursery() as nursery:
        for c in clients:
            nursery.start_soon(check, c)
    assert extra == {}, f"unexpected extra messages: {extra}"


async def test_same_device_on_another_node_is_displaced(pg_url, redis_url):
    prefix = _prefix(redis_url)
    with trio.fail_after(30):
        async with (
            _node(pg_url, redis_url.url, prefix, "a") as a,
            _node(pg_url, redis_url.url, prefix, "b") as b,
            connect(a.ws_url, BOB, "phone") as old,
        ):
            # Node b hears of the first registration (a's displace event) first.
            await _wait_for(lambda: _bus(b).stats.received_events >= 1, "b hears a's registration")
            async with connect(b.ws_url, BOB, "phone") as new:
                with trio.fail_after(10):
                    await old.closed.wait()
                assert old.close_code == 4409
                await new.ok("#listConversations")  # the newer one stays


async def _health(port: int) -> dict[str, Any]:
    status, _, body = await http_request(
        port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == 200, status  # degraded fan-out keeps the node in service
    return dict(json.loads(body))


@pytest.mark.timeout(90)  # its own fail_after is 70 s, beyond the 60 s default
async def test_redis_outage_is_repaired_from_storage(pg_url, redis_url):
    """Node b loses Redis (both directions).  A message sent on a during the
    outage reaches b's client through the resubscribe recheck, and one sent
    on b reaches a's client through b's repair announcement; in both cases no
    later message in the conversation reveals the gap."""
    prefix = _prefix(redis_url)
    conv = b"outage"
    with trio.fail_after(70):
        async with (
            RedisProxy(redis_url.url).running() as proxy,
            _node(pg_url, redis_url.url, prefix, "a") as a,
            _node(pg_url, proxy.url, prefix, "b") as b,
        ):
            async with connect(a.ws_url, ALICE, "setup") as c:
                await c.ok("#createConversation", conversation=conv, members=[BOB])
            async with (
                connect(a.ws_url, ALICE, "a1", subscribe=True) as alice,
                connect(b.ws_url, BOB, "b1", subscribe=True) as bob,
            ):
                await alice.caught_up()
                await bob.caught_up()
                first = await alice.send(conv, b"before")
                assert [m["seq"] for m in await bob.messages(1, conv)] == [first]
                proxy.cut()
                await _wait_for(lambda: not _bus(b).healthy, "b notices the outage")
                from_a = await alice.send(conv, b"during, from a")
                from_b = await bob.send(conv, b"during, from b")
                await _wait_for(lambda: _bus(b).stats.dropped >= 1, "b's publish fails")
                assert not _bus(b).healthy
                health = await _health(b.port)
                assert health["status"] == "degraded" and health["checks"]["fanout"] == "degraded"
                assert (await _health(a.port))["checks"]["fanout"] == "healthy"
                proxy.restore()
                (m,) = await bob.messages(1, conv)  # from_b is bob's own: not echoed
                assert m["seq"] == from_a
                (m,) = await alice.messages(1, conv)
                assert m["seq"] == from_b
                await _wait_for(lambda: _bus(b).healthy, "b healthy again")
                assert _bus(b).stats.resubscribes >= 1 and _bus(b).stats.repairs_sent >= 1
                assert (await _health(b.port))["status"] == "healthy"
                # Markers from both nodes after the repair: each is the next message
                # its receiver gets (a late copy of from_a / from_b would come first).
                marker_b = await bob.send(conv, b"marker from b")
                marker_a = await alice.send(conv, b"marker from a")
                assert [m["seq"] for m in await alice.messages(1, conv)] == [marker_b]
                assert [m["seq"] for m in await bob.messages(1, conv)] == [marker_a]
                await no_more_messages(alice, bob)


@pytest.mark.timeout(60)
async def test_silent_peer_makes_others_recheck_storage(pg_url, redis_url):
    """Node b commits a message it can never publish (cut from Redis for good,
    like a node killed between commit and PUBLISH).  No later message follows;
    a's client still gets it once b's heartbeats stop."""
    prefix = _prefix(redis_url)
    conv = b"silent"
    with trio.fail_after(45):
        async with (
            RedisProxy(redis_url.url).running() as proxy,
            _node(pg_url, redis_url.url, prefix, "a") as a,
            _node(pg_url, proxy.url, prefix, "b") as b,
        ):
            async with connect(a.ws_url, ALICE, "setup") as c:
                await c.ok("#createConversation", conversation=conv, members=[BOB])
            async with (
                connect(a.ws_url, ALICE, "a1", subscribe=True) as alice,
                connect(b.ws_url, BOB, "b1", subscribe=True) as bob,
            ):
                await alice.caught_up()
                await bob.caught_up()
                first = await bob.send(conv, b"heard")
                assert [m["seq"] for m in await alice.messages(1, conv)] == [first]
                proxy.cut()
                await _wait_for(lambda: not _bus(b).healthy, "b notices the outage")
                lost = await bob.send(conv, b"never published")
                (m,) = await alice.messages(1, conv)
                assert (m["seq"], m["ciphertext"]) == (lost, b"never published")
                assert _bus(a).stats.peers_lost == 1 and _bus(a).healthy


async def test_a_cleanly_stopped_peer_is_not_taken_for_crashed(pg_url, redis_url):
    prefix = _prefix(redis_url)
    with trio.fail_after(30):
        async with _node(pg_url, redis_url.url, prefix, "a") as a:
            async with _node(pg_url, redis_url.url, prefix, "b"):
                await _wait_for(lambda: len(_bus(a)._peers) == 1, "a hears b's heartbeat")
            # Well within the 4 s peer timeout: the goodbye, not the silence, removed b.
            await _wait_for(lambda: not _bus(a)._peers, "b's goodbye reaches a", 2)
            assert _bus(a).stats.peers_lost == 0
            # And nothing re-adds b and then misses it: past the peer timeout (4 s)
            # plus a watch period (1 s) and a margin, still no peer lost.
            await trio.sleep(4 + 1 + 1)
            assert _bus(a).stats.peers_lost == 0 and not _bus(a)._peers


# --- three processes, one SIGKILLed in the middle of traffic -----------------------


#: What a client sees of a node that was killed or is not there; anything else
#: (an error reply, a failed assertion) fails the test instead of being retried.
_CONNECTION_FAILURES = (
    OSError,
    HandshakeError,
    ConnectionClosed,
    ConnectionLost,
    trio.EndOfChannel,  # the client's event channel ends with its connection
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


class KillClient:
    """A client that keeps its own position, reconnects to the next live node
    and retries unacknowledged sends with the same client_message_id."""

    def __init__(self, index: int, ports: list[int], convs: list[bytes], sends: int) -> None:
        self.user = f"did:example:k{index}"
        self.order = [ports[(index + i) % len(ports)] for i in range(len(ports))]
        self.convs = convs
        self.to_send = [(convs[j % len(convs)], f"{self.user}/{j}") for j in range(sends)]
        self.acked: dict[bytes, set[int]] = {c: set() for c in convs}
        self.messages: dict[bytes, list[int]] = {c: [] for c in convs}
        self.connections = 0
        self.nodes_used: list[int] = []
        self.out_of_order = 0
        self.finished = trio.Event()

    def have(self, conv: bytes) -> set[int]:
        return self.acked[conv] | set(self.messages[conv])

    def contiguous(self, conv: bytes) -> int:
        have, n = self.have(conv), 0
        while n + 1 in have:
            n += 1
        return n

    async def run(self, dead: set[int], final: dict[bytes, int], all_sent: trio.Event) -> None:
        attempt = 0
        while not self.finished.is_set():
            port = self.order[attempt % len(self.order)]
            attempt += 1
            if port in dead:
                continue
            lost = False
            try:
                await self._connection(port, final, all_sent)
            except* _CONNECTION_FAILURES:  # killed node, refused connection: the next one
                lost = True
            if lost:
                await trio.sleep(0.1)

    async def _connection(self, port: int, final: dict[bytes, int], all_sent: trio.Event) -> None:
        url = f"ws://127.0.0.1:{port}/v1/ws"
        async with connect(url, self.user, "d") as c, trio.open_nursery() as nursery:
            self.connections += 1
            self.nodes_used.append(port)
            cursors = [{"conversation": v, "seq": self.contiguous(v)} for v in self.convs]
            await c.ok("#subscribe", cursors=cursors)

            async def closed() -> None:
                await c.closed.wait()
                nursery.cancel_scope.cancel()

            async def reader() -> None:
                last: dict[bytes, int] = {}
                while True:
                    _, body = await c.next_event("#message")
                    conv, seq = body["conversation"], body["seq"]
                    if seq <= last.get(conv, 0):
                        self.out_of_order += 1
                    last[conv] = seq
                    self.messages[conv].append(seq)
                    if self._complete(final, all_sent):
                        self.finished.set()
                        nursery.cancel_scope.cancel()

            async def sender() -> None:
                while self.to_send:
                    conv, cmid = self.to_send[0]
                    seq = await c.send(conv, cmid.encode(), cmid)
                    self.acked[conv].add(seq)
                    self.to_send.pop(0)
                    if len(self.to_send) % 10 == 0:
                        await c.ok("#ack", conversation=conv, seq=self.contiguous(conv))
                    await trio.sleep(0.01)

            async def completion() -> None:
                await all_sent.wait()
                while not self._complete(final, all_sent):  # noqa: ASYNC110 (polling state)
                    await trio.sleep(0.05)
                self.finished.set()
                nursery.cancel_scope.cancel()

            for task in (closed, reader, sender, completion):
                nursery.start_soon(task)

    def _complete(self, final: dict[bytes, int], all_sent: trio.Event) -> bool:
        return all_sent.is_set() and all(self.contiguous(v) >= final[v] for v in self.convs)


@pytest.mark.timeout(150)
async def test_kill_one_of_three_nodes_loses_and_duplicates_nothing(pg_url, redis_url, tmp_path):
    from .nodes import free_port, migrate, node_env, start, stop, wait_ready

    prefix = _prefix(redis_url)
    convs = [b"k0", b"k1", b"k2"]
    n_clients, sends = 9, 40
    dead: set[int] = set()
    final: dict[bytes, int] = {}
    ports = [free_port() for _ in range(3)]
    envs = [
        node_env(p, pg_url, redis_url.url, prefix, RELAY_NODE_ID=f"n{i}")
        for i, p in enumerate(ports)
    ]
    procs: list[trio.Process] = []
    clients: list[KillClient] = []
    try:
        with trio.fail_after(130):
            await migrate(envs[0])
            for i, env in enumerate(envs):
                procs.append(await start(env, log=tmp_path / f"node{i}.log"))
            for port, proc in zip(ports, procs, strict=True):
                await wait_ready(port, proc, deadline=40)
            users = [f"did:example:k{i}" for i in range(n_clients)]
            async with connect(f"ws://127.0.0.1:{ports[0]}/v1/ws", ALICE, "setup") as c:
                for conv in convs:
                    await c.ok("#createConversation", conversation=conv, members=users)
            clients += [KillClient(i, ports, convs, sends) for i in range(n_clients)]
            all_sent = trio.Event()

            def acked_total() -> int:
                return sum(len(s) for k in clients for s in k.acked.values())

            async def killer() -> None:
                # In the middle of traffic: a third of all sends acknowledged.
                while acked_total() < n_clients * sends // 3:  # noqa: ASYNC110 (polling)
                    await trio.sleep(0.01)
                dead.add(ports[1])
                procs[1].kill()  # SIGKILL: no drain, no goodbye
                await procs[1].wait()

            async def watch_sends() -> None:
                while any(k.to_send for k in clients):  # noqa: ASYNC110 (polling)
                    await trio.sleep(0.05)
                for conv in convs:
                    final[conv] = max(s for k in clients for s in k.acked[conv])
                all_sent.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(killer)
                nursery.start_soon(watch_sends)
                for k in clients:
                    nursery.start_soon(k.run, dead, final, all_sent)
    except trio.TooSlowError:
        state = [(k.user, len(k.to_send), k.nodes_used, _progress(k)) for k in clients]
        raise AssertionError(f"timed out; final={final} clients={state}") from None
    finally:
        with trio.CancelScope(shield=True):
            for proc in procs:
                await stop(proc)
    assert dead == {ports[1]}
    for conv in convs:
        acked = set().union(*(k.acked[conv] for k in clients))
        assert acked == set(range(1, final[conv] + 1)), "acknowledged seqs are gapless"
        assert len(acked) == sum(len(k.acked[conv]) for k in clients)
    assert sum(final.values()) == n_clients * sends
    for k in clients:
        assert k.out_of_order == 0, k.user
        for conv in convs:
            got = k.messages[conv]
            assert len(got) == len(set(got)), f"{k.user} got duplicates in {conv!r}"
            assert k.have(conv) == set(range(1, final[conv] + 1)), (k.user, conv)
    moved = [k for k in clients if k.order[0] == ports[1]]
    assert moved and all(k.connections >= 2 and k.nodes_used[-1] != ports[1] for k in moved)


def _progress(k: KillClient) -> dict[str, object]:
    return {
        v.decode(): (k.contiguous(v), sorted(set(range(1, max(k.have(v), default=0))) - k.have(v)))
        for v in k.convs
    }
