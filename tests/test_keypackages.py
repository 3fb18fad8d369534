"""KeyPackage upload, inventory and claim over real HTTP and WebSocket, both backends."""

from __future__ import annotations

import base64

import cbor2
import trio

from relay.mls.service import TokenBuckets

from .harness import running_relay
from .mls_helpers import as_json, http, make_key_package, ref_of
from .relayclient import connect, make_token

ALICE, BOB, CAROL = "did:example:alice", "did:example:bob", "did:example:carol"


async def upload(port: int, user: str, device: str, *kps: bytes, last_resort: bool = False):  # type: ignore[no-untyped-def]
    token = make_token(user, device)
    if len(kps) == 1:
        path = "/v1/keypackages" + ("?last_resort=true" if last_resort else "")
        return await http(port, "POST", path, token, kps[0], "message/mls")
    return await http(
        port, "POST", "/v1/keypackages", token, cbor2.dumps(list(kps)), "application/cbor"
    )


async def test_upload_validate_count_idempotent(database_url):
    with trio.fail_after(30):
        async with running_relay(database_url) as r:
            one = make_key_package(BOB)
            status, _, body = await upload(r.port, BOB, "b1", one)
            assert status == 200, body
            assert as_json(body)["key_packages"] == [
                {"ref": ref_of(one).hex(), "new": True, "last_resort": False}
            ]
            many = [make_key_package(BOB) for _ in range(3)]
            status, _, body = await upload(r.port, BOB, "b1", one, *many)
            assert status == 200 and as_json(body)["stored"] == 3  # `one` again: idempotent
            status, _, body = await http(
                r.port, "GET", "/v1/keypackages/count", make_token(BOB, "b1")
            )
            assert status == 200 and as_json(body)["available"] == 4
            assert as_json(body)["cipher_suites"] == [
                {"cipher_suite": 1, "available": 4, "last_resort": False}
            ]
            # Another device's inventory is its own.
            _, _, body = await http(r.port, "GET", "/v1/keypackages/count", make_token(BOB, "b2"))
            assert as_json(body)["available"] == 0


def _suite(kp: bytes, suite: int) -> bytes:
    return kp[:6] + suite.to_bytes(2, "big") + kp[8:]  # after the 4-byte header and version


async def test_upload_refusals_name_the_check(database_url):
    with trio.fail_after(30):
        async with running_relay(database_url) as r:
            cases = [
                (make_key_package(ALICE), 403, "CredentialMismatch", "credential"),
                (make_key_package(BOB, break_signature=True), 400, "InvalidMLS", "signature"),
                (make_key_package(BOB)[:-3], 400, "MalformedMLS", "structure"),
                (_suite(make_key_package(BOB), 9), 400, "UnsupportedCipherSuite", "cipher_suite"),
                (make_key_package(BOB, lifetime=(0, 10)), 400, "InvalidMLS", "lifetime"),
                (make_key_package(BOB, lifetime=(0, 2**62)), 400, "InvalidMLS", "lifetime"),
            ]  # fmt: skip
            for kp, status, error, check in cases:
                got, _, body = await upload(r.port, BOB, "b1", kp)
                assert (got, as_json(body)["error"], as_json(body)["check"]) == (
                    status,
                    error,
                    check,
                )
            # A batch is all or nothing, and the failing item is named.
            got, _, body = await upload(
                r.port, BOB, "b1", make_key_package(BOB), make_key_package(CAROL)
            )
            assert got == 403 and as_json(body)["index"] == 1
            got, _, body = await http(r.port, "POST", "/v1/keypackages", None, b"x", "message/mls")
            assert got == 401
            _, _, body = await http(r.port, "GET", "/v1/keypackages/count", make_token(BOB, "b1"))
            assert as_json(body)["available"] == 0


async def test_lifetime_policy_uses_injected_clock(database_url):
    with trio.fail_after(30):
        async with running_relay(database_url, keypackage_allow_eternal=False) as r:
            ds = r.relay.mls
            ds.clock = lambda: 1_000_000.0
            eternal = make_key_package(BOB)
            got, _, body = await upload(r.port, BOB, "b1", eternal)
            assert got == 400 and as_json(body)["check"] == "lifetime"
            fresh = make_key_package(BOB, lifetime=(999_000, 1_000_000 + 86400))
            assert (await upload(r.port, BOB, "b1", fresh))[0] == 200
            ds.clock = lambda: 1_000_000.0 + 2 * 86400  # expired now: not counted, not claimable
            _, _, body = await http(r.port, "GET", "/v1/keypackages/count", make_token(BOB, "b1"))
            assert as_json(body)["available"] == 0
            result = await ds.claim(ALICE, [BOB], 1)
            assert result.claimed == [] and result.missing == [(BOB, "b1")]


async def test_claim_once_last_resort_and_missing(database_url):
    with trio.fail_after(40):
        async with running_relay(database_url) as r:
            normal = make_key_package(BOB)
            spare = make_key_package(BOB)
            assert (await upload(r.port, BOB, "b1", normal))[0] == 200
            assert (await upload(r.port, BOB, "b1", spare, last_resort=True))[0] == 200
            assert (await upload(r.port, BOB, "b2", make_key_package(BOB, suite=2)))[0] == 200
            async with connect(r.ws_url, ALICE, "a1") as a:
                first = await a.ok("#claimKeyPackages", users=[BOB, CAROL], cipher_suite=1)
                assert [
                    (k["device"], k["ref"], k["last_resort"]) for k in first["key_packages"]
                ] == [("b1", ref_of(normal), False)]
                assert first["key_packages"][0]["key_package"] == normal
                assert first["missing"] == [
                    {"user": BOB, "device": "b2"},  # only a suite-2 package
                    {"user": CAROL, "device": None},  # no packages at all
                ]
                # Nothing else left for b1: the last resort, again and again.
                for _ in range(2):
                    again = await a.ok("#claimKeyPackages", users=[BOB], cipher_suite=1)
                    [k] = [k for k in again["key_packages"] if k["device"] == "b1"]
                    assert (k["ref"], k["last_resort"]) == (ref_of(spare), True)
            # Over HTTP too (JSON, base64 packages).
            status, _, body = await http(
                r.port, "POST", "/v1/keypackages/claim", make_token(CAROL, "c1"),
                b'{"users": ["did:example:bob"], "cipher_suite": 2}', "application/json",
            )  # fmt: skip
            assert status == 200, body
            [k] = as_json(body)["key_packages"]
            assert k["device"] == "b2" and base64.b64decode(k["key_package"])[:4] == b"\0\1\0\5"
            # Re-uploading a claimed package does not make it available again.
            await upload(r.port, BOB, "b1", normal)
            _, _, body = await http(r.port, "GET", "/v1/keypackages/count", make_token(BOB, "b1"))
            assert as_json(body)["cipher_suites"] == [
                {"cipher_suite": 1, "available": 0, "last_resort": True}
            ]


async def test_claims_are_rate_limited(database_url):
    with trio.fail_after(30):
        async with running_relay(  # noqa: SIM117 (r is needed below)
            database_url, claim_rate_per_min=3, claim_target_rate_per_min=2
        ) as r:
            async with connect(r.ws_url, ALICE, "a1") as a, connect(r.ws_url, CAROL, "c1") as c:
                for _ in range(2):
                    await a.ok("#claimKeyPackages", users=[BOB], cipher_suite=1)
                reply = await c.request("#claimKeyPackages", users=[BOB], cipher_suite=1)
                assert reply.body["error"] == "RateLimited" and reply.body["user"] == BOB
                await a.ok("#claimKeyPackages", users=[CAROL], cipher_suite=1)
                reply = await a.request(
                    "#claimKeyPackages", users=["did:example:dan"], cipher_suite=1
                )
                assert reply.body["error"] == "RateLimited" and reply.body["retryable"]


def test_token_bucket_refills() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=1.0, burst=2.0, clock=lambda: now[0])
    assert buckets.take("k") == 0 and buckets.take("k") == 0
    assert buckets.take("k") == 1.0
    now[0] = 0.5
    assert buckets.take("k") == 0.5 and buckets.take("other") == 0
    now[0] = 1.0
    assert buckets.take("k") == 0
