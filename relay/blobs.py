"""Out-of-line ciphertext: the blob service and its HTTP routes.

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

Routes (bearer token as everywhere):

* ``POST /v1/conversations/<hex id>/blobs`` -- body: the ciphertext; returns
  ``{blob, size}``.  Members only; the conversation must use the blob model.
* ``GET /v1/conversations/<hex id>/blobs/<key>`` -- the bytes.

Both stream: an upload goes to the store (a file, or a spool file then S3)
and a download comes back in chunks of STREAM_CHUNK (storage/blobstore.py),
so a transfer holds about one chunk in memory whatever the blob's size, and
each holds a transfer slot (relay/httplimits.py).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import trio
from quart import Blueprint, Response, jsonify

from protocol.errors import BlobNotFound, InvalidRequest, RelayError, StorageError
from protocol.requests import blob_key
from storage.blobstore import BlobReader, BlobStore, open_blob_store

from .httpbody import body_chunks, check_length
from .httplimits import on_exit

if TYPE_CHECKING:
    from .app import Relay
    from .httplimits import HttpLimits

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
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        cfg = relay.config
        self.store: BlobStore = open_blob_store(cfg.blob_url, cfg.data_dir)
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
        storage = self.relay.storage
        quota = self.relay.config.blob_quota_bytes
        await storage.put_blob(
            conversation, key, user, device, len(data), self._now_ms(), quota_bytes=quota
        )
        await self.store.put(store_path(conversation, key), data)
        self.written += 1
        return key

    async def register(self, conversation: bytes, user: str, device: str, size: int) -> str:
        """A new blob key, registered (membership and storage model checked)
        before any of its bytes is read: an HTTP upload streams in after.  The
        registration counts ``size`` against the user's blob quota at once."""
        key = new_key()
        quota = self.relay.config.blob_quota_bytes
        await self.relay.storage.put_blob(
            conversation, key, user, device, size, self._now_ms(), quota_bytes=quota
        )
        return key

    async def load(self, conversation: bytes, key: str) -> bytes:
        return await self.store.get(store_path(conversation, key))

    async def collect(self, now_ms: int | None = None) -> int:
        """Delete what no retained message needs; returns how many blobs went.
        One pass at a time (the collector's, retention's): two would both be
        handed the same rows, delete them twice and count them twice."""
        now = self._now_ms() if now_ms is None else now_ms
        cutoff = now - int(self.relay.config.blob_orphan_ttl_s * 1000)
        total = 0
        async with self._one_pass:
            while True:
                doomed = await self.relay.storage.collect_blobs(cutoff, COLLECT_BATCH)
                if not doomed:
                    return total
                await self.store.delete([store_path(conv, key) for conv, key in doomed])
                await self.relay.storage.forget_blobs(doomed)
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
        period = min(300.0, max(1.0, self.relay.config.blob_orphan_ttl_s / 4))
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
                self.relay.metrics.incidents.report("blobs", exc, "a collector pass")
            finally:
                self._busy = False
            self.passes += 1
            self._passed.set()
            self._passed = trio.Event()
            with trio.move_on_after(period):
                await self._woken.wait()

    async def aclose(self) -> None:
        await self.store.aclose()


def _conversation(text: str) -> bytes:
    try:
        conv = bytes.fromhex(text)
    except ValueError:
        raise InvalidRequest("the conversation id in the path is hex") from None
    if not conv:
        raise InvalidRequest("the conversation id in the path is hex")
    return conv


def blueprint(relay: Relay, blobs: Blobs, limits: HttpLimits) -> Blueprint:
    bp = Blueprint("blobs", __name__)
    timeout = relay.config.handshake_timeout_s

    @bp.post("/v1/conversations/<conversation>/blobs")
    async def upload(conversation: str) -> Any:
        # Everything that can refuse is asked before the first byte is read:
        # the token, the user's request and transfer slots, the size, and
        # membership with the storage model (the registration).
        who = limits.admit()
        conv = _conversation(conversation)
        size = check_length(relay.config.max_blob, required=True)
        if not size:
            raise InvalidRequest("a blob needs a non-empty body")
        limits.transfer(who)
        key = await blobs.register(conv, who.user, who.device, size)
        await blobs.store.put_stream(
            # At most the registered (quota-counted) size is read.
            store_path(conv, key),
            body_chunks(size, timeout),
            size,
        )
        blobs.written += 1
        return jsonify({"blob": key, "size": size}), 201

    @bp.get("/v1/conversations/<conversation>/blobs/<key>")
    async def download(conversation: str, key: str) -> Any:
        who = limits.admit()
        conv = _conversation(conversation)
        try:
            key = blob_key(key)
        except InvalidRequest:  # docs/PROTOCOL.md: 404 unless readable; never a shape hint
            raise BlobNotFound("no such blob") from None
        info = await relay.storage.blob_for_reader(conv, key, who.user)
        limits.transfer(who)
        reader = await blobs.store.open(store_path(conv, key))
        on_exit(reader.aclose)  # however the exchange ends
        if reader.size != info.size:  # never hand out a torn or foreign object
            log.error("blob size mismatch", extra={"expected": info.size, "got": reader.size})
            raise StorageError("blob is damaged in the store")
        headers = {
            "Cache-Control": "private, max-age=31536000, immutable",
            "Content-Length": str(info.size),
        }
        response = Response(
            _send(reader, info.size), content_type="application/octet-stream", headers=headers
        )
        # Time is bounded per chunk by the store's own timeouts and by TCP:
        # Quart's whole-response timeout would cut a large blob to a slow reader.
        response.timeout = None
        return response

    return bp


async def _send(reader: BlobReader, size: int) -> AsyncIterator[bytes]:
    """The blob's bytes in bounded chunks; stops short (the client sees a
    truncated body, as Content-Length promised more) if the store changes."""
    sent = 0
    try:
        async for chunk in reader.chunks():
            sent += len(chunk)
            if sent > size:
                log.error("blob grew in the store while being sent")
                return
            yield chunk
    finally:
        await reader.aclose()
