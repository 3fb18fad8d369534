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
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import trio
from quart import Blueprint, Response, jsonify, request

from protocol.errors import (
    BlobNotFound,
    InvalidRequest,
    PayloadTooLarge,
    RelayError,
    StorageError,
)
from protocol.requests import blob_key
from storage.blobstore import BlobStore, open_blob_store

from .keypackages import request_identity

if TYPE_CHECKING:
    from .app import Relay

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

    def _now_ms(self) -> int:
        return int(time.time() * 1000)

    async def save(self, conversation: bytes, user: str, device: str, data: bytes) -> str:
        """Store ``data`` as a new blob of the conversation; returns its key.
        Membership and the storage model are checked by the registration."""
        key = new_key()
        storage = self.relay.storage
        await storage.put_blob(conversation, key, user, device, len(data), self._now_ms())
        await self.store.put(store_path(conversation, key), data)
        self.written += 1
        return key

    async def load(self, conversation: bytes, key: str) -> bytes:
        return await self.store.get(store_path(conversation, key))

    async def collect(self, now_ms: int | None = None) -> int:
        """Delete what no retained message needs; returns how many blobs went."""
        now = self._now_ms() if now_ms is None else now_ms
        cutoff = now - int(self.relay.config.blob_orphan_ttl_s * 1000)
        total = 0
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

    async def run(self) -> None:
        """The collector: every few minutes (and after each conversation deletion)."""
        period = min(300.0, max(1.0, self.relay.config.blob_orphan_ttl_s / 4))
        while True:
            try:
                gone = await self.collect()
                if gone:
                    log.info("blobs collected", extra={"blobs": gone})
            except RelayError:  # database or store down: try again next round
                log.warning("blob collection failed", exc_info=True)
            await trio.sleep(period)

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


async def _body(limit: int) -> bytes:
    """The request body, refused as soon as it grows past ``limit``."""
    if (request.content_length or 0) > limit:
        raise PayloadTooLarge(f"blobs are at most {limit} bytes")
    parts: list[bytes] = []
    size = 0
    async for chunk in request.body:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"blobs are at most {limit} bytes")
        parts.append(chunk)
    if not size:
        raise InvalidRequest("a blob needs a non-empty body")
    return b"".join(parts)


def blueprint(relay: Relay, blobs: Blobs) -> Blueprint:
    bp = Blueprint("blobs", __name__)

    @bp.post("/v1/conversations/<conversation>/blobs")
    async def upload(conversation: str) -> Any:
        who = request_identity(relay)
        conv = _conversation(conversation)
        data = await _body(relay.config.max_blob)
        key = await blobs.save(conv, who.user, who.device, data)
        return jsonify({"blob": key, "size": len(data)}), 201

    @bp.get("/v1/conversations/<conversation>/blobs/<key>")
    async def download(conversation: str, key: str) -> Any:
        who = request_identity(relay)
        conv = _conversation(conversation)
        try:
            key = blob_key(key)
        except InvalidRequest:  # docs/PROTOCOL.md: 404 unless readable; never a shape hint
            raise BlobNotFound("no such blob") from None
        info = await relay.storage.blob_for_reader(conv, key, who.user)
        data = await blobs.load(conv, key)
        headers = {"Cache-Control": "private, max-age=31536000, immutable"}
        if len(data) != info.size:  # never hand out a torn or foreign object
            log.error("blob size mismatch", extra={"expected": info.size, "got": len(data)})
            raise StorageError("blob is damaged in the store")
        return Response(data, content_type="application/octet-stream", headers=headers)

    return bp
