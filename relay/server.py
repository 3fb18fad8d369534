"""Accept connections and route them: WebSocket hot path or HTTP app.

Every TCP connection starts with an HTTP request head.  We read it ourselves
(bounded in size and time).  A WebSocket upgrade on the relay path is
authenticated here, before the upgrade completes, and then served by a
:class:`~relay.session.Session` reading frames itself (protocol/wsframes.py).
Anything else is replayed into Hypercorn, which serves the Quart app.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING

import trio

from protocol.errors import AuthError, ProtocolError, RelayError, TooManyConnections
from protocol.websocket import (
    CLOSE_REPLACED,
    RequestHead,
    accept_response,
    json_response,
    parse_head,
    refusal_headers,
)

from .auth import token_from_request
from .retention import consume_jti
from .session import Session

if TYPE_CHECKING:
    from .app import Relay
    from .http import HttpFrontend

log = logging.getLogger("relay.server")


async def serve_listeners(
    relay: Relay,
    http: HttpFrontend,
    listeners: list[trio.SocketListener],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        # One connection's bug must never take the node (and everyone on it) down.
        try:
            await handle_connection(relay, http, stream)
        except Exception:
            log.exception("connection failed")
            await trio.aclose_forcefully(stream)

    # Connections live in their own nursery so that shutdown can stop
    # accepting (cancel the accept loops) while open sessions keep running
    # until they are drained and closed.
    async with trio.open_nursery() as connections:
        with trio.CancelScope() as accepting:
            relay.stop_accepting = accepting.cancel
            async with trio.open_nursery() as acceptors:
                acceptors.start_soon(
                    partial(trio.serve_listeners, handler, listeners, handler_nursery=connections)
                )
                task_status.started()
        for listener in listeners:
            await listener.aclose()


async def handle_connection(relay: Relay, http: HttpFrontend, stream: trio.SocketStream) -> None:
    buffer = b""
    try:
        with trio.move_on_after(relay.config.handshake_timeout_s):
            head = None
            while head is None:
                data = await stream.receive_some(16384)
                if not data:
                    await stream.aclose()
                    return
                buffer += data
                head = parse_head(buffer)
        if head is None:
            await stream.aclose()
            return
    except ProtocolError as exc:
        await _refuse(stream, 400, exc)
        return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    if head.path == relay.config.ws_path:
        await _websocket(relay, stream, head)
    else:
        await http.serve_connection(stream, buffer)


async def _websocket(relay: Relay, stream: trio.SocketStream, head: RequestHead) -> None:
    if not head.is_websocket:
        await _refuse(stream, 400, ProtocolError("this path only accepts WebSocket upgrades"))
        return
    if relay.state.shutting_down:
        await _refuse(stream, 503, RelayError("relay is shutting down"), error="ShuttingDown")
        return
    try:
        identity = relay.authenticator.verify(
            token_from_request(head.headers, head.query, from_query=True)
        )
        response = accept_response(head)
    except AuthError as exc:
        relay.metrics.error(exc.error)
        await _refuse(stream, 401, exc)
        return
    except ProtocolError as exc:
        await _refuse(stream, 400, exc)
        return
    # A lease across all nodes (relay/presence.py); this node's count alone
    # when there is no Redis or it is unreachable.
    try:
        lease = await relay.presence.admit(identity.user, identity.device)
    except TooManyConnections as exc:
        relay.metrics.error(exc.error)
        await _refuse(stream, exc.http_status, exc)
        return
    try:
        try:  # single-use tokens: spend the jti in the shared database (relay/retention.py)
            await consume_jti(relay, identity)
        except RelayError as exc:  # TokenReplayed (401), Unavailable (503)
            await _refuse(stream, exc.http_status, exc)
            return
        session = Session(relay, identity, stream)
        previous = relay.register(session, identity.user, identity.device)
        if isinstance(previous, Session):
            previous.close(CLOSE_REPLACED, "ReplacedByNewConnection")
        try:
            await stream.send_all(response)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            relay.forget(session)
            return
        await session.run(head.rest)
    finally:
        relay.presence.release(lease)


async def _refuse(
    stream: trio.SocketStream, status: int, exc: RelayError, error: str | None = None
) -> None:
    body: dict[str, object] = {"error": error or exc.error, "message": exc.message}
    try:
        with trio.move_on_after(5):
            await stream.send_all(json_response(status, body, refusal_headers(status, exc)))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    await stream.aclose()
