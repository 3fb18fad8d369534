"""Background jobs never retry a poisoned row forever (issue 12 point 2):
they drop it, log it once and count it, and the good rows of the same round
are still written.

Measured before: a token whose ``device`` held a NUL was accepted; every
delivery-state flush of the node then failed and re-queued the same row (294
failures in 5 minutes) and ``#deliveryState`` on that node reported nothing
for anyone.  The edge now refuses such a device (tests/hostile/
test_input_tokens.py); here the row is refused behind the edge, by a
database trigger, as any constraint could.
"""

from __future__ import annotations

import logging

import pytest
import trio

from relay.offline.push import Pusher, PushTarget, parse_providers

from ..harness import Running, running_relay
from ..pushreceiver import push_receiver
from ..relayclient import Client, connect
from ..test_push import ROOM, World, config, running, until
from .inputs import install_refusal

ALICE, BOB, CAROL = "did:example:alice", "did:example:bob", "did:example:carol"
CONV = b"conv-delivery"
POISONED = "poisoned-device"
FLUSH_S = 0.1


async def _rounds(r: Running, n: int) -> None:
    """Until the tracker completed ``n`` more rounds."""
    target = r.relay.delivery.rounds + n
    with trio.fail_after(10):
        while True:
            if r.relay.delivery.rounds >= target:
                return
            await trio.sleep(FLUSH_S / 2)


async def _delivered(alice: Client, seqs: list[int], devices: int) -> None:
    """Until every seq counts ``devices`` recipient devices, all delivered."""
    want = [{"seq": s, "devices": devices, "delivered": devices, "acknowledged": 0} for s in seqs]
    with trio.fail_after(10):
        while True:
            state = await alice.ok("#deliveryState", conversation=CONV, seqs=seqs)
            if state["states"] == want:
                return
            await trio.sleep(FLUSH_S)


@pytest.mark.timeout(60)
async def test_the_delivery_flush_drops_a_poisoned_row_and_writes_the_rest(database_url, caplog):
    caplog.set_level(logging.WARNING, logger="relay.base.incidents")
    async with running_relay(database_url, delivery_flush_s=FLUSH_S) as r:
        for table in ("devices", "deliveries"):  # both writes of a flush
            install_refusal(database_url, table, f"NEW.device_id = '{POISONED}'")
        async with (
            connect(r.ws_url, ALICE, "a1", subscribe=True) as alice,
            connect(r.ws_url, BOB, POISONED, subscribe=True) as poisoned,
            connect(r.ws_url, BOB, "b2", subscribe=True) as bob,
            connect(r.ws_url, CAROL, "c1", subscribe=True) as carol,
        ):
            await alice.ok("#createConversation", conversation=CONV, members=[BOB, CAROL])
            seqs = [await alice.send(CONV, f"m{i}".encode()) for i in range(3)]
            for client in (poisoned, bob, carol):
                assert [m["seq"] for m in await client.messages(3, CONV)] == seqs
            # Bob's b2 and Carol's c1 are recorded; the poisoned device never is.
            await _delivered(alice, seqs, devices=2)
            dropped = r.relay.metrics.incidents.dropped
            assert dropped["delivery_state"] == 2  # its device row and its position row
            # Dropped once: later rounds neither retry nor count it again, and
            # keep writing everybody else's positions.
            written = r.relay.delivery.rows_written
            await _rounds(r, 5)
            seqs.append(await alice.send(CONV, b"more"))
            assert [m["seq"] for m in await poisoned.messages(1, CONV)] == seqs[-1:]
            await _delivered(alice, seqs, devices=2)
            await _rounds(r, 3)
            assert dropped["delivery_state"] == 2
            assert r.relay.delivery.rows_written > written
        lines = [rec.getMessage() for rec in caplog.records if "dropped a row" in rec.getMessage()]
        assert len(lines) == 2, lines
        assert all(POISONED in line for line in lines)
        scrape = r.relay.metrics.exposition().decode()
        assert 'relay_poisoned_dropped_total{job="delivery_state"} 2.0' in scrape


@pytest.mark.timeout(30)
async def test_push_drops_an_entry_it_cannot_send_and_keeps_pushing(caplog):
    """A push request that raises what the sender never expected (here httpx's
    InvalidURL, from a provider URL with a control character) drops that
    entry, logged once and counted, without a retry; the sender tasks live
    on and the other devices' pushes go out.  Before, the exception ended
    the pusher's nursery, and with it the node."""
    caplog.set_level(logging.WARNING, logger="relay.base.incidents")
    members = {
        ROOM: [
            PushTarget(BOB, "b-bad", "bad", "eu", "tok-bob", 0),
            PushTarget(CAROL, "c1", "fcm", "eu", "tok-carol", 0),
        ]
    }
    world = World(members)
    async with push_receiver() as receiver:
        providers = {"fcm": receiver.url(), "bad": "http://127.0.0.1:1/p\x7fq"}
        pusher = Pusher(config(receiver, providers=providers), world.resolve, world.online)
        async with running(pusher):
            for seq in (1, 2):
                pusher.offer(ROOM, seq, ALICE, "a1")
                with trio.fail_after(5):
                    (request,) = (await receiver.wait_requests(seq))[seq - 1 :]
                assert request.json()["token"] == "tok-carol" and request.json()["seq"] == seq
                await until(lambda: pusher.stats.poisoned == seq)  # noqa: B023
            await until(lambda: pusher.pending() == 0)  # nothing left to retry
        assert pusher.stats.retried == 0 and pusher.stats.sent == 2
        assert pusher.incidents.dropped["push"] == 2  # one entry per message, none retried
        assert pusher.incidents.counts == {}
    lines = [rec.getMessage() for rec in caplog.records if "dropped a row" in rec.getMessage()]
    assert len(lines) == 2 and all("InvalidURL" in line for line in lines), lines


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:1/p\x7fq", "http://h/\x00", "http://h:99999/p", "ftp://h/p"]
)
def test_push_provider_urls_httpx_cannot_use_are_refused_at_start(url):
    with pytest.raises(ValueError, match="URL must be"):
        parse_providers(f"p={url}")
