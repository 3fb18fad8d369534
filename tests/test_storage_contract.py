"""The storage contract (storage/base.py), run against every backend."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from protocol.errors import (
    ConversationExists,
    FutureCursor,
    NotMember,
    Unavailable,
)
from storage import NewMessage, Storage, open_storage
from storage.base import Appended, NewKeyPackage
from storage.migrate import load_migrations, migrate_postgres
from storage.pgconn import pg_pool
from storage.postgres import PostgresStorage
from storage.sqlite import SqliteStorage, sqlite_pool
from tests.conftest import service_unavailable
from tests.storage_fixtures import (
    Backend,
    PoolKit,
    pg_reachable,
    pg_scalar,
    throwaway_pg_database,
    truncate_pg,
)

pytestmark = pytest.mark.timeout(60)

BACKENDS = ["sqlite", "postgres"]


# --- fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_url(postgres_dsn: str) -> str:
    """The session's throwaway database (conftest), migrated once."""
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        migrate_postgres(conn)
    return postgres_dsn


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        truncate_pg(url)
        return Backend("postgres", url)
    # A missing parent directory: the backend must create it.
    return Backend("sqlite", str(tmp_path / "nested" / "relay.db"))


@pytest.fixture
async def storage(backend: Backend) -> AsyncIterator[Storage]:
    yield await backend.open()
    for s in backend.opened:
        await s.aclose()


def conv(n: int) -> bytes:
    return bytes([0xC0, n])


def msg(c: bytes, sender: str, cmid: str, *, device: str = "d1", at: int = 1000) -> NewMessage:
    return NewMessage(c, sender, device, cmid, f"ct-{sender}-{cmid}".encode(), at)


async def append_ok(s: Storage, *items: NewMessage) -> list[Appended]:
    results = await s.append_messages(items)
    assert all(isinstance(r, Appended) for r in results), results
    return [r for r in results if isinstance(r, Appended)]


# --- conversations and members ------------------------------------------------------


async def test_create_and_duplicate(storage: Storage) -> None:
    info = await storage.create_conversation(conv(1), "alice", ["bob", "alice"], 10)
    assert (info.conversation, info.last_seq, info.joined_seq, info.first_seq) == (conv(1), 0, 0, 1)
    assert await storage.members(conv(1)) == ["alice", "bob"]
    with pytest.raises(ConversationExists):
        await storage.create_conversation(conv(1), "carol", [], 11)
    assert await storage.members(conv(1)) == ["alice", "bob"]


async def test_add_remove_leave(storage: Storage) -> None:
    await storage.create_conversation(conv(1), "alice", ["bob"], 10)
    await append_ok(storage, msg(conv(1), "bob", "m1"), msg(conv(1), "alice", "m2"))
    added = await storage.add_members(conv(1), "bob", ["carol", "alice", "dave", "carol"], 20)
    assert [(a.user, a.joined_seq) for a in added] == [("carol", 2), ("dave", 2)]
    assert await storage.members(conv(1)) == ["alice", "bob", "carol", "dave"]

    assert await storage.remove_members(conv(1), "alice", ["dave", "zed"]) == ["dave"]
    assert await storage.remove_members(conv(1), "bob", ["bob"]) == ["bob"]  # leaving
    assert await storage.members(conv(1)) == ["alice", "carol"]
    with pytest.raises(NotMember):
        await storage.add_members(conv(1), "bob", ["eve"], 30)
    # The leaver's messages stay.
    msgs = await storage.read_messages(conv(1), "alice", 0, 10)
    assert [(m.seq, m.sender) for m in msgs] == [(1, "bob"), (2, "alice")]


async def test_read_messages_stops_at_a_byte_budget(storage: Storage) -> None:
    """A page holds rows while the ciphertext before them is under
    ``max_bytes``: always one, never much past the budget, and without it
    every row up to ``limit`` (a replay page of large messages is bounded)."""
    await storage.create_conversation(conv(1), "alice", ["bob"], 10)
    sizes = [1000, 1000, 5000, 10, 10, 3000]
    await append_ok(
        storage,
        *[
            dataclasses.replace(msg(conv(1), "alice", f"m{i}"), ciphertext=b"x" * n)
            for i, n in enumerate(sizes)
        ],
    )

    async def seqs(after: int, limit: int, max_bytes: int) -> list[int]:
        page = await storage.read_messages(conv(1), "bob", after, limit, max_bytes=max_bytes)
        return [m.seq for m in page]

    assert await seqs(0, 10, 0) == [1, 2, 3, 4, 5, 6]
    assert await seqs(0, 10, 1) == [1]  # one row, whatever its size
    assert await seqs(0, 10, 2000) == [1, 2]
    assert await seqs(0, 10, 2001) == [1, 2, 3]
    assert await seqs(3, 10, 100) == [4, 5, 6]
    assert await seqs(0, 2, 10**9) == [1, 2]  # the row limit still holds
    assert await seqs(6, 10, 100) == []
    with pytest.raises(NotMember):
        await storage.read_messages(conv(1), "mallory", 0, 10, max_bytes=100)


async def test_not_member_and_unknown_conversation(storage: Storage) -> None:
    await storage.create_conversation(conv(1), "alice", [], 10)
    for c, user in ((conv(1), "mallory"), (conv(9), "alice")):
        with pytest.raises(NotMember):
            await storage.add_members(c, user, ["x"], 11)
        with pytest.raises(NotMember):
            await storage.remove_members(c, user, ["alice"])
        with pytest.raises(NotMember):
            await storage.conversation_for_member(c, user)
        with pytest.raises(NotMember):
            await storage.read_messages(c, user, 0, 10)
        with pytest.raises(NotMember):
            await storage.set_cursor(user, "d1", c, 0)
        [result] = await storage.append_messages([msg(c, user, "m")])
        assert isinstance(result, NotMember)
    assert await storage.members(conv(1)) == ["alice"]
    assert await storage.members(conv(9)) == []


async def test_list_conversations(storage: Storage) -> None:
    for n in (3, 1, 2):
        await storage.create_conversation(conv(n), "alice", ["bob"] if n != 2 else [], n)
    await append_ok(storage, msg(conv(3), "alice", "a"), msg(conv(3), "bob", "b"))
    await storage.add_members(conv(3), "alice", ["carol"], 50)
    listed = await storage.list_conversations("alice")
    assert [(i.conversation, i.last_seq, i.joined_seq) for i in listed] == [
        (conv(1), 0, 0),
        (conv(2), 0, 0),
        (conv(3), 2, 0),
    ]
    assert [i.conversation for i in await storage.list_conversations("bob")] == [conv(1), conv(3)]
    [carol] = await storage.list_conversations("carol")
    assert (carol.last_seq, carol.joined_seq, carol.first_seq) == (2, 2, 1)
    assert await storage.list_conversations("nobody") == []


async def test_list_conversations_page(storage: Storage) -> None:
    """Pages by id (byte order: a shorter id before its extensions), from
    after the given id; no more than the limit."""
    ids = [b"\x01", b"\x01\x00", b"\x02", b"\xff", b"b", b"a"]
    for n, c in enumerate(ids):
        await storage.create_conversation(c, "alice", [], n)
    await storage.create_conversation(b"other", "bob", [], 9)
    want = sorted(ids)
    pages, after = [], b""
    while True:
        page = [i.conversation for i in await storage.list_conversations_page("alice", after, 4)]
        pages.append(page)
        if len(page) < 4:
            break
        after = page[-1]
    assert pages == [want[:4], want[4:]]
    page = await storage.list_conversations_page("alice", b"\x01", 2)
    assert [i.conversation for i in page] == [b"\x01\x00", b"\x02"]
    assert await storage.list_conversations_page("alice", b"\xff", 10) == []
    assert await storage.list_conversations_page("nobody", b"", 10) == []


async def test_list_page_walks_the_index(storage: Storage) -> None:
    """The page query reads the (user, conversation) index from ``after``:
    no sort, no scan of the user's other memberships (issue 12: a user in
    10,000 conversations).  Seen in the query plan, on enough rows that the
    planner would rather scan and sort if it could not walk the index."""
    for n in range(300):
        await storage.create_conversation(b"c%04d" % n, "alice", ["bob"], n)
    if isinstance(storage, PostgresStorage):
        from storage.shared_sql import PAGE_SQL as PG_SQL

        def pg_plan(conn: Any) -> str:
            conn.execute("ANALYZE members")
            sql = "EXPLAIN " + PG_SQL.replace("?", "'alice'", 1).replace("?", "'\\x'::bytea", 1)
            return "\n".join(r[0] for r in conn.execute(sql.replace("?", "20")))

        plan = await storage._pool.run(pg_plan)
        assert "members_user_conversation_idx" in plan and "Sort" not in plan, plan
    else:
        assert isinstance(storage, SqliteStorage)
        from storage.shared_sql import PAGE_SQL as LITE_SQL

        def lite_plan(conn: Any) -> str:
            rows = conn.execute("EXPLAIN QUERY PLAN " + LITE_SQL, ("alice", b"", 20))
            return "\n".join(str(r[-1]) for r in rows)

        plan = await storage._read(lite_plan)
        assert "members_user_did_idx" in plan and "TEMP B-TREE" not in plan, plan


# --- messages -------------------------------------------------------------------------


async def test_append_assigns_1_to_n(storage: Storage) -> None:
    await storage.create_conversation(conv(1), "alice", [], 10)
    got = await append_ok(storage, *(msg(conv(1), "alice", f"m{i}", at=100 + i) for i in range(5)))
    assert [(a.seq, a.created_ms, a.duplicate) for a in got] == [
        (i + 1, 100 + i, False) for i in range(5)
    ]
    got = await append_ok(storage, msg(conv(1), "alice", "m5"))
    assert got[0].seq == 6
    stored = await storage.read_messages(conv(1), "alice", 0, 100)
    assert [(m.seq, m.sender, m.device, m.ciphertext) for m in stored] == [
        (i + 1, "alice", "d1", f"ct-alice-m{i}".encode()) for i in range(6)
    ]
    assert (await storage.conversation_for_member(conv(1), "alice")).last_seq == 6


async def _hammer(stores: list[Storage], tasks: int = 20, per_task: int = 50) -> list[int]:
    seqs: list[int] = []

    async def worker(t: int) -> None:
        s = stores[t % len(stores)]
        for i in range(per_task):
            [r] = await s.append_messages([msg(conv(1), "alice", f"t{t}-{i}")])
            assert isinstance(r, Appended) and not r.duplicate
            seqs.append(r.seq)

    async with trio.open_nursery() as nursery:
        for t in range(tasks):
            nursery.start_soon(worker, t)
    return seqs


async def _check_gapless(s: Storage, n: int) -> None:
    assert (await s.conversation_for_member(conv(1), "alice")).last_seq == n
    stored = await s.read_messages(conv(1), "alice", 0, n + 10)
    assert [m.seq for m in stored] == list(range(1, n + 1))
    assert len({m.ciphertext for m in stored}) == n


async def test_concurrent_appends_are_gapless(storage: Storage) -> None:
    await storage.create_conversation(conv(1), "alice", [], 10)
    seqs = await _hammer([storage])
    assert sorted(seqs) == list(range(1, 1001))
    await _check_gapless(storage, 1000)


async def test_concurrent_appends_two_nodes(pg_url: str) -> None:
    """Two pools on one PostgreSQL database: two relay nodes."""
    truncate_pg(pg_url)
    nodes = Backend("postgres", pg_url)
    try:
        first, second = await nodes.open(), await nodes.open()
        await first.create_conversation(conv(1), "alice", [], 10)
        seqs = await _hammer([first, second])
        assert sorted(seqs) == list(range(1, 1001))
        await _check_gapless(second, 1000)
    finally:
        for s in nodes.opened:
            await s.aclose()


async def test_idempotent_retry(storage: Storage) -> None:
    await storage.create_conversation(conv(1), "alice", ["bob"], 10)
    [first] = await append_ok(storage, msg(conv(1), "alice", "k", at=111))
    retry, again = await append_ok(
        storage, msg(conv(1), "alice", "k", at=999), msg(conv(1), "alice", "k", at=555)
    )
    assert (first.seq, first.duplicate) == (1, False)
    for dup in (retry, again):
        assert (dup.seq, dup.created_ms, dup.duplicate) == (1, 111, True)
    # Same key inside one batch: the second is a duplicate of the first.
    a, b = await append_ok(storage, msg(conv(1), "bob", "x"), msg(conv(1), "bob", "x"))
    assert (a.seq, a.duplicate, b.seq, b.duplicate) == (2, False, 2, True)
    other_device, other_user = await append_ok(
        storage, msg(conv(1), "alice", "k", device="d2"), msg(conv(1), "bob", "k")
    )
    assert (other_device.seq, other_user.seq) == (3, 4)
    assert not other_device.duplicate and not other_user.duplicate
    stored = await storage.read_messages(conv(1), "alice", 0, 100)
    assert [(m.seq, m.sender, m.device, m.created_ms) for m in stored] == [
        (1, "alice", "d1", 111),
        (2, "bob", "d1", 1000),
        (3, "alice", "d2", 1000),
        (4, "bob", "d1", 1000),
    ]


async def test_batch_with_mixed_members(storage: Storage) -> None:
    await storage.create_conversation(conv(2), "alice", ["bob"], 10)
    await storage.create_conversation(conv(1), "carol", ["bob"], 10)
    batch = [
        msg(conv(2), "alice", "1"),
        msg(conv(1), "alice", "2"),  # not a member of conv 1
        msg(conv(1), "carol", "3"),
        msg(conv(7), "alice", "4"),  # no such conversation
        msg(conv(2), "bob", "5"),
        msg(conv(1), "bob", "6"),
    ]
    results = await storage.append_messages(batch)
    summary = [(r.conversation, r.seq) if isinstance(r, Appended) else type(r) for r in results]
    assert summary == [(conv(2), 1), NotMember, (conv(1), 1), NotMember, (conv(2), 2), (conv(1), 2)]
    assert await storage.append_messages([]) == []


async def test_read_messages_window(storage: Storage) -> None:
    await storage.create_conversation(conv(1), "alice", [], 10)
    await append_ok(storage, *(msg(conv(1), "alice", str(i)) for i in range(10)))
    await storage.add_members(conv(1), "alice", ["bob"], 20)  # joined_seq 10
    await append_ok(storage, *(msg(conv(1), "alice", str(i)) for i in range(10, 15)))

    async def seqs(user: str, after: int, limit: int) -> list[int]:
        return [m.seq for m in await storage.read_messages(conv(1), user, after, limit)]

    assert await seqs("alice", 0, 4) == [1, 2, 3, 4]
    assert await seqs("alice", 12, 100) == [13, 14, 15]
    assert await seqs("alice", 15, 100) == []
    assert await seqs("bob", 0, 100) == [11, 12, 13, 14, 15]
    assert await seqs("bob", 3, 2) == [11, 12]
    assert await seqs("bob", 13, 100) == [14, 15]
    assert await seqs("alice", 0, 0) == []


async def test_prune_advances_first_seq(storage: Storage) -> None:
    await storage.create_conversation(conv(1), "alice", [], 10)
    await storage.create_conversation(conv(2), "alice", [], 10)
    await append_ok(storage, *(msg(conv(1), "alice", str(i), at=100 + i) for i in range(6)))
    await append_ok(storage, *(msg(conv(2), "alice", str(i), at=100) for i in range(3)))
    assert await storage.prune_messages(103) == 3 + 3
    c1 = await storage.conversation_for_member(conv(1), "alice")
    c2 = await storage.conversation_for_member(conv(2), "alice")
    assert (c1.first_seq, c1.last_seq, c2.first_seq, c2.last_seq) == (4, 6, 4, 3)
    assert [m.seq for m in await storage.read_messages(conv(1), "alice", 0, 10)] == [4, 5, 6]
    assert await storage.prune_messages(103) == 0
    [again] = await append_ok(storage, msg(conv(2), "alice", "new"))
    assert again.seq == 4  # seqs keep counting after a full prune
    info = await storage.conversation_for_member(conv(2), "alice")
    assert (info.first_seq, info.last_seq) == (4, 4)


def mls(c: bytes, cmid: str, kind: str, epoch: int, at: int = 100, **extra: Any) -> NewMessage:
    """An MLS message of ``kind`` at ``epoch`` (storage checks only the header fields)."""
    return dataclasses.replace(
        msg(c, "alice", cmid, at=at), kind=kind, epoch=epoch, group_id=b"G", **extra
    )


async def _seqs(s: Storage, c: bytes, user: str = "alice") -> list[int]:
    return [m.seq for m in await s.read_messages(c, user, 0, 100)]


async def test_prune_keeps_the_commit_of_the_current_epoch(storage: Storage) -> None:
    """LESSONS: a retention job that deletes old commits leaves a returning client
    unable to rebuild state.  However old, the current epoch's commit, the epoch
    before it (its proposals) and everything after stay."""
    g = conv(1)
    await storage.create_conversation(g, "alice", [], 10, mls_group_id=b"G")
    await storage.create_conversation(conv(2), "alice", [], 10)
    await append_ok(
        storage,
        mls(g, "a0", "application", 0),  # 1
        mls(g, "c0", "commit", 0),  # 2: epoch 0 -> 1
        mls(g, "a1", "application", 1),  # 3
        mls(g, "p1", "proposal", 1),  # 4: referenced by the next commit
        mls(g, "c1", "commit", 1),  # 5: epoch 1 -> 2, the current epoch's commit
        mls(g, "a2", "application", 2),  # 6
        msg(conv(2), "alice", "plain", at=100),
    )
    # Everything is past the cutoff: the opaque conversation loses all, the MLS one
    # keeps the previous epoch (after commit 2), commit 5 and what follows.
    assert await storage.prune_messages(10**12) == 2 + 1
    assert await _seqs(storage, g) == [3, 4, 5, 6]
    assert (await storage.conversation_for_member(g, "alice")).first_seq == 3
    assert (await storage.conversation_for_member(conv(2), "alice")).first_seq == 2
    assert await storage.prune_messages(10**12) == 0
    # The next commit moves the protected window forward: epoch 2 (after commit 5)
    # and commit 7 stay.
    await append_ok(storage, mls(g, "c2", "commit", 2))  # 7
    assert await storage.prune_messages(10**12) == 3
    assert await _seqs(storage, g) == [6, 7]
    # A losing commit records nothing.
    [lost] = await storage.append_messages([mls(g, "late", "commit", 2)])
    assert not isinstance(lost, Appended)
    assert await storage.prune_messages(10**12) == 0
    # Young messages are kept by age alone, commits or not.
    await append_ok(storage, mls(g, "a3", "application", 3, at=5000))
    assert await storage.prune_messages(4000) == 0
    assert await _seqs(storage, g) == [6, 7, 8]


async def test_prune_deletes_only_a_prefix(storage: Storage) -> None:
    await storage.create_conversation(conv(1), "alice", [], 10)
    # created_ms is not monotonic in seq (clocks of several nodes): seq 3 is old
    # but follows a young message, so it stays and history keeps no hole.
    ages = [100, 100, 500, 100, 600]
    await append_ok(storage, *(msg(conv(1), "alice", str(i), at=a) for i, a in enumerate(ages)))
    assert await storage.prune_messages(200) == 2
    assert await _seqs(storage, conv(1)) == [3, 4, 5]
    info = await storage.conversation_for_member(conv(1), "alice")
    assert (info.first_seq, info.last_seq) == (3, 5)


async def _welcome_bob(s: Storage, g: bytes, epoch: int) -> int:
    """alice claims bob's KeyPackage and commits a Welcome for it; returns the commit seq."""
    ref = f"ref-{epoch}".encode()
    await s.put_key_packages("bob", "b1", [NewKeyPackage(ref, 1, b"kp", 2**40)], 1)
    claim = await s.claim_key_packages("alice", ["bob"], 1, 2, 2)
    assert [c.ref for c in claim.claimed] == [ref]
    [won] = await append_ok(
        s, mls(g, f"w{epoch}", "commit", epoch, welcome=b"W", welcome_refs=(ref,))
    )
    assert won.added == ("bob",)
    return won.seq


async def test_prune_never_drops_what_a_pending_welcome_needs(storage: Storage) -> None:
    g = conv(1)
    await storage.create_conversation(g, "alice", [], 10, mls_group_id=b"G")
    await append_ok(storage, mls(g, "a0", "application", 0))  # 1
    assert await _welcome_bob(storage, g, 0) == 2
    await append_ok(
        storage,
        *(mls(g, f"c{e}", "commit", e) for e in (1, 2, 3)),  # 3, 4, 5
        mls(g, "a4", "application", 4),  # 6
    )
    # Commits alone would allow pruning up to seq 4; bob's unconsumed Welcome
    # (commit seq 2: bob reads from seq 3) keeps everything after it, and stays.
    assert await storage.prune_messages(10**12) == 2
    assert await _seqs(storage, g) == [3, 4, 5, 6]
    assert [w.seq for w in await storage.welcomes_for("bob", "b1")] == [2]
    # Once bob acks past it, the Welcome is gone and so is the pin.
    assert await storage.set_cursor("bob", "b1", g, 3) == 3
    assert await storage.welcomes_for("bob", "b1") == []
    assert await storage.prune_messages(10**12) == 2
    assert await _seqs(storage, g) == [5, 6]


async def test_removed_member_loses_its_pending_welcome(storage: Storage) -> None:
    g = conv(1)
    await storage.create_conversation(g, "alice", [], 10, mls_group_id=b"G")
    await _welcome_bob(storage, g, 0)
    assert len(await storage.welcomes_for("bob", "b1")) == 1
    assert await storage.remove_members(g, "alice", ["bob"]) == ["bob"]
    assert await storage.welcomes_for("bob", "b1") == []


async def test_prune_group_infos_keeps_the_newest(storage: Storage) -> None:
    g = conv(1)
    await storage.create_conversation(g, "alice", [], 10, mls_group_id=b"G")
    for e in range(3):
        gi = b"GI%d" % (e + 1)
        await append_ok(storage, mls(g, f"c{e}", "commit", e, at=100 * (e + 1), group_info=gi))
    assert await storage.prune_group_infos(150) == 1  # epoch 1 only (epoch 2 is younger)
    assert await storage.latest_group_info(g, "alice") == (3, b"GI3")
    assert await storage.prune_group_infos(10**12) == 1  # epoch 2; epoch 3 is the newest
    assert await storage.prune_group_infos(10**12) == 0
    assert await storage.latest_group_info(g, "alice") == (3, b"GI3")


# --- single-use tokens -------------------------------------------------------------------


async def test_consume_token_once(storage: Storage) -> None:
    assert await storage.consume_token("j1", "alice", 10_000, 1_000) is True
    assert await storage.consume_token("j1", "alice", 10_000, 2_000) is False
    assert await storage.consume_token("j1", "mallory", 10_000, 2_000) is False
    assert await storage.consume_token("j2", "alice", 10_000, 2_000) is True
    # After its expiry the id may be used again (the old token is refused by then),
    # even before a purge ran.
    assert await storage.consume_token("j1", "alice", 30_000, 20_000) is True
    assert await storage.consume_token("j1", "alice", 30_000, 20_001) is False
    assert await storage.purge_token_uses(25_000) == 1  # j2 (expired at 10 000)
    assert await storage.purge_token_uses(25_000) == 0
    assert await storage.consume_token("j2", "alice", 40_000, 25_000) is True


async def test_consume_token_races_two_nodes(pg_url: str) -> None:
    """Two pools on one PostgreSQL database: exactly one consumer wins each jti."""
    truncate_pg(pg_url)
    nodes = Backend("postgres", pg_url)
    try:
        stores = [await nodes.open(), await nodes.open()]
        wins: list[str] = []

        async def attempt(i: int, jti: str) -> None:
            if await stores[i % 2].consume_token(jti, "alice", 10**13, 1):
                wins.append(jti)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for jti in ("x", "y", "z"):
                    for i in range(8):
                        nursery.start_soon(attempt, i, jti)
        assert sorted(wins) == ["x", "y", "z"]
    finally:
        for s in nodes.opened:
            await s.aclose()


# --- cursors ----------------------------------------------------------------------------


async def test_cursors(storage: Storage) -> None:
    await storage.create_conversation(conv(1), "alice", ["bob"], 10)
    await storage.create_conversation(conv(2), "alice", [], 10)
    await append_ok(storage, *(msg(conv(1), "alice", str(i)) for i in range(5)))
    assert await storage.get_cursors("alice", "d1") == {}
    assert await storage.set_cursor("alice", "d1", conv(1), 3) == 3
    assert await storage.set_cursor("alice", "d1", conv(1), 1) == 3  # never backwards
    assert await storage.set_cursor("alice", "d1", conv(1), 5) == 5
    assert await storage.set_cursor("alice", "d2", conv(1), 2) == 2
    assert await storage.set_cursor("alice", "d1", conv(2), 0) == 0
    with pytest.raises(FutureCursor):
        await storage.set_cursor("alice", "d1", conv(1), 6)
    with pytest.raises(NotMember):
        await storage.set_cursor("carol", "d1", conv(1), 1)
    assert await storage.get_cursors("alice", "d1") == {conv(1): 5, conv(2): 0}
    assert await storage.get_cursors("alice", "d2") == {conv(1): 2}
    assert await storage.get_cursors("bob", "d1") == {}


async def test_state_survives_reopen(backend: Backend, storage: Storage) -> None:
    await storage.create_conversation(conv(1), "alice", ["bob"], 10)
    await append_ok(storage, msg(conv(1), "alice", "a"), msg(conv(1), "bob", "b"))
    await storage.set_cursor("bob", "phone", conv(1), 2)
    await storage.aclose()

    reopened = await backend.open()
    assert await reopened.get_cursors("bob", "phone") == {conv(1): 2}
    assert await reopened.members(conv(1)) == ["alice", "bob"]
    stored = await reopened.read_messages(conv(1), "bob", 0, 10)
    assert [(m.seq, m.ciphertext) for m in stored] == [(1, b"ct-alice-a"), (2, b"ct-bob-b")]
    [r] = await append_ok(reopened, msg(conv(1), "alice", "c"))
    assert r.seq == 3


# --- migrations ---------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def fresh_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """An empty, unmigrated database."""
    if request.param == "sqlite":
        yield Backend("sqlite", str(tmp_path / "fresh.db"))
        return
    if not pg_reachable():
        service_unavailable("PostgreSQL is unreachable")
    with throwaway_pg_database("relay_contract_mig") as url:
        yield Backend("postgres", url)


async def test_migrate_twice_and_concurrently(fresh_backend: Backend) -> None:
    nodes = [fresh_backend.new() for _ in range(3)]
    try:
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(node.migrate)
        await nodes[0].migrate()
        expected = len(load_migrations(fresh_backend.kind.replace("postgres", "postgresql")))
        assert expected >= 1
        assert fresh_backend.scalar("SELECT count(*) FROM schema_migrations") == expected
        await nodes[1].create_conversation(conv(1), "alice", [], 1)
        assert (await nodes[2].conversation_for_member(conv(1), "alice")).last_seq == 0
    finally:
        for node in nodes:
            await node.aclose()


# --- availability and cancellation -------------------------------------------------------


async def test_unreachable_database_is_unavailable(tmp_path: Path) -> None:
    pg = open_storage("postgresql://127.0.0.1:1/nowhere?connect_timeout=2")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    lite = open_storage(f"sqlite:///{blocker}/relay.db")
    for s in (pg, lite):
        with pytest.raises(Unavailable):
            await s.ping()
        await s.aclose()


@pytest.fixture(params=BACKENDS)
async def kit(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[PoolKit]:
    if request.param == "sqlite":
        # An unbounded recursive CTE: runs until interrupted.
        slow = (
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c)"
            " SELECT count(*) FROM (SELECT x FROM c LIMIT 9000000000)"
        )
        k = PoolKit("sqlite", sqlite_pool(tmp_path / "pool.db", max_size=1), slow)
    else:
        url = request.getfixturevalue("pg_url")
        pg_scalar(url, "DROP TABLE IF EXISTS contract_probe")
        k = PoolKit("postgres", pg_pool(url, max_size=1), "SELECT pg_sleep(10)")
    await k.pool.run(k.tx("CREATE TABLE contract_probe (v integer)"))
    yield k
    await k.pool.run(k.tx("DROP TABLE contract_probe"))
    await k.pool.aclose()


async def test_cancel_running_statement(kit: PoolKit) -> None:
    start = trio.current_time()
    with trio.move_on_after(0.2) as scope:
        await kit.pool.run(kit.tx("INSERT INTO contract_probe VALUES (1)", kit.slow))
    assert scope.cancelled_caught
    assert trio.current_time() - start < 1.2
    # The transaction rolled back and the (only) connection is usable again.
    assert await kit.probe_rows() == 0
    await kit.pool.run(kit.tx("INSERT INTO contract_probe VALUES (2)"))
    assert await kit.probe_rows() == 1


async def test_cancelled_waiter_never_runs(kit: PoolKit) -> None:
    holding = threading.Event()

    def hold(conn: Any) -> None:
        holding.set()
        time.sleep(0.5)  # occupies the only connection, in its worker thread

    async with trio.open_nursery() as nursery:
        nursery.start_soon(kit.pool.run, hold)
        with trio.fail_after(10):
            await trio.to_thread.run_sync(holding.wait, abandon_on_cancel=True)  # it is taken
        with trio.move_on_after(0.1) as scope:
            await kit.pool.run(kit.tx("INSERT INTO contract_probe VALUES (1)"))
        assert scope.cancelled_caught
    await trio.sleep(0.1)
    assert await kit.probe_rows() == 0


async def test_pool_replaces_killed_connection(pg_url: str) -> None:
    pool = pg_pool(pg_url, max_size=1)
    pid = await pool.run(lambda c: c.execute("SELECT pg_backend_pid()").fetchall()[0][0])
    pg_scalar(pg_url, f"SELECT pg_terminate_backend({int(pid)})")
    with pytest.raises(Unavailable):
        await pool.run(lambda c: c.execute("SELECT 1").fetchall())
    new_pid = await pool.run(lambda c: c.execute("SELECT pg_backend_pid()").fetchall()[0][0])
    assert new_pid != pid
    await pool.aclose()


async def test_connection_is_not_reused_after_a_cancel_request(pg_url: str) -> None:
    """A cancel request may reach the server after its statement ended and
    cancel the connection's next one instead (a spurious QueryCanceled that
    once failed an unrelated request): the pool replaces such a connection."""
    pool = pg_pool(pg_url, max_size=1)
    pid = await pool.run(lambda c: c.execute("SELECT pg_backend_pid()").fetchall()[0][0])
    with trio.move_on_after(0.1) as scope:
        await pool.run(lambda c: c.execute("SELECT pg_sleep(5)").fetchall())
    assert scope.cancelled_caught
    for _ in range(20):  # and the replacement serves every later statement
        new_pid = await pool.run(lambda c: c.execute("SELECT pg_backend_pid()").fetchall()[0][0])
        assert new_pid != pid
    await pool.aclose()


def test_open_storage_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert isinstance(open_storage("sqlite:///rel/x.db"), SqliteStorage)
    assert isinstance(open_storage(f"sqlite:///{tmp_path}/abs.db"), SqliteStorage)
    assert isinstance(open_storage("postgres://127.0.0.1/x"), PostgresStorage)
    with pytest.raises(ValueError):
        open_storage("mysql://x")
