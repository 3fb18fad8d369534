"""Real MLS end to end through the relay, with mls-rs (agentvault-mls-rs-uniffi,
cipher suite 1): KeyPackage upload, claim, add with Welcome, join, application
messages both ways, and a commit race whose loser recovers."""

from __future__ import annotations

import uuid
from typing import Any

import mls_rs_uniffi as mls  # a dev dependency: missing means a broken install
import trio

from .harness import running_relay
from .mls_helpers import http
from .relayclient import Client, connect, make_token

ALICE, BOB = "did:example:alice", "did:example:bob"
CONV, GROUP = b"e2e", b"e2e-group"


def member(did: str) -> Any:
    suite = mls.CipherSuite.CURVE25519_AES128
    return mls.Client(
        did.encode(), mls.generate_signature_keypair(suite), mls.client_config_default()
    )


async def send(c: Client, data: bytes, **extra: object) -> dict[str, Any]:
    reply = await c.request(
        "#send", conversation=CONV, ciphertext=data, client_message_id=uuid.uuid4().hex, **extra
    )
    return {"ok": reply.ok, **reply.body}


async def receive(c: Client, group: Any) -> Any:
    """The next relayed MLS message for ``c``, processed by its group."""
    [m] = await c.messages(1, CONV)
    return group.process_incoming_message(mls.Message.from_bytes(m["ciphertext"]))


async def test_alice_adds_bob_they_talk_and_a_commit_race_resolves(database_url):
    alice, bob = member(ALICE), member(BOB)
    with trio.fail_after(45):
        async with running_relay(database_url) as r:
            kp = bob.generate_key_package_message().to_bytes()
            token = make_token(BOB, "b1")
            status, _, body = await http(
                r.port, "POST", "/v1/keypackages", token, kp, "message/mls"
            )
            assert status == 200, body
            async with (
                connect(r.ws_url, ALICE, "a1", subscribe=True) as a,
                connect(r.ws_url, BOB, "b1", subscribe=True) as b,
            ):
                await a.ok("#createConversation", conversation=CONV, members=[], mls=True,
                           group_id=GROUP)  # fmt: skip
                ga = alice.create_group(GROUP)
                claimed = await a.ok("#claimKeyPackages", users=[BOB], cipher_suite=1)
                [entry] = claimed["key_packages"]
                out = ga.add_members([mls.Message.from_bytes(entry["key_package"])])
                added = await send(
                    a, out.commit_message.to_bytes(), welcome=out.welcome_message.to_bytes()
                )
                assert added["epoch"] == 1, added
                ga.process_incoming_message(out.commit_message)  # own commit: now applied

                _, event = await b.next_event("#welcome")
                gb = bob.join_group(None, mls.Message.from_bytes(event["welcome"])).group

                assert (await send(a, ga.encrypt_application_message(b"hi bob").to_bytes()))["ok"]
                got = await receive(b, gb)
                assert got.is_application_message() and got.data == b"hi bob"
                assert (await send(b, gb.encrypt_application_message(b"hi alice").to_bytes()))["ok"]
                got = await receive(a, ga)
                assert got.is_application_message() and got.data == b"hi alice"

                # Both commit for epoch 1 at once: exactly one wins.
                ca, cb = ga.commit(), gb.commit()
                results: dict[str, dict[str, Any]] = {}

                async def commit(name: str, c: Client, out: Any) -> None:
                    results[name] = await send(c, out.commit_message.to_bytes())

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(commit, "alice", a, ca)
                    nursery.start_soon(commit, "bob", b, cb)
                assert sorted(x["ok"] for x in results.values()) == [False, True]
                winner = "alice" if results["alice"]["ok"] else "bob"
                loser = "bob" if winner == "alice" else "alice"
                assert (results[loser]["error"], results[loser]["epoch"]) == ("StaleCommit", 2)
                groups = {"alice": (a, ga, ca), "bob": (b, gb, cb)}
                wc, wg, wout = groups[winner]
                lc, lg, _ = groups[loser]
                wg.process_incoming_message(wout.commit_message)
                assert (await receive(lc, lg)).is_commit()  # the loser takes the winner's commit
                # ... and recovers: its next commit is for the new epoch and wins.
                retry = lg.commit()
                assert (await send(lc, retry.commit_message.to_bytes()))["epoch"] == 3
                lg.process_incoming_message(retry.commit_message)
                assert (await receive(wc, wg)).is_commit()
                assert (await send(lc, lg.encrypt_application_message(b"in sync").to_bytes()))["ok"]
                got = await receive(wc, wg)
                assert got.is_application_message() and got.data == b"in sync"
