"""A real HTTP push-provider webhook on a loopback port, for tests/test_push.py.

h11 over Trio sockets, running in the test's nursery.  It records every
request (headers, raw body, arrival time) and answers as told: a scripted
reply for the next N requests, then the default (200 unless changed).  A
reply can be delayed or hang forever; the server can be stopped (the port is
closed, every connection reset) and started again on the same port.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import h11
import trio


@dataclass(frozen=True)
class Received:
    at: float  # trio.current_time() when the whole request had arrived
    method: str
    path: str
    headers: dict[str, str]  # lowercase names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0  # seconds before answering
    hang: bool = False  # never answer (until the client closes or the server stops)


@dataclass
class PushReceiver:
    nursery: trio.Nursery
    port: int = 0
    default: Reply = field(default_factory=Reply)
    requests: list[Received] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    open_connections: int = 0
    _script: deque[Reply] = field(default_factory=deque)
    _scope: trio.CancelScope | None = None
    _stopped: trio.Event = field(default_factory=trio.Event)
    _arrived: trio.Event = field(default_factory=trio.Event)

    def url(self, path: str = "/push") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def answer_next(self, n: int, status: int, headers: tuple[tuple[str, str], ...] = ()) -> None:
        """The next ``n`` requests get ``status`` (then the default again)."""
        self._script.extend([Reply(status, headers)] * n)

    async def wait_requests(self, n: int) -> list[Received]:
        """Until at least ``n`` requests arrived (bound it with trio.fail_after)."""
        while len(self.requests) < n:
            self._arrived = trio.Event()
            await self._arrived.wait()
        return self.requests

    # --- lifetime ------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (again) on ``port`` (0 the first time: the kernel picks one)."""
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        self._stopped = trio.Event()
        self._scope = await self.nursery.start(self._serve, listeners)

    async def stop(self) -> None:
        """Close the port and reset every connection; returns once they are closed."""
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None
            await self._stopped.wait()

    async def _serve(
        self,
        listeners: list[trio.SocketListener],
        task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                await trio.serve_listeners(self._handle, listeners)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            self._stopped.set()

    # --- HTTP -----------------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.open_connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while (request := await self._read(conn, stream)) is not None:
                await self._answer(conn, stream, request)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            self.open_connections -= 1
            await trio.aclose_forcefully(stream)

    @staticmethod
    async def _next(conn: h11.Connection, stream: trio.SocketStream) -> Any:
        while (event := conn.next_event()) is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        return event

    async def _read(self, conn: h11.Connection, stream: trio.SocketStream) -> Received | None:
        head = await self._next(conn, stream)
        if not isinstance(head, h11.Request):
            return None  # the client closed its keep-alive connection
        body = b""
        while isinstance(event := await self._next(conn, stream), h11.Data):
            body += event.data
        return Received(
            at=trio.current_time(),
            method=head.method.decode(),
            path=head.target.decode(),
            headers={k.decode().lower(): v.decode() for k, v in head.headers},
            body=body,
        )

    async def _answer(self, conn: h11.Connection, stream: trio.SocketStream, req: Received) -> None:
        self.requests.append(req)
        self._arrived.set()
        reply = self._script.popleft() if self._script else self.default
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if reply.hang:
                # Until the client gives up and closes (or the server stops).
                while await stream.receive_some(65536):
                    pass
                return
            await trio.sleep(reply.delay)
            body = b'{"ok":true}' if reply.status < 300 else b'{"error":"test"}'
            headers = [
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
                *reply.headers,
            ]
            response = h11.Response(status_code=reply.status, headers=headers)
            for event in (response, h11.Data(data=body), h11.EndOfMessage()):
                await stream.send_all(conn.send(event) or b"")
        finally:
            self.in_flight -= 1


@asynccontextmanager
async def push_receiver() -> AsyncIterator[PushReceiver]:
    async with trio.open_nursery() as nursery:
        receiver = PushReceiver(nursery)
        await receiver.start()
        yield receiver
        nursery.cancel_scope.cancel()
