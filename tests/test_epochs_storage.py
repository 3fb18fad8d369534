"""The epoch rule inside storage.append_messages (one group-commit batch), both backends."""

from __future__ import annotations

import dataclasses

import trio

from protocol.errors import MLSValidationError, NotMember, StaleCommit, UnknownKeyPackage
from storage import open_storage
from storage.base import Appended, NewMessage

G = b"group"


def msg(conv: bytes, cmid: str, kind: str = "", epoch: int = 0, **extra: object) -> NewMessage:
    base = NewMessage(conv, "alice", "a1", cmid, b"ct-" + cmid.encode(), 1000)
    return dataclasses.replace(base, kind=kind, epoch=epoch, group_id=G if kind else b"", **extra)  # type: ignore[arg-type]


async def test_one_batch_mixes_plain_and_mls_and_orders_commits(database_url):
    storage = open_storage(database_url, pool_min=1, pool_max=2)
    with trio.fail_after(30):
        try:
            await storage.migrate()
            await storage.create_conversation(b"m", "alice", [], 1, mls_group_id=G)
            await storage.create_conversation(b"p", "alice", [], 1)
            batch = [
                msg(b"p", "p1"),
                msg(b"m", "c0", "commit", 0),
                msg(b"m", "c0-rival", "commit", 0),  # same epoch, same batch: loses
                msg(b"m", "app", "application", 1),
                msg(b"m", "c0", "commit", 0),  # a retry of the winner: its original seq
                msg(b"m", "plain-in-mls"),
                msg(b"p", "p2"),
                msg(b"m", "w", "commit", 1, welcome=b"W", welcome_refs=(b"unclaimed",)),
                dataclasses.replace(msg(b"m", "x", "application", 1), sender="mallory"),
            ]
            out = await storage.append_messages(batch)
            assert [(o.seq, o.duplicate) for o in out if isinstance(o, Appended)] == [
                (1, False), (1, False), (2, False), (1, True), (2, False),
            ]  # fmt: skip
            assert isinstance(out[2], StaleCommit) and out[2].details["epoch"] == 1
            assert isinstance(out[5], MLSValidationError)
            assert isinstance(out[7], UnknownKeyPackage)
            assert isinstance(out[8], NotMember)
            assert [o.epoch for o in out if isinstance(o, Appended)] == [None, 1, 1, 1, None]
            assert [m.seq for m in await storage.read_messages(b"m", "alice", 0, 10)] == [1, 2]
            assert await storage.mls_group(b"m") == (True, G)
            assert await storage.mls_group(b"p") == (True, None)
            assert await storage.mls_group(b"none") == (False, None)
        finally:
            await storage.aclose()
