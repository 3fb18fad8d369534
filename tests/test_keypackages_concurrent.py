"""A KeyPackage is handed out at most once, also to two relay processes racing
on one PostgreSQL database (two Relay instances, two storages)."""

from __future__ import annotations

import pytest
import trio

from .harness import running_relay
from .mls_helpers import http, make_key_package
from .relayclient import connect, make_token

BOB = "did:example:bob"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_two_relays_never_hand_out_a_package_twice(database_url):
    packages = 40
    with trio.fail_after(50):
        async with running_relay(database_url) as r1, running_relay(database_url) as r2:
            import cbor2

            kps = [make_key_package(BOB) for _ in range(packages)]
            status, _, _ = await http(
                r1.port, "POST", "/v1/keypackages", make_token(BOB, "b1"),
                cbor2.dumps(kps), "application/cbor",
            )  # fmt: skip
            assert status == 200
            got: list[bytes] = []
            missing = 0

            async def claimer(url: str, user: str) -> None:
                nonlocal missing
                async with connect(url, user, "d") as c:
                    for _ in range(6):
                        reply = await c.ok("#claimKeyPackages", users=[BOB], cipher_suite=1)
                        got.extend(k["ref"] for k in reply["key_packages"])
                        missing += len(reply["missing"])

            async with trio.open_nursery() as nursery:
                for i in range(8):
                    url = (r1 if i % 2 else r2).ws_url
                    nursery.start_soon(claimer, url, f"did:example:claimer{i}")
            assert len(got) == len(set(got)) == packages
            assert missing == 8 * 6 - packages
