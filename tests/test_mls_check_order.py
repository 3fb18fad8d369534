"""One order of checks for MLS sends, the same on both backends
(storage/mls_sql.py CHECK_ORDER; relay_append_mls_v2 on PostgreSQL):
member -> framing -> duplicate -> group -> epoch -> Welcome KeyPackages.
Whoever loses a commit race learns the group's epoch, whatever else is wrong
with its commit; a retried send answers with the epoch its message produced."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from protocol.errors import (
    FutureEpoch,
    MLSValidationError,
    NotMember,
    RelayError,
    StaleCommit,
    UnknownKeyPackage,
    WrongGroup,
)
from protocol.mls import ContentType
from storage import open_storage
from storage.base import Appended, NewMessage, Storage

from .harness import running_relay
from .mls_helpers import private, welcome
from .relayclient import connect

G = b"order-group"
CONV = b"order"
UNCLAIMED = (b"\x01" * 32,)


def msg(cmid: str, kind: str = "", epoch: int = 0, **extra: object) -> NewMessage:
    base = NewMessage(CONV, "alice", "a1", cmid, b"ct-" + cmid.encode(), 1000)
    return dataclasses.replace(base, kind=kind, epoch=epoch, group_id=G if kind else b"", **extra)  # type: ignore[arg-type]


def with_welcome(m: NewMessage) -> NewMessage:
    return dataclasses.replace(m, welcome=b"W", welcome_refs=UNCLAIMED)


@asynccontextmanager
async def mls_storage(database_url: str) -> AsyncIterator[Storage]:
    storage = open_storage(database_url, pool_min=1, pool_max=2)
    try:
        await storage.migrate()
        await storage.create_conversation(CONV, "alice", [], 1, mls_group_id=G)
        yield storage
    finally:
        await storage.aclose()


async def one(storage: Storage, m: NewMessage) -> Appended | RelayError:
    [out] = await storage.append_messages([m])
    return out


def epoch_of(out: Appended | RelayError) -> int | None:
    if isinstance(out, Appended):
        return out.epoch
    value = out.details.get("epoch")
    return int(value) if isinstance(value, int) else None


async def test_every_refusal_after_membership_carries_the_epoch(database_url):
    with trio.fail_after(30):
        async with mls_storage(database_url) as storage:
            won = await one(storage, msg("c1", "commit", 0))
            assert isinstance(won, Appended) and won.epoch == 1
            cases = {
                # The loser of the race for epoch 0, whose Welcome is also bad.
                "stale": (with_welcome(msg("rival", "commit", 0)), StaleCommit),
                "future": (with_welcome(msg("ahead", "commit", 5)), FutureEpoch),
                "group": (
                    dataclasses.replace(with_welcome(msg("g", "commit", 1)), group_id=b"other"),
                    WrongGroup,
                ),
                # Only a commit that would win is refused for its Welcome.
                "refs": (with_welcome(msg("w", "commit", 1)), UnknownKeyPackage),
            }
            for name, (m, expected) in cases.items():
                out = await one(storage, m)
                assert type(out) is expected, (name, out)
                if expected is not UnknownKeyPackage:
                    assert epoch_of(out) == 1, (name, out.details)  # type: ignore[union-attr]
            # Nothing of the refused ones was stored.
            assert [m.seq for m in await storage.read_messages(CONV, "alice", 0, 10)] == [1]


async def test_membership_is_checked_first(database_url):
    with trio.fail_after(30):
        async with mls_storage(database_url) as storage:
            mallory = {"sender": "mallory", "device": "m1"}
            for m in (
                with_welcome(msg("x", "commit", 0)),  # an unclaimed Welcome ref
                msg("y", "commit", 7),  # a future epoch
                msg("z"),  # opaque bytes in an MLS conversation
            ):
                out = await one(storage, dataclasses.replace(m, **mallory))  # type: ignore[arg-type]
                assert type(out) is NotMember and "epoch" not in out.details, out
            opaque = await one(storage, msg("z"))  # a member gets the framing error
            assert type(opaque) is MLSValidationError


async def test_a_retry_answers_with_the_epoch_its_message_produced(database_url):
    with trio.fail_after(30):
        async with mls_storage(database_url) as storage:
            first = await one(storage, msg("c1", "commit", 0))
            app = await one(storage, msg("app", "application", 1))
            second = await one(storage, msg("c2", "commit", 1))
            assert [epoch_of(o) for o in (first, app, second)] == [1, 1, 2]
            # The group is at epoch 2 now; the retries say what their message did.
            again = await one(storage, msg("c1", "commit", 0))
            assert isinstance(again, Appended) and again.duplicate
            assert (again.seq, again.epoch) == (1, 1)
            # Its retry is the original even with a Welcome it did not carry.
            again = await one(storage, with_welcome(msg("c1", "commit", 0)))
            assert isinstance(again, Appended) and (again.seq, again.epoch) == (1, 1)
            again = await one(storage, msg("app", "application", 1))
            assert isinstance(again, Appended) and (again.seq, again.epoch) == (2, 1)


async def test_over_the_websocket_a_retried_commit_keeps_its_epoch(database_url):
    g = b"ws-order"
    with trio.fail_after(40):
        async with running_relay(database_url) as r, connect(r.ws_url, "did:example:a", "a1") as a:
            await a.ok("#createConversation", conversation=g, members=[], mls=True)
            commit = private(g, 0, ContentType.COMMIT)
            cmid = uuid.uuid4().hex
            first = await a.ok("#send", conversation=g, ciphertext=commit, client_message_id=cmid)
            await a.ok(
                "#send",
                conversation=g,
                ciphertext=private(g, 1, ContentType.COMMIT),
                client_message_id=uuid.uuid4().hex,
            )
            retry = await a.ok("#send", conversation=g, ciphertext=commit, client_message_id=cmid)
            assert (retry["seq"], retry["epoch"]) == (first["seq"], first["epoch"]) == (1, 1)
            lost = await a.request(
                "#send",
                conversation=g,
                ciphertext=private(g, 0, ContentType.COMMIT),
                client_message_id=uuid.uuid4().hex,
                welcome=welcome([os.urandom(32)]),  # and a ref nobody claimed
            )
            assert not lost.ok and (lost.body["error"], lost.body["epoch"]) == ("StaleCommit", 2)
