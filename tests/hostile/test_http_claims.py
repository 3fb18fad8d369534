"""Claim rate limits cannot be reset or sidestepped.

Before: without Redis the claim buckets were pruned once the table passed
10,000 entries, which gave partly used buckets a fresh burst, and a claim
could name any number of DIDs: three accounts padding each claim with 999
junk DIDs claimed 133 of one victim's KeyPackages in 40 s against a ceiling
of about 50 (RELAY_CLAIM_TARGET_RATE_PER_MIN=30: a burst of 30, then one
every 2 s)."""

from __future__ import annotations

import json
import time

import pytest
import trio

from relay.cluster.sharedlimits import MAX_USERS_PER_CLAIM, TokenBuckets
from tests.harness import running_relay
from tests.mls_helpers import http
from tests.relayclient import connect, make_token

BOB = "did:example:bob"
ATTACKERS = [f"did:example:mallory{i}" for i in range(3)]
TARGET_RATE = 30  # per minute, the default
RUN_S = 8.0


async def _claim(port: int, token: str, users: list[str]) -> tuple[int, dict]:
    body = json.dumps({"users": users, "cipher_suite": 1}).encode()
    status, _, raw = await http(port, "POST", "/v1/keypackages/claim", token, body)
    return status, json.loads(raw)


@pytest.mark.parametrize("shared", [False, True], ids=["local", "redis"])
@pytest.mark.timeout(120)
async def test_padded_claims_stay_under_the_target_ceiling(tmp_path, redis_url, shared):
    # SQLite: the limiter is under test, and on it the attackers reach their
    # claim bursts (120 junk claims, ~12,000 keys) within the run.  (On
    # PostgreSQL a 100-user claim is 100+ round trips, too slow to get there.)
    database_url = f"sqlite:///{tmp_path}/claims.db"
    settings = (
        {"redis_url": redis_url.url, "redis_prefix": redis_url.key("claims:")} if shared else {}
    )
    with trio.fail_after(100):
        async with running_relay(database_url, **settings) as r:
            # What is counted is claims the limiter let through for BOB: each
            # would hand out one of his KeyPackages per device (he has none
            # here, so each answer lists him as missing; the charge is the same).
            claimed: list[int] = []
            bob_done = trio.Event()
            refused = 0
            started = time.monotonic()

            token = make_token(ATTACKERS[0], "m", lifetime=300)
            # The measured attack padded each claim with 999 junk DIDs: refused now.
            padded = [BOB, *(f"did:example:junk-{i}" for i in range(999))]
            status, answer = await _claim(r.port, token, padded)
            assert (status, answer["error"]) == (400, "InvalidRequest"), answer

            async def claim_bob() -> None:
                # One attacker claims BOB alone, as fast as it is let through.
                # Paced, so that BOB's bucket is only partly used while the
                # others fill the table (what the old pruning forgot).
                nonlocal refused
                while time.monotonic() - started < RUN_S:
                    await trio.sleep(0.1)
                    status, answer = await _claim(r.port, token, [BOB])
                    if status == 200:
                        assert answer["missing"] == [{"user": BOB, "device": None}], answer
                        claimed.append(1)
                    else:
                        assert (status, answer["error"]) == (429, "RateLimited"), answer
                        refused += 1
                bob_done.set()

            async def fill_table(name: str) -> None:
                # The others name 100 junk DIDs per claim until their own claim
                # bursts are spent: ~12,000 limiter keys, past the table size
                # that made the old code forget partly used buckets (BOB's).
                junk_token = make_token(name, "m", lifetime=300)
                round_ = 0
                while not bob_done.is_set():
                    junk = [f"did:example:junk-{name[-1]}-{round_}-{i}" for i in range(100)]
                    round_ += 1
                    status, answer = await _claim(r.port, junk_token, junk)
                    if status != 200:
                        assert (status, answer["error"]) == (429, "RateLimited"), answer
                        await trio.sleep(0.2)

            async with trio.open_nursery() as nursery:
                for name in ATTACKERS[1:]:
                    nursery.start_soon(fill_table, name)
                nursery.start_soon(claim_bob)
            elapsed = time.monotonic() - started
            ceiling = TARGET_RATE + elapsed * TARGET_RATE / 60 + 1
            assert len(claimed) <= ceiling, (len(claimed), ceiling)
            assert len(claimed) >= TARGET_RATE  # the burst itself was served
            assert refused > 0
            print(f"claims for BOB: {len(claimed)} in {elapsed:.1f} s (ceiling {ceiling:.0f})")


async def test_a_claim_names_at_most_100_users(tmp_path):
    too_many = [f"did:example:u{i}" for i in range(MAX_USERS_PER_CLAIM + 1)]
    with trio.fail_after(30):
        async with running_relay(f"sqlite:///{tmp_path}/r.db") as r:
            status, answer = await _claim(r.port, make_token(ATTACKERS[0], "m"), too_many)
            assert (status, answer["error"]) == (400, "InvalidRequest")
            async with connect(r.ws_url, ATTACKERS[0], "m2") as ws:
                reply = await ws.request("#claimKeyPackages", users=too_many, cipher_suite=1)
                assert reply.body["error"] == "InvalidRequest"
                # Duplicates count once: 100 distinct users are accepted.
                reply = await ws.request(
                    "#claimKeyPackages", users=too_many[:100] + too_many[:5], cipher_suite=1
                )
                assert reply.ok, reply.body


def test_a_full_table_never_resets_a_bucket() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=0.5, burst=30, clock=lambda: now[0], max_keys=5000)
    for _ in range(30):
        assert buckets.take("victim") == 0
    assert buckets.take("victim") > 0
    now[0] = 2.0  # one token back, 29 short of a full bucket
    for i in range(20_000):  # junk keys: more than the table holds
        buckets.take(f"junk-{i}")
    assert buckets.take("victim") == 0
    assert buckets.take("victim") > 0, "the victim's bucket was reset"
    assert len(buckets._buckets) <= 5000
    now[0] = 1000.0  # everything refilled: full buckets are forgotten, new keys fit again
    assert buckets.take("newcomer") == 0
    assert len(buckets._buckets) < 5000
