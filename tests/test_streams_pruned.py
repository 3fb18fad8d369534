"""A replay whose gap was pruned meanwhile jumps to the first retained seq
instead of reading the same empty range forever (real SQLite, real socket)."""

from __future__ import annotations

import socket

import trio

from relay.delivery.outbox import Flusher, Outbox
from relay.delivery.streams import Streams
from storage import open_storage
from storage.base import NewMessage

CONV = b"pruned"
ALICE, BOB = "did:example:alice", "did:example:bob"


async def test_catch_up_skips_a_gap_pruned_after_the_snapshot(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/r.db")
    await storage.migrate()
    await storage.create_conversation(CONV, ALICE, [BOB], 1)
    await storage.append_messages(
        [NewMessage(CONV, ALICE, "a", f"m{i}", b"x", 1000 + i) for i in range(5)]
    )
    # The snapshot said seqs 1..5 exist; retention removes them before the read.
    assert await storage.prune_messages(10_000) == 5
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    flusher = Flusher()
    outbox = Outbox(writer.fileno(), flusher, 1 << 20)
    streams = Streams(BOB, "b", outbox, flusher, storage, lambda conv: None)
    idle = trio.Event()
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                outbox.nursery = nursery
                streams.attach(nursery, idle.set)
                st = streams.follow(CONV, next_seq=1, known_last=5)
                await idle.wait()
                assert not st.catching_up and st.next_seq == 6
                nursery.cancel_scope.cancel()
    finally:
        reader.close()
        writer.close()
        await storage.aclose()
