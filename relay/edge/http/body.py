"""HTTP request bodies, read with backpressure and refused at their limit.

Quart buffers a request body as fast as Hypercorn receives it, whether or not
the route reads it (20 concurrent 15 MB uploads once held 552 MB before the
size check ran).  So the relay never lets Quart see a body: :func:`wrap_receive`
stands between Hypercorn and Quart, hands Quart an empty, complete body, and
moves the real chunks into a small channel (:data:`CHANNEL_CHUNKS` chunks)
that only the route drains.  Until the route reads, nothing more is taken from
Hypercorn, whose own queue then fills and stops reading the socket: TCP
pushes back on the client.  A route that refuses a request before reading its
body (authorization, ``Content-Length`` over the limit, not a member) reads
none of it, and the response closes the connection (``Connection: close``)
instead of draining what the client still sends.

Routes read through :func:`read_body` (small bodies, whole) or
:func:`body_chunks` (blobs, streamed); both stop at the route's limit
(413 ``PayloadTooLarge``) and time out an idle or too slow client
(408 ``RequestTimeout``), and both answer JSON like every other error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import trio
from quart import request

from protocol.errors import InvalidRequest, LengthRequired, PayloadTooLarge, RequestTimeout

#: Where the body of a request waits for its route (key in the ASGI scope).
SCOPE_KEY = "mls_relay.body"
#: Chunks held between Hypercorn and the route (each at most 64 KiB as received).
CHANNEL_CHUNKS = 4
#: Slowest body tolerated once it has started: bytes per second, on average.
MIN_BODY_RATE = 64 * 1024


class RequestBody:
    """The body of one request, flowing from Hypercorn to the route on demand."""

    def __init__(self, receive: Any) -> None:
        self._receive = receive
        self._in, self._out = trio.open_memory_channel[bytes](CHANNEL_CHUNKS)
        self._started = False
        #: The client sent its whole body (and the route may not have read it).
        self.received = False
        #: The route read the body to its end.
        self.consumed = False

    async def app_receive(self) -> dict[str, Any]:
        """The ``receive`` Quart calls: first an empty body, then (pumping the
        real one into the channel meanwhile) whatever else Hypercorn says."""
        if not self._started:
            self._started = True
            return {"type": "http.request", "body": b"", "more_body": False}
        while True:
            message = await self._receive()
            if message["type"] != "http.request":
                self._in.close()  # http.disconnect: the reader sees the end
                return dict(message)
            chunk = message.get("body", b"")
            if chunk:
                await self._in.send(chunk)  # blocks while the route does not read
            if not message.get("more_body", False):
                self.received = True
                self._in.close()

    async def chunks(self, limit: int, idle_timeout: float) -> AsyncIterator[bytes]:
        """The body's chunks.  PayloadTooLarge past ``limit`` bytes;
        RequestTimeout when no chunk comes for ``idle_timeout`` seconds, or
        the whole body takes longer than ``idle_timeout`` plus its expected
        size (Content-Length, else ``limit``) at MIN_BODY_RATE."""
        size = 0
        expected = request.content_length or limit
        deadline = trio.current_time() + idle_timeout + expected / MIN_BODY_RATE
        while True:
            chunk = None
            with trio.move_on_at(min(deadline, trio.current_time() + idle_timeout)):
                try:
                    chunk = await self._out.receive()
                except trio.EndOfChannel:
                    break
            if chunk is None:
                raise RequestTimeout("the request body did not arrive in time")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the body is larger than {limit} bytes", limit=limit)
            yield chunk  # outside the cancel scope: this is an async generator
        if not self.received:
            raise InvalidRequest("the client closed the connection before its body ended")
        self.consumed = True


def wrap_receive(scope: Any, receive: Any) -> Any:
    """The ``receive`` to give Quart for ``scope`` (HTTP requests only)."""
    if scope.get("type") != "http":
        return receive
    body = RequestBody(receive)
    scope[SCOPE_KEY] = body
    return body.app_receive


def current_body() -> RequestBody:
    body = request.scope.get(SCOPE_KEY)
    assert isinstance(body, RequestBody), "request not served through wrap_receive"
    return body


def check_length(limit: int, *, required: bool = False) -> int | None:
    """The request's Content-Length, refused (413) before any byte is read
    when over ``limit``; ``required``: a body without one is refused (411)."""
    length = request.content_length
    if length is None and required:
        raise LengthRequired("this route needs a Content-Length")
    if length is not None and length > limit:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes", limit=limit)
    return length


async def body_chunks(limit: int, idle_timeout: float) -> AsyncIterator[bytes]:
    check_length(limit)
    async for chunk in current_body().chunks(limit, idle_timeout):
        yield chunk


async def read_body(limit: int, idle_timeout: float) -> bytes:
    """The whole body (at most ``limit`` bytes; a small body: KeyPackages, JSON)."""
    check_length(limit)
    parts = bytearray()
    async for chunk in current_body().chunks(limit, idle_timeout):
        parts += chunk
    return bytes(parts)
