"""/metrics: scraped under real traffic, on both storage backends."""

from __future__ import annotations

import trio
from prometheus_client.parser import text_string_to_metric_families

from .harness import running_relay
from .relayclient import connect
from .test_relay_edges import http_request

ALICE, BOB = "did:example:alice", "did:example:bob"
CONV = b"metrics-conv"


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    req = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, headers, body = await http_request(port, req)
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_metrics_move_under_traffic(database_url):
    with trio.fail_after(40):
        async with (
            running_relay(database_url) as r,
            running_relay(database_url) as other,
            connect(r.ws_url, ALICE, "a1") as alice,
            connect(r.ws_url, BOB, "b1", subscribe=True) as bob,
        ):
            await alice.ok("#createConversation", conversation=CONV, members=[BOB])
            before = await scrape(r.port)
            for i in range(20):
                await alice.send(CONV, b"secret-%d" % i)
            await bob.messages(20)
            bad = await alice.request("#send", conversation="nope", ciphertext=b"x")
            assert not bad.ok
            after = await scrape(r.port)

            assert value(after, "relay_connections", transport="websocket") == 2
            assert value(after, "relay_connections_accepted_total", transport="websocket") == 2
            assert value(after, "relay_messages_committed_total") == 20
            assert value(before, "relay_messages_committed_total") == 0
            assert value(after, "relay_errors_total", type="InvalidRequest") == 1
            for name in (
                "relay_frames_received_total",
                "relay_frames_sent_total",
                "relay_received_bytes_total",
                "relay_sent_bytes_total",
                "relay_fanout_offers_total",
            ):
                assert value(after, name) > value(before, name), name
            # 20 sends + create + #subscribe + the bad one, as frames in.
            assert value(after, "relay_frames_received_total") >= 23
            # One observation per stored message / per batch, never per recipient.
            assert value(after, "relay_send_to_commit_seconds_count") == 20
            batches = value(after, "relay_commit_batches_total")
            assert 1 <= batches <= 20
            assert value(after, "relay_commit_to_deliver_seconds_count") == batches
            assert value(after, "relay_fanout_lag_seconds_count") == batches
            assert value(after, "relay_send_to_commit_seconds_bucket", le="+Inf") == 20
            assert value(after, "relay_send_to_commit_seconds_sum") < 20 * 5
            pools = {labels for name, labels in after if name == "relay_db_pool_size"}
            assert pools, "no database pool reported"
            for labels in pools:
                size = after[("relay_db_pool_size", labels)]
                pool = dict(labels)["pool"]
                in_use = value(after, "relay_db_pool_connections", pool=pool, state="in_use")
                assert size >= 1 and 0 <= in_use <= size
            assert value(after, "relay_slow_consumer_closes_total") == 0
            assert value(after, "relay_commit_queue_sends") == 0
            assert ("process_cpu_seconds_total", ()) in after

            # No identifiers of users or conversations anywhere in the labels.
            for _, labels in after:
                for _, label_value in labels:
                    assert "did:" not in label_value and "metrics-conv" not in label_value

            # A second relay in the same process has its own registry.
            theirs = await scrape(other.port)
            assert value(theirs, "relay_messages_committed_total") == 0
            assert value(theirs, "relay_connections", transport="websocket") == 0

        # Closed connections keep their counts: counters never go backwards.
        final = r.relay.metrics
        assert final.frames_out() >= value(after, "relay_frames_sent_total")
        assert final.bytes_out() >= value(after, "relay_sent_bytes_total")
        assert not final.open
