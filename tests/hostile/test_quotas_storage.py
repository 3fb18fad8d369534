"""Quotas hold in storage under concurrency (both backends): concurrent
requests of one user cannot both pass a bound, because each check runs in the
transaction that stores what it counts (storage/quotas.py).

Before: no bound at all; every request below was stored."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from protocol.errors import (
    BlobQuotaExceeded,
    QuotaExceeded,
    TooManyConversations,
    TooManyDevices,
    TooManyKeyPackages,
    TooManyMembers,
)
from storage import open_storage
from storage.base import NewKeyPackage, Storage

ALICE, BOB, CAROL = "did:example:alice", "did:example:bob", "did:example:carol"
NOW_MS = 1_700_000_000_000
NOW_S = NOW_MS // 1000
#: Concurrent requests per race, and races per test (each a fresh user).
RACERS = 16
RACE_ROUNDS = 4
KIB = 1024


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[Storage]:
    storage = open_storage(url, pool_min=0, pool_max=8)
    try:
        await storage.migrate()
        yield storage
    finally:
        await storage.aclose()


def packages(n: int, not_after: int = 2**63 - 1) -> list[NewKeyPackage]:
    return [NewKeyPackage(os.urandom(32), 1, os.urandom(64), not_after) for _ in range(n)]


async def race(jobs: list[object]) -> tuple[int, list[BaseException]]:
    """Run the coroutine functions at once; (how many succeeded, the quota refusals)."""
    ok = 0
    refused: list[BaseException] = []

    async def one(job: object) -> None:
        nonlocal ok
        try:
            await job()  # type: ignore[operator]
            ok += 1
        except QuotaExceeded as exc:
            refused.append(exc)

    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(one, job)
    return ok, refused


async def available(storage: Storage, user: str, device: str) -> int:
    return sum(c.available for c in await storage.key_package_counts(user, device, NOW_S))


@pytest.mark.timeout(60)
async def test_key_package_uploads_race_one_passes(database_url: str) -> None:
    async with opened(database_url) as storage:
        jobs = [
            lambda: storage.put_key_packages(ALICE, "a1", packages(3), NOW_MS, max_stored=5)
            for _ in range(6)
        ]
        ok, refused = await race(jobs)
        # 3 fit under 5, 6 do not: exactly one upload of three is stored, whole.
        assert (ok, len(refused)) == (1, 5)
        assert all(isinstance(e, TooManyKeyPackages) for e in refused)
        assert await available(storage, ALICE, "a1") == 3
        # Another device of the same user has its own quota.
        await storage.put_key_packages(ALICE, "a2", packages(5), NOW_MS, max_stored=5)
        # Re-uploading stored refs adds nothing, so it is never refused.
        same = packages(2)
        await storage.put_key_packages(ALICE, "a1", same, NOW_MS, max_stored=5)
        await storage.put_key_packages(ALICE, "a1", same, NOW_MS, max_stored=5)
        assert await available(storage, ALICE, "a1") == 5


@pytest.mark.timeout(60)
async def test_expired_key_packages_make_room(database_url: str) -> None:
    async with opened(database_url) as storage:
        await storage.put_key_packages(BOB, "b1", packages(4, NOT_AFTER := NOW_S + 10), NOW_MS)
        with pytest.raises(TooManyKeyPackages):
            await storage.put_key_packages(BOB, "b1", packages(1), NOW_MS, max_stored=4)
        # Once expired they can never be claimed: they go, and make room.
        later = (NOT_AFTER + 1) * 1000
        await storage.put_key_packages(BOB, "b1", packages(4), later, max_stored=4)
        counts = await storage.key_package_counts(BOB, "b1", NOT_AFTER + 1)
        assert sum(c.available for c in counts) == 4


@pytest.mark.timeout(60)
async def test_blob_registrations_race_one_passes(database_url: str) -> None:
    quota = 10 * KIB
    async with opened(database_url) as storage:
        conv = b"blob-quota"
        uploaders = [f"did:example:up{u}" for u in range(RACE_ROUNDS)]
        await storage.create_conversation(
            conv, ALICE, [BOB, *uploaders], NOW_MS, storage_model="blob"
        )
        for user in uploaders:  # a round per user: more chances for a lost check to show
            jobs = [
                lambda i=i, user=user: storage.put_blob(
                    conv, f"{user}-{i}", user, "d", 6 * KIB, NOW_MS, quota_bytes=quota
                )
                for i in range(RACERS)
            ]
            ok, refused = await race(jobs)
            assert (ok, len(refused)) == (1, RACERS - 1)
            assert all(isinstance(e, BlobQuotaExceeded) for e in refused)
            assert refused[0].details == {"limit": quota, "used": 6 * KIB}
        # Exactly what is left fits; one byte more does not; Bob's quota is his.
        await storage.put_blob(conv, "rest", ALICE, "a1", quota, NOW_MS, quota_bytes=quota)
        with pytest.raises(BlobQuotaExceeded):
            await storage.put_blob(conv, "more", ALICE, "a1", 1, NOW_MS, quota_bytes=quota)
        await storage.put_blob(conv, "bob", BOB, "b1", quota, NOW_MS, quota_bytes=quota)
        # Collected blobs give their bytes back.
        await storage.forget_blobs([(conv, "rest")])
        await storage.put_blob(conv, "again", ALICE, "a1", 6 * KIB, NOW_MS, quota_bytes=quota)
        # Each blob counts at least 4 KiB: tiny ones cannot pile up by the million.
        await storage.put_blob(conv, "t1", ALICE, "a1", 1, NOW_MS, quota_bytes=quota)
        with pytest.raises(BlobQuotaExceeded) as exc:
            await storage.put_blob(conv, "t2", ALICE, "a1", 1, NOW_MS, quota_bytes=quota)
        assert exc.value.details["used"] == 10 * KIB


@pytest.mark.timeout(60)
async def test_conversation_creations_race(database_url: str) -> None:
    async with opened(database_url) as storage:
        jobs = [
            lambda i=i: storage.create_conversation(b"c%d" % i, ALICE, [], NOW_MS, max_created=3)
            for i in range(8)
        ]
        ok, refused = await race(jobs)
        assert (ok, len(refused)) == (3, 5)
        assert all(isinstance(e, TooManyConversations) for e in refused)
        # Created by someone else, being a member does not count against Alice.
        await storage.create_conversation(b"bobs", BOB, [ALICE], NOW_MS, max_created=3)
        # A deleted one counts for a day (deleted ids are kept for ever: a
        # create-delete loop must not grow them at the request rate), then not.
        created = [c.conversation for c in await storage.list_conversations(ALICE)]
        mine = next(c for c in created if c != b"bobs")
        await storage.delete_conversation(mine, ALICE, NOW_MS)
        with pytest.raises(TooManyConversations) as exc:
            await storage.create_conversation(b"c-new", ALICE, [], NOW_MS + 1, max_created=3)
        assert exc.value.details == {"limit": 3, "used": 3}
        a_day_later = NOW_MS + 24 * 3600 * 1000 + 1
        await storage.create_conversation(b"c-new", ALICE, [], a_day_later, max_created=3)
        with pytest.raises(TooManyConversations):
            await storage.create_conversation(b"c-more", ALICE, [], a_day_later, max_created=3)


@pytest.mark.timeout(60)
async def test_member_additions_race(database_url: str) -> None:
    async with opened(database_url) as storage:
        conv = b"members-quota"
        with pytest.raises(TooManyMembers):  # creator + 4 = 5 > 4
            await storage.create_conversation(
                conv, ALICE, [f"did:example:{i}" for i in range(4)], NOW_MS, max_members=4
            )
        await storage.create_conversation(conv, ALICE, [BOB], NOW_MS, max_members=4)
        jobs = [
            lambda i=i: storage.add_members(
                conv, ALICE, [f"did:example:u{i}"], NOW_MS, max_members=4
            )
            for i in range(6)
        ]
        ok, refused = await race(jobs)
        assert (ok, len(refused)) == (2, 4)
        assert all(isinstance(e, TooManyMembers) for e in refused)
        assert len(await storage.members(conv)) == 4
        # A refused addition adds nobody, not even those that would have fit.
        await storage.remove_members(conv, ALICE, [BOB])
        with pytest.raises(TooManyMembers):
            await storage.add_members(conv, ALICE, ["did:example:x", "did:example:y"], NOW_MS,
                                      max_members=4)  # fmt: skip
        assert len(await storage.members(conv)) == 3
        # Adding members already there is never refused.
        await storage.add_members(conv, ALICE, ["did:example:x"], NOW_MS, max_members=4)
        assert await storage.add_members(conv, ALICE, [ALICE], NOW_MS, max_members=4) == []


@pytest.mark.timeout(60)
async def test_external_joins_and_swaps_at_the_member_bound(database_url: str) -> None:
    from storage.base import NewMessage

    g = b"ext-group"
    async with opened(database_url) as storage:
        await storage.create_conversation(g, ALICE, [BOB], NOW_MS, mls_group_id=g,
                                          external_join=True)  # fmt: skip

        def commit(sender: str, epoch: int, kind: str, **extra: object) -> NewMessage:
            return NewMessage(g, sender, "d", f"{sender}-{epoch}", b"c", NOW_MS, kind=kind,
                              epoch=epoch, group_id=g, max_members=2, **extra)  # type: ignore[arg-type]  # fmt: skip

        [out] = await storage.append_messages([commit("did:example:eve", 0, "external_commit")])
        assert isinstance(out, TooManyMembers)
        assert await storage.members(g) == sorted([ALICE, BOB])
        # Removing one while joining keeps it at 2: accepted.
        [out] = await storage.append_messages(
            [commit("did:example:eve", 0, "external_commit", removes=(BOB,))]
        )
        assert not isinstance(out, Exception), out
        assert await storage.members(g) == sorted([ALICE, "did:example:eve"])


@pytest.mark.timeout(60)
async def test_key_package_devices_per_user_race(database_url: str) -> None:
    async with opened(database_url) as storage:
        jobs = [
            lambda i=i: storage.put_key_packages(CAROL, f"c{i}", packages(1), NOW_MS, max_devices=3)
            for i in range(RACERS)
        ]
        ok, refused = await race(jobs)
        assert (ok, len(refused)) == (3, RACERS - 3)
        assert all(isinstance(e, TooManyDevices) for e in refused)
        assert await storage.key_package_devices(CAROL, "new") == (False, 3)
        # A known device is never refused; its packages all claimed, it still counts.
        devices = [d for d in (f"c{i}" for i in range(RACERS))
                   if (await storage.key_package_devices(CAROL, d))[0]]  # fmt: skip
        await storage.put_key_packages(CAROL, devices[0], packages(2), NOW_MS, max_devices=3)
        await storage.claim_key_packages(ALICE, [CAROL], 1, NOW_S, NOW_MS)
        await storage.claim_key_packages(ALICE, [CAROL], 1, NOW_S, NOW_MS)
        await storage.claim_key_packages(ALICE, [CAROL], 1, NOW_S, NOW_MS)
        with pytest.raises(TooManyDevices):
            await storage.put_key_packages(CAROL, "another", packages(1), NOW_MS, max_devices=3)
