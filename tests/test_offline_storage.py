"""Storage contract for offline devices and blobs (storage/offline_sql.py), both backends."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from protocol.errors import (
    BlobNotFound,
    BlobsDisabled,
    ConversationExists,
    Forbidden,
    FutureCursor,
    NotMember,
)
from storage import NewMessage, Storage, open_storage
from storage.base import Appended, DeliveryState

A, B, C = "did:plc:alice", "did:plc:bob", "did:plc:carol"
CONV = b"conv-offline"


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Storage]:
    s = open_storage(database_url, pool_min=1, pool_max=4)
    await s.migrate()
    try:
        yield s
    finally:
        await s.aclose()


def msg(seq_hint: int, sender: str = A, device: str = "a1", **kw: object) -> NewMessage:
    return NewMessage(CONV, sender, device, f"m{seq_hint}", b"x" * 8, 1000 + seq_hint, **kw)  # type: ignore[arg-type]


async def append(store: Storage, *messages: NewMessage) -> list[Appended]:
    out = await store.append_messages(list(messages))
    assert all(isinstance(r, Appended) for r in out), out
    return out  # type: ignore[return-value]


async def test_delivery_state_counts_devices_of_members(store: Storage) -> None:
    await store.create_conversation(CONV, A, [B, C], 1)
    await store.touch_devices([(A, "a1"), (A, "a2"), (B, "b1"), (C, "c1")], 5)
    r1, r2 = await append(store, msg(1), msg(2))
    assert await store.delivery_state(CONV, A, [r1.seq, r2.seq]) == [
        DeliveryState(r1.seq, 3, 0, 0),  # a2, b1, c1: never the sending device
        DeliveryState(r2.seq, 3, 0, 0),
    ]
    await store.record_deliveries([(B, "b1", CONV, 2), (A, "a2", CONV, 1)], 10)
    await store.record_deliveries([(B, "b1", CONV, 1)], 11)  # never lowers
    await store.set_cursor(C, "c1", CONV, 1)
    states = await store.delivery_state(CONV, A, [1, 2])
    assert states == [DeliveryState(1, 3, 3, 1), DeliveryState(2, 3, 1, 0)]
    # Someone else's messages are left out; non-members are refused.
    assert await store.delivery_state(CONV, B, [1, 2]) == []
    with pytest.raises(NotMember):
        await store.delivery_state(CONV, "did:plc:mallory", [1])


async def test_delivery_state_skips_devices_of_later_members(store: Storage) -> None:
    await store.create_conversation(CONV, A, [B], 1)
    await store.touch_devices([(B, "b1"), (C, "c1")], 5)
    await append(store, msg(1))
    await store.add_members(CONV, A, [C], 6)  # joined_seq 1: message 1 is not C's
    await append(store, msg(2))
    assert await store.delivery_state(CONV, A, [1, 2]) == [
        DeliveryState(1, 1, 0, 0),
        DeliveryState(2, 2, 0, 0),
    ]


async def test_read_positions(store: Storage) -> None:
    await store.create_conversation(CONV, A, [B], 1)
    await append(store, msg(1), msg(2))
    assert await store.set_read(CONV, B, 2, 10) == 2
    assert await store.set_read(CONV, B, 1, 11) == 2  # never moves back
    with pytest.raises(FutureCursor):
        await store.set_read(CONV, B, 3, 12)
    with pytest.raises(NotMember):
        await store.set_read(CONV, C, 1, 12)
    assert await store.read_positions(CONV, A) == {B: 2}
    await store.remove_members(CONV, A, [B])
    assert await store.read_positions(CONV, A) == {}  # former members are not listed
    with pytest.raises(NotMember):
        await store.read_positions(CONV, B)


async def test_push_registrations_of_current_members(store: Storage) -> None:
    await store.create_conversation(CONV, A, [B], 1)
    await store.register_push(B, "b1", "webhook", "eu", "tok-b1", 2)
    await store.register_push(C, "c1", "webhook", "us", "tok-c1", 2)  # not a member
    await store.touch_devices([(B, "b2")], 3)  # no registration
    regs = await store.push_registrations([CONV, b"other"])
    assert [(r.user, r.device, r.provider, r.zone, r.token) for r in regs[CONV]] == [
        (B, "b1", "webhook", "eu", "tok-b1")
    ]
    assert regs[b"other"] == []
    await store.drop_push_token(B, "b1", "an-older-token")  # re-registered since: kept
    assert len((await store.push_registrations([CONV]))[CONV]) == 1
    await store.drop_push_token(B, "b1", "tok-b1")
    assert (await store.push_registrations([CONV]))[CONV] == []
    await store.register_push(B, "b1", "webhook", "eu", "tok-new", 4)
    await store.register_push(B, "b1", "", "", "", 4)  # unregister
    assert (await store.push_registrations([CONV]))[CONV] == []


async def test_blobs_need_blob_model_and_membership(store: Storage) -> None:
    await store.create_conversation(CONV, A, [B], 1)  # inline
    with pytest.raises(BlobsDisabled):
        await store.put_blob(CONV, "k1", A, "a1", 10, 2)
    await store.create_conversation(b"blobby", A, [B], 1, storage_model="blob")
    kind = await store.conversation_kind(b"blobby")
    assert (kind.exists, kind.storage_model) == (True, "blob")
    with pytest.raises(NotMember):
        await store.put_blob(b"blobby", "k1", C, "c1", 10, 2)
    await store.put_blob(b"blobby", "k1", A, "a1", 10, 2)
    # Unreferenced: only its uploader reads it.
    assert (await store.blob_for_reader(b"blobby", "k1", A)).size == 10
    with pytest.raises(BlobNotFound):
        await store.blob_for_reader(b"blobby", "k1", B)
    m = NewMessage(b"blobby", A, "a1", "big", b"", 5, blob_key="k1", blob_size=10)
    (r,) = await append(store, m)
    stored = await store.read_messages(b"blobby", B, 0, 10)
    assert [(s.seq, s.blob_key, s.blob_size, s.ciphertext) for s in stored] == [
        (r.seq, "k1", 10, b"")
    ]
    assert (await store.blob_for_reader(b"blobby", "k1", B)).uploader == A
    await store.add_members(b"blobby", A, [C], 6)  # joined after the message
    with pytest.raises(BlobNotFound):
        await store.blob_for_reader(b"blobby", "k1", C)


async def test_collect_blobs_orphans_and_deleted_conversations(store: Storage) -> None:
    await store.create_conversation(b"blobby", A, [B], 1, storage_model="blob")
    for key, at in (("old-orphan", 100), ("young-orphan", 5000), ("used", 100)):
        await store.put_blob(b"blobby", key, A, "a1", 1, at)
    await append(store, NewMessage(b"blobby", A, "a1", "u", b"", 6, blob_key="used", blob_size=1))
    assert await store.collect_blobs(1000, 100) == [(b"blobby", "old-orphan")]
    await store.forget_blobs([(b"blobby", "old-orphan")])
    assert await store.collect_blobs(1000, 100) == []
    with pytest.raises(Forbidden):
        await store.delete_conversation(b"blobby", B, 7)
    assert await store.delete_conversation(b"blobby", A, 7) == [A, B]
    left = sorted(await store.collect_blobs(1000, 100))
    assert left == [(b"blobby", "used"), (b"blobby", "young-orphan")]
    await store.forget_blobs(left)
    assert await store.collect_blobs(10**12, 100) == []
    with pytest.raises(NotMember):
        await store.read_messages(b"blobby", A, 0, 10)
    with pytest.raises(ConversationExists):  # ids of deleted conversations are not reused
        await store.create_conversation(b"blobby", A, [], 8)
    # A delivered position for the deleted conversation is dropped, not an error.
    await store.record_deliveries([(B, "b1", b"blobby", 1)], 9)
