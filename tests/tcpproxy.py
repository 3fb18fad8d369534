"""A TCP proxy the test controls, to cut a dependency without touching the
shared servers other tests use."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class Proxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._up = True
        self._conns: set[trio.SocketStream] = set()
        self._nursery: trio.Nursery | None = None
        self._accepting: trio.CancelScope | None = None

    async def _pipe(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            for s in (src, dst):
                await trio.aclose_forcefully(s)

    async def _handle(self, client: trio.SocketStream) -> None:
        if not self._up:
            await trio.aclose_forcefully(client)
            return
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await trio.aclose_forcefully(client)
            return
        self._conns.update((client, upstream))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, client, upstream)
                nursery.start_soon(self._pipe, upstream, client)
        finally:
            self._conns.difference_update((client, upstream))

    async def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        self._up = False
        for conn in list(self._conns):
            await trio.aclose_forcefully(conn)

    def restore(self) -> None:
        self._up = True


@asynccontextmanager
async def tcp_proxy(target_port: int) -> AsyncIterator[Proxy]:
    proxy = Proxy(target_port)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    proxy.port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, proxy._handle, listeners)
        yield proxy
        nursery.cancel_scope.cancel()
