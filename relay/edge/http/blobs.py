"""HTTP routes of blobs (the service is :mod:`relay.offline.blobs`).

* ``POST /v1/conversations/<hex id>/blobs`` -- body: the ciphertext; returns
  ``{blob, size}``.  Members only; the conversation must use the blob model.
* ``GET /v1/conversations/<hex id>/blobs/<key>`` -- the bytes.

Both stream in bounded chunks, and each holds a transfer slot
(:mod:`relay.edge.http.limits`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from quart import Blueprint, Response, jsonify

from protocol.errors import BlobNotFound, InvalidRequest, StorageError
from protocol.requests import blob_key
from relay.edge.http.body import body_chunks, check_length
from relay.edge.http.limits import on_exit
from relay.offline.blobs import Blobs, store_path
from storage.blobstore import BlobReader

if TYPE_CHECKING:
    from relay.edge.http.limits import HttpLimits
    from storage.base import Storage

log = logging.getLogger("relay.blobs")


def _conversation(text: str) -> bytes:
    try:
        conv = bytes.fromhex(text)
    except ValueError:
        raise InvalidRequest("the conversation id in the path is hex") from None
    if not conv:
        raise InvalidRequest("the conversation id in the path is hex")
    return conv


def blueprint(
    blobs: Blobs, storage: Storage, limits: HttpLimits, *, max_blob: int, idle_timeout: float
) -> Blueprint:
    """``max_blob``: RELAY_MAX_BLOB; ``idle_timeout``: longest wait for a body's bytes."""
    bp = Blueprint("blobs", __name__)
    timeout = idle_timeout

    @bp.post("/v1/conversations/<conversation>/blobs")
    async def upload(conversation: str) -> Any:
        # Everything that can refuse is asked before the first byte is read:
        # the token, the user's request and transfer slots, the size, and
        # membership with the storage model (the registration).
        who = limits.admit()
        conv = _conversation(conversation)
        size = check_length(max_blob, required=True)
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
        info = await storage.blob_for_reader(conv, key, who.user)
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
