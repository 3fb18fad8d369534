"""Token buckets and connection counts (no sockets: an injected clock)."""

from __future__ import annotations

import pytest

from protocol.errors import RateLimited
from protocol.requests import Ack, ListConversations, Subscribe
from relay.base.ratelimits import RateLimits, TokenBucket, work_cost


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_burst_then_rate():
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert [bucket.take() for _ in range(5)] == [0.0] * 5
    assert bucket.take() == pytest.approx(0.1)
    clock.now += 0.25
    assert bucket.take() == 0.0 and bucket.take() == 0.0
    assert bucket.take() > 0


def test_connections_per_user_are_counted_and_released():
    limits = RateLimits(connections_per_user=2)
    assert limits.connect("did:a") and limits.connect("did:a")
    assert not limits.connect("did:a")
    assert limits.connect("did:b")
    limits.disconnect("did:a")
    assert limits.connect("did:a")
    assert limits.rejected == {"TooManyConnections": 1}


def test_per_connection_rate():
    limits = RateLimits(requests_per_connection=5, requests_per_user=0, clock=Clock())
    a, b = limits.connection_bucket(), limits.connection_bucket()
    for _ in range(10):  # the burst is twice the rate
        limits.check_request("did:a", a)
    with pytest.raises(RateLimited) as exc:
        limits.check_request("did:a", a)
    assert exc.value.retryable and exc.value.details["retry_after_ms"] >= 1
    limits.check_request("did:a", b)  # another connection has its own bucket


def test_per_user_rate_spans_connections():
    clock = Clock()
    limits = RateLimits(requests_per_connection=100, requests_per_user=5, clock=clock)
    a, b = limits.connection_bucket(), limits.connection_bucket()
    for _ in range(10):
        limits.check_request("did:a", a)
    with pytest.raises(RateLimited):
        limits.check_request("did:a", b)  # a fresh connection, but the user is spent
    limits.check_request("did:other", limits.connection_bucket())
    clock.now += 1.0
    limits.check_request("did:a", b)
    assert limits.rejected == {"RateLimited": 1}


def test_work_cost_of_lists_and_subscribes():
    """A page costs by its limit (500: 5), a subscribe by its cursors (50 each)."""
    assert [work_cost(ListConversations(1, n)) for n in (1, 100, 101, 500)] == [1, 1, 2, 5]
    assert work_cost(Subscribe(1, {})) == 1
    assert work_cost(Subscribe(1, {b"c%d" % i: 0 for i in range(51)})) == 2
    assert work_cost(Subscribe(1, {b"c%d" % i: 0 for i in range(10_000)})) == 200
    assert work_cost(Ack(1, b"c", 1)) == 1


def test_refund_gives_back_up_to_the_burst():
    clock = Clock()
    limits = RateLimits(requests_per_connection=5, requests_per_user=10, clock=clock)
    bucket = limits.connection_bucket()
    limits.check_request("did:a", bucket, 5)  # a page of 500
    limits.refund("did:a", bucket, 4)  # that held 100 rows: it cost 1
    for _ in range(9):
        limits.check_request("did:a", bucket)
    with pytest.raises(RateLimited):
        limits.check_request("did:a", bucket)
    limits.refund("did:a", bucket, 1000)  # never past the burst
    assert bucket is not None and bucket.take(11) > 0


def test_a_subscribe_is_charged_to_the_user_also_after_it_disconnects():
    """8,000 conversations set up: 160 requests of debt on the user's bucket
    (burst 20), waited out on a new connection opened after the old closed."""
    clock = Clock()
    limits = RateLimits(requests_per_connection=100, requests_per_user=10, clock=clock)
    assert limits.connect("did:a", "d1")
    limits.charge_subscribed("did:a", 8000)
    limits.disconnect("did:a", "d1")
    assert limits.connect("did:a", "d2")
    with pytest.raises(RateLimited) as refused:
        limits.check_request("did:a", limits.connection_bucket())
    assert refused.value.details["retry_after_ms"] > 1000  # 20 of debt at 10/s (capped)
    clock.now += 2.5
    limits.check_request("did:a", limits.connection_bucket())
    limits.disconnect("did:a", "d2")
    assert limits._users == {} and "did:a" in limits._owing  # 1 taken: not full yet
    clock.now += 10
    assert limits.connect("did:a", "d3")
    limits.disconnect("did:a", "d3")
    assert limits._users == {} and limits._owing == {}  # paid: forgotten
    limits.charge_subscribed("did:b", 8000)  # no connection: nothing to charge
    assert "did:b" not in limits._owing
