"""relay/offline/push.py against a real HTTP webhook (tests/pushreceiver.py).

resolve() and online() are plain async functions over in-test data: they
stand for the storage query and the cluster-wide presence lookup.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.lowlevel

from protocol.errors import Unavailable
from relay.offline.push import PushConfig, Pusher, PushTarget, parse_providers
from tests.pushreceiver import PushReceiver, Reply, push_receiver

ROOM = b"\x01room-id\xff"
ALICE = "did:example:alice"
BOB = "did:example:bob"
CAROL = "did:example:carol"
#: What a message's ciphertext would be; the relay never has it on this path,
#: and nothing resembling it may reach the provider.
CIPHERTEXT = b"\x8f\x00MLS-PrivateMessage-opaque-bytes"
ALLOWED = {"provider", "zone", "token", "device", "conversation", "seq", "count"}


def target(user: str, device: str, joined_seq: int = 0, token: str = "") -> PushTarget:
    return PushTarget(
        user, device, "fcm", "eu", token or f"tok-{user.rsplit(':', 1)[-1]}-{device}", joined_seq
    )


class World:
    """Conversation members and who is connected: the inputs resolve()/online() read."""

    def __init__(self, members: dict[bytes, list[PushTarget]]) -> None:
        self.members = members
        self.connected: set[tuple[str, str]] = set()
        self.resolve_calls: list[list[bytes]] = []
        self.fail_resolve = 0  # the next N resolve() calls raise Unavailable
        self.gone: list[PushTarget] = []

    async def resolve(self, conversations: list[bytes]) -> dict[bytes, list[PushTarget]]:
        await trio.lowlevel.checkpoint()
        self.resolve_calls.append(conversations)
        if self.fail_resolve:
            self.fail_resolve -= 1
            raise Unavailable("database is unreachable")
        return {c: self.members[c] for c in conversations if c in self.members}

    async def online(self, pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
        await trio.lowlevel.checkpoint()
        return {p for p in pairs if p in self.connected}

    async def on_gone(self, t: PushTarget) -> None:
        await trio.lowlevel.checkpoint()
        self.gone.append(t)


def config(receiver: PushReceiver, **overrides: Any) -> PushConfig:
    values: dict[str, Any] = {
        "providers": {"fcm": receiver.url()},
        "coalesce_s": 0.05,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2,
        "attempt_timeout_s": 1.0,
    }
    values.update(overrides)
    return PushConfig(**values)


@asynccontextmanager
async def running(pusher: Pusher) -> AsyncIterator[Pusher]:
    async with trio.open_nursery() as nursery:
        await nursery.start(pusher.run)
        yield pusher
        nursery.cancel_scope.cancel()


async def until(predicate: Any, within: float = 5.0) -> None:
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 (polling the pusher's counters)
            await trio.sleep(0.01)


@pytest.fixture
async def receiver() -> AsyncIterator[PushReceiver]:
    async with push_receiver() as r:
        yield r


# --- 1. what is sent ------------------------------------------------------------------


async def test_offline_device_gets_one_minimal_signed_push(receiver: PushReceiver) -> None:
    world = World({ROOM: [target(ALICE, "laptop"), target(BOB, "phone")]})
    pusher = Pusher(config(receiver, secret="hook-secret"), world.resolve, world.online)
    with trio.fail_after(10):
        async with running(pusher):
            pusher.offer(ROOM, 7, ALICE, "laptop")
            [req] = await receiver.wait_requests(1)
            await trio.sleep(0.3)  # several coalescing windows: nothing else comes
    assert len(receiver.requests) == 1
    assert req.method == "POST" and req.path == "/push"
    assert req.headers["content-type"] == "application/json"
    body = req.json()
    assert set(body) == ALLOWED
    assert body == {
        "provider": "fcm",
        "zone": "eu",
        "token": "tok-bob-phone",
        "device": "phone",
        "conversation": ROOM.hex(),
        "seq": 7,
        "count": 1,
    }
    for secret in (CIPHERTEXT, CIPHERTEXT.hex().encode(), ALICE.encode(), BOB.encode(), ROOM):
        assert secret not in req.body
    mac = hmac.new(b"hook-secret", req.body, hashlib.sha256).hexdigest()
    assert req.headers["x-relay-signature"] == f"sha256={mac}"
    assert (pusher.stats.offered, pusher.stats.sent, pusher.stats.failed) == (1, 1, 0)
    assert pusher.pending() == 0


async def test_no_signature_without_secret(receiver: PushReceiver) -> None:
    world = World({ROOM: [target(BOB, "phone")]})
    pusher = Pusher(config(receiver), world.resolve, world.online)
    with trio.fail_after(10):
        async with running(pusher):
            pusher.offer(ROOM, 1, ALICE, "laptop")
            [req] = await receiver.wait_requests(1)
    assert "x-relay-signature" not in req.headers


# --- 2. who gets nothing ----------------------------------------------------------------


async def test_online_sender_and_pre_join_devices_get_nothing(receiver: PushReceiver) -> None:
    world = World(
        {
            ROOM: [
                target(ALICE, "laptop"),  # the sender's own device
                target(ALICE, "tablet"),  # the sender's other device: offline
                target(BOB, "phone"),  # connected
                target(CAROL, "phone", joined_seq=5),  # sees only seq > 5
            ]
        }
    )
    world.connected.add((BOB, "phone"))
    pusher = Pusher(config(receiver), world.resolve, world.online)
    with trio.fail_after(10):
        async with running(pusher):
            pusher.offer(ROOM, 5, ALICE, "laptop")
            await receiver.wait_requests(1)
            await trio.sleep(0.3)
            assert [r.json()["device"] for r in receiver.requests] == ["tablet"]
            pusher.offer(ROOM, 6, ALICE, "laptop")
            await receiver.wait_requests(3)  # tablet and carol (bob is online)
            await until(lambda: pusher.pending() == 0)
            await trio.sleep(0.3)
    assert len(receiver.requests) == 3
    tokens = sorted(r.json()["token"] for r in receiver.requests[1:])
    assert tokens == ["tok-alice-tablet", "tok-carol-phone"]
    assert pusher.stats.online == 2  # bob, once per message
    assert pusher.pending() == 0


# --- 3. coalescing ------------------------------------------------------------------------


async def test_burst_is_coalesced(receiver: PushReceiver) -> None:
    world = World({ROOM: [target(BOB, "phone")]})
    pusher = Pusher(config(receiver, coalesce_s=0.25), world.resolve, world.online)
    with trio.fail_after(10):
        async with running(pusher):
            for seq in range(1, 101):
                pusher.offer(ROOM, seq, ALICE, "laptop")
                if seq % 10 == 0:
                    await trio.lowlevel.checkpoint()  # let the intake take partial batches
            await until(lambda: pusher.pending() == 0)
            await trio.sleep(0.3)
    bodies = [r.json() for r in receiver.requests]
    assert 1 <= len(bodies) <= 3
    assert sum(b["count"] for b in bodies) == 100
    assert bodies[-1]["seq"] == 100
    assert pusher.stats.coalesced == 100 - len(bodies)


# --- 4. retries and outages ------------------------------------------------------------------


async def test_server_errors_are_retried(receiver: PushReceiver) -> None:
    receiver.answer_next(2, 500)
    world = World({ROOM: [target(BOB, "phone")]})
    pusher = Pusher(config(receiver), world.resolve, world.online)
    with trio.fail_after(10):
        async with running(pusher):
            pusher.offer(ROOM, 3, ALICE, "laptop")
            await until(lambda: pusher.stats.sent == 1)
    assert len(receiver.requests) == 3
    assert {r.body for r in receiver.requests} == {receiver.requests[0].body}
    assert (pusher.stats.retried, pusher.stats.failed) == (2, 0)


async def test_receiver_down_then_back(receiver: PushReceiver) -> None:
    world = World({ROOM: [target(BOB, "phone")]})
    pusher = Pusher(config(receiver, max_attempts=50), world.resolve, world.online)
    with trio.fail_after(10):
        async with running(pusher):
            await receiver.stop()
            pusher.offer(ROOM, 1, ALICE, "laptop")
            await until(lambda: pusher.stats.retried >= 2)
            pusher.offer(ROOM, 2, ALICE, "laptop")  # merges into the waiting entry
            await receiver.start()
            await until(lambda: pusher.stats.sent == 1)
    [req] = receiver.requests
    assert (req.json()["seq"], req.json()["count"]) == (2, 2)
    assert pusher.stats.failed == 0


async def test_receiver_down_too_long_gives_up_then_recovers(receiver: PushReceiver) -> None:
    world = World({ROOM: [target(BOB, "phone")]})
    pusher = Pusher(config(receiver, max_attempts=3), world.resolve, world.online)
    with trio.fail_after(10):
        async with running(pusher):
            await receiver.stop()
            pusher.offer(ROOM, 1, ALICE, "laptop")
            await until(lambda: pusher.stats.failed == 1)
            assert pusher.stats.retried == 2
            assert pusher.pending() == 0
            await receiver.start()
            pusher.offer(ROOM, 2, ALICE, "laptop")
            [req] = await receiver.wait_requests(1)
            await until(lambda: pusher.stats.sent == 1)
    assert (req.json()["seq"], req.json()["count"]) == (2, 1)


async def test_hanging_receiver_times_out_and_is_retried(receiver: PushReceiver) -> None:
    receiver._script.append(Reply(hang=True))
    world = World({ROOM: [target(BOB, "phone")]})
    pusher = Pusher(config(receiver, attempt_timeout_s=0.5), world.resolve, world.online)
    with trio.fail_after(10):
        async with running(pusher):
            pusher.offer(ROOM, 1, ALICE, "laptop")
            await until(lambda: pusher.stats.sent == 1)
    assert len(receiver.requests) == 2
    assert pusher.stats.retried == 1
    # The clock starts before the request reaches the receiver: leave room for that.
    assert receiver.requests[1].at - receiver.requests[0].at >= 0.35


async def test_storage_outage_does_not_kill_the_worker(receiver: PushReceiver) -> None:
    world = World({ROOM: [target(BOB, "phone")]})
    pusher = Pusher(config(receiver), world.resolve, world.online)
    with trio.fail_after(10):
        async with running(pusher):
            world.fail_resolve = 1  # a blip: the batch is retried
            pusher.offer(ROOM, 1, ALICE, "laptop")
            await until(lambda: pusher.stats.sent == 1)
            world.fail_resolve = 100  # a long outage: the batch is given up
            pusher.offer(ROOM, 2, ALICE, "laptop")
            await until(lambda: pusher.stats.failed == 1)
            world.fail_resolve = 0
            pusher.offer(ROOM, 3, ALICE, "laptop")
            await until(lambda: pusher.stats.sent == 2)
    assert [r.json()["seq"] for r in receiver.requests] == [1, 3]


# --- 5. answers that end the attempts ---------------------------------------------------------


async def test_gone_token_is_reported_once_and_not_retried(receiver: PushReceiver) -> None:
    receiver.answer_next(1, 410)
    world = World({ROOM: [target(BOB, "phone")]})
    pusher = Pusher(config(receiver), world.resolve, world.online, on_gone=world.on_gone)
    with trio.fail_after(10):
        async with running(pusher):
            pusher.offer(ROOM, 1, ALICE, "laptop")
            await until(lambda: pusher.stats.gone == 1)
            await trio.sleep(0.4)
    assert len(receiver.requests) == 1
    assert world.gone == [target(BOB, "phone")]
    assert (pusher.stats.retried, pusher.stats.sent, pusher.stats.failed) == (0, 0, 0)


async def test_client_error_is_permanent(receiver: PushReceiver) -> None:
    receiver.answer_next(1, 400)
    world = World({ROOM: [target(BOB, "phone")]})
    pusher = Pusher(config(receiver), world.resolve, world.online, on_gone=world.on_gone)
    with trio.fail_after(10):
        async with running(pusher):
            pusher.offer(ROOM, 1, ALICE, "laptop")
            await until(lambda: pusher.stats.failed == 1)
            await trio.sleep(0.4)
    assert len(receiver.requests) == 1
    assert (pusher.stats.retried, pusher.stats.gone, world.gone) == (0, 0, [])


async def test_retry_after_is_honoured(receiver: PushReceiver) -> None:
    receiver.answer_next(1, 429, headers=(("Retry-After", "1"),))
    world = World({ROOM: [target(BOB, "phone")]})
    pusher = Pusher(config(receiver), world.resolve, world.online)  # backoff_max_s=0.2
    with trio.fail_after(10):
        async with running(pusher):
            pusher.offer(ROOM, 1, ALICE, "laptop")
            first, second = await receiver.wait_requests(2)
            await until(lambda: pusher.stats.sent == 1)
    assert second.at - first.at >= 0.95


# --- 6. bounds and the cost of offer() ------------------------------------------------------


async def test_bounded_queue_and_offer_stays_fast(receiver: PushReceiver) -> None:
    receiver.default = Reply(hang=True)
    devices = [target(f"did:example:user{i}", "phone") for i in range(50)]
    world = World({ROOM: devices})
    cfg = config(receiver, queue_limit=10, intake_limit=2000, attempt_timeout_s=0.5)
    pusher = Pusher(cfg, world.resolve, world.online)
    with trio.fail_after(15):
        async with running(pusher):
            pusher.offer(ROOM, 1, ALICE, "laptop")
            await receiver.wait_requests(8)  # concurrency 8: the receiver holds them
            assert pusher.pending() == 10
            assert pusher.stats.dropped == 40

            start = time.perf_counter()
            for seq in range(2, 10_002):
                pusher.offer(ROOM, seq, ALICE, "laptop")
            elapsed = time.perf_counter() - start
            assert elapsed < 0.05, f"10,000 offers took {elapsed * 1000:.1f} ms"
            assert pusher.pending() <= 2000 + 10  # the intake is bounded too
            await until(lambda: pusher.pending() <= 10)
            assert receiver.max_in_flight <= 8
    assert pusher.stats.offered == 10_001
    assert pusher.stats.dropped >= 40 + 8000


# --- 7. concurrency ------------------------------------------------------------------


async def test_concurrency_bound(receiver: PushReceiver) -> None:
    receiver.default = Reply(delay=0.15)
    world = World({ROOM: [target(f"did:example:user{i}", "phone") for i in range(12)]})
    pusher = Pusher(config(receiver, concurrency=3), world.resolve, world.online)
    with trio.fail_after(10):
        async with running(pusher):
            pusher.offer(ROOM, 1, ALICE, "laptop")
            await until(lambda: pusher.stats.sent == 12)
    assert receiver.max_in_flight == 3
    assert len({r.json()["token"] for r in receiver.requests}) == 12


# --- 8. shutdown ------------------------------------------------------------------------


async def test_cancellation_exits_promptly_and_closes_the_client(receiver: PushReceiver) -> None:
    receiver.answer_next(1, 200)
    receiver.default = Reply(hang=True)
    world = World({ROOM: [target(BOB, "phone")], b"other": [target(CAROL, "phone")]})
    pusher = Pusher(config(receiver, attempt_timeout_s=30), world.resolve, world.online)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(pusher.run)
            pusher.offer(ROOM, 1, ALICE, "laptop")
            await until(lambda: pusher.stats.sent == 1)
            pusher.offer(b"other", 1, ALICE, "laptop")
            await receiver.wait_requests(2)  # now hanging, in flight
            assert receiver.open_connections >= 1
            cancelled_at = trio.current_time()
            nursery.cancel_scope.cancel()
        assert trio.current_time() - cancelled_at < 0.5
        assert pusher._client is not None and pusher._client.is_closed
        await until(lambda: receiver.open_connections == 0, within=2)


# --- configuration ---------------------------------------------------------------------


def test_parse_providers() -> None:
    assert parse_providers("") == {}
    assert parse_providers(" fcm=https://push.example/v1 , apns=http://10.0.0.2:8080/p ") == {
        "fcm": "https://push.example/v1",
        "apns": "http://10.0.0.2:8080/p",
    }
    for bad in ("fcm", "=https://h/p", "fcm=ftp://h/p", "fcm=https://", "a=http://h,a=http://i"):
        with pytest.raises(ValueError):
            parse_providers(bad)


def test_bad_push_providers_are_a_configuration_error() -> None:
    from relay.base.config import ConfigError, from_env

    assert from_env({"RELAY_PUSH_PROVIDERS": "hook=https://push.example/x"}).push_providers
    for bad in ("hook", "hook=ftp://x", "a=https://x,a=https://y"):
        with pytest.raises(ConfigError, match="RELAY_PUSH_PROVIDERS"):
            from_env({"RELAY_PUSH_PROVIDERS": bad})
