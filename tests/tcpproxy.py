"""A TCP proxy the test controls, to cut a dependency without touching the
shared servers other tests use.

Two kinds of failure:

* ``cut()``: the loud one.  Open connections are reset, new ones refused.
* ``blackhole()``: a silent partition.  Nothing is closed and nothing gets
  through: bytes either side writes are held in the proxy (as packets a
  sender's kernel would keep retransmitting), new connections are accepted
  and held the same way.  ``heal()`` delivers what was held, in order, on
  the connections whose both ends are still there -- the retransmissions
  that get through once the network is back.  A connection one end gave up
  on meanwhile (closed or reset it) loses what was held and is reset on the
  other end when the network heals, as its peer would only learn then.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

#: Most bytes held per direction of one connection during a blackhole (a test
#: helper must be bounded too; nothing the tests send comes near it).
MAX_HELD = 16 * 1024 * 1024


@dataclass(eq=False)
class _Link:
    """One proxied connection."""

    client: trio.SocketStream
    upstream: trio.SocketStream | None = None
    #: Bytes held during a blackhole, per direction (keyed by the source).
    held: dict[str, list[bytes]] = field(default_factory=lambda: {"client": [], "upstream": []})
    #: An end closed during a blackhole: at heal, drop what was held and reset.
    broken: bool = False
    gone: trio.Event = field(default_factory=trio.Event)


class Proxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._up = True
        self._silent = False
        self._links: set[_Link] = set()
        #: Bytes that went through (either direction) and bytes dropped at heal.
        self.forwarded = 0
        self.dropped = 0

    # --- controls -------------------------------------------------------------------

    async def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        self._up = False
        for link in list(self._links):
            await self._reset(link)

    def restore(self) -> None:
        self._up = True

    def blackhole(self) -> None:
        """From now on hold every byte, close nothing (see the module doc)."""
        self._silent = True

    async def heal(self) -> None:
        """Deliver what was held where both ends are still there, reset the
        rest, and forward normally again."""
        while True:
            pending = [link for link in self._links if link.broken or any(link.held.values())]
            if not pending:
                break
            for link in pending:
                if link.broken:
                    self.dropped += sum(len(c) for chunks in link.held.values() for c in chunks)
                    await self._reset(link)
                    continue
                for source, chunks in link.held.items():
                    data, chunks[:] = b"".join(chunks), []
                    dst = link.upstream if source == "client" else link.client
                    if data and dst is not None:
                        await self._send(link, dst, data)
        # No await since the loop found nothing held: nothing can be overtaken.
        self._silent = False

    # --- plumbing -----------------------------------------------------------------

    async def _reset(self, link: _Link) -> None:
        self._links.discard(link)
        link.gone.set()
        for s in (link.client, link.upstream):
            if s is not None:
                await trio.aclose_forcefully(s)

    async def _send(self, link: _Link, dst: trio.SocketStream, data: bytes) -> None:
        try:
            await dst.send_all(data)
            self.forwarded += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self._reset(link)

    async def _pipe(self, link: _Link, source: str) -> None:
        src = link.client if source == "client" else link.upstream
        dst = link.upstream if source == "client" else link.client
        assert src is not None and dst is not None
        try:
            while data := await src.receive_some(65536):
                if self._silent:
                    held = link.held[source]
                    if sum(map(len, held)) + len(data) > MAX_HELD:
                        raise AssertionError("tcpproxy: more held than MAX_HELD")
                    held.append(data)
                    continue
                await dst.send_all(data)
                self.forwarded += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if self._silent and not link.gone.is_set():
            link.broken = True  # the peer learns at heal(); keep the other end open
            await trio.sleep_forever()
        await self._reset(link)

    async def _handle(self, client: trio.SocketStream) -> None:
        if not self._up:
            await trio.aclose_forcefully(client)
            return
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await trio.aclose_forcefully(client)
            return
        link = _Link(client, upstream)
        self._links.add(link)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, link, "client")
                nursery.start_soon(self._pipe, link, "upstream")
                await link.gone.wait()
                nursery.cancel_scope.cancel()
        finally:
            await self._reset(link)


@asynccontextmanager
async def tcp_proxy(target_port: int) -> AsyncIterator[Proxy]:
    proxy = Proxy(target_port)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    proxy.port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, proxy._handle, listeners)
        yield proxy
        nursery.cancel_scope.cancel()
