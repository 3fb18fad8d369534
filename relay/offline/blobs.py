"""Out-of-line ciphertext: the blob service (registration, store, collector).

A conversation's storage model is ``inline`` (ciphertext in the database) or
``blob``.  In a blob conversation, ciphertext longer than
``RELAY_BLOB_THRESHOLD`` sent over the WebSocket is written to the blob store
by the relay, and clients may upload larger payloads over HTTP first and send
a message naming the blob.  Either way the stored message has an empty
ciphertext and a blob key; recipients download the bytes over HTTP with the
same membership rules as messages.

Every blob is registered in the database (storage ``put_blob``) BEFORE its
bytes are written, so the collector can always find what a crash or an
abandoned upload left behind: it deletes the bytes of blobs no retained
message references (their conversation deleted, their message pruned by
retention, or never sent within ``RELAY_BLOB_ORPHAN_TTL_S``), then the rows.

Its HTTP routes are :mod:`relay.edge.http.blobs` (bearer token as
everywhere). Both stream: an upload goes to the store (a file, or a spool file then S3)
and a download comes back in chunks of STREAM_CHUNK (storage/blobstore.py),
so a transfer holds about one chunk in memory whatever the blob's size, and
each holds a transfer slot (relay/edge/http/limits.py).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from typing import TYPE_CHECKING

import trio

from protocol.errors import RelayError

if TYPE_CHECKING:
    from relay.base.incidents import Incidents
    from storage.base import Storage
    from storage.blobstore import BlobStore

log = logging.getLogger("relay.blobs")

#: Blobs deleted per collector round (each round is one query, then deletes).
COLLECT_BATCH = 500


def new_key() -> str:
    return secrets.token_urlsafe(18)  # 24 characters, 144 random bits


def store_path(conversation: bytes, key: str) -> str:
    """Where a blob lives in the store: a fixed-length directory per
    conversation (ids may be 255 bytes), then the key."""
    return f"{hashlib.sha256(conversation).hexdigest()[:32]}/{key}"


class Blobs:
    def __init__(
        self,
        storage: Storage,
        store: BlobStore,
        incidents: Incidents,
        *,
        quota_bytes: int,
        orphan_ttl_s: float,
    ) -> None:
        self._storage = storage
        self.store = store
        self._incidents = incidents
        #: Blob bytes a user may hold (0: no quota; RELAY_BLOB_QUOTA_BYTES).
        self._quota_bytes = quota_bytes
        self._orphan_ttl_s = orphan_ttl_s
        self.written = 0
        self.collected = 0
        #: Completed collector passes (run()).
        self.passes = 0
        self._woken = trio.Event()
        self._passed = trio.Event()
        self._busy = False
        self._one_pass = trio.Lock()

    def _now_ms(self) -> int:
        return int(time.time() * 1000)

    async def save(self, conversation: bytes, user: str, device: str, data: bytes) -> str:
        """Store ``data`` as a new blob of the conversation; returns its key.
        Membership and the storage model are checked by the registration."""
        key = new_key()
        await self._storage.put_blob(
            conversation,
            key,
            user,
            device,
            len(data),
            self._now_ms(),
            quota_bytes=self._quota_bytes,
        )
        await self.store.put(store_path(conversation, key), data)
        self.written += 1
        return key

    async def register(self, conversation: bytes, user: str, device: str, size: int) -> str:
        """A new blob key, registered (membership and storage model checked)
        before any of its bytes is read: an HTTP upload streams in after.  The
        registration counts ``size`` against the user's blob quota at once."""
        key = new_key()
        await self._storage.put_blob(
            conversation, key, user, device, size, self._now_ms(), quota_bytes=self._quota_bytes
        )
        return key

    async def load(self, conversation: bytes, key: str) -> bytes:
        return await self.store.get(store_path(conversation, key))

    async def collect(self, now_ms: int | None = None) -> int:
        """Delete what no retained message needs; returns how many blobs went.
        One pass at a time (the collector's, retention's): two would both be
        handed the same rows, delete them twice and count them twice."""
        now = self._now_ms() if now_ms is None else now_ms
        cutoff = now - int(self._orphan_ttl_s * 1000)
        total = 0
        async with self._one_pass:
            while True:
                doomed = await self._storage.collect_blobs(cutoff, COLLECT_BATCH)
                if not doomed:
                    return total
                await self.store.delete([store_path(conv, key) for conv, key in doomed])
                await self._storage.forget_blobs(doomed)
                total += len(doomed)
                self.collected += len(doomed)
                if len(doomed) < COLLECT_BATCH:
                    return total

    def wake(self) -> None:
        """Ask for a collector pass now (a conversation was deleted).  The
        requester does not wait: a conversation may hold any number of blobs,
        and the pass runs in the node's nursery, COLLECT_BATCH at a time."""
        self._woken.set()

    async def settled(self) -> None:
        """Until no pass is asked for or running (tests, operators' tooling)."""
        while self._woken.is_set() or self._busy:
            await self._passed.wait()

    async def run(self) -> None:
        """The collector: every few minutes, and when woken."""
        period = min(300.0, max(1.0, self._orphan_ttl_s / 4))
        while True:
            self._woken = trio.Event()  # a wake from now on asks for another pass
            self._busy = True
            try:
                gone = await self.collect()
                if gone:
                    log.info("blobs collected", extra={"blobs": gone})
            except RelayError:  # database or store down: try again next round
                log.warning("blob collection failed", exc_info=True)
            except Exception as exc:  # a bug: told, counted, and the next pass runs
                self._incidents.report("blobs", exc, "a collector pass")
            finally:
                self._busy = False
            self.passes += 1
            self._passed.set()
            self._passed = trio.Event()
            with trio.move_on_after(period):
                await self._woken.wait()

    async def aclose(self) -> None:
        await self.store.aclose()
