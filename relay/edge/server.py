"""Accept connections and route them: WebSocket hot path or HTTP app.

Every TCP connection starts with an HTTP request head.  We read it ourselves
(bounded in size and time).  A WebSocket upgrade on the relay path is
authenticated here, before the upgrade completes, and then served by a
:class:`~relay.edge.session.Session` reading frames itself (protocol/wsframes.py).
Anything else is replayed into Hypercorn, which serves the Quart app.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from protocol.closecodes import CloseCode, CloseReason
from protocol.errors import AuthError, ProtocolError, RelayError, ShuttingDown
from protocol.websocket import (
    RequestHead,
    accept_response,
    json_response,
    parse_head,
    refusal_headers,
)
from relay.edge.auth import token_from_request
from relay.edge.gate import (
    ConnectionGate,
    accept_loop,
    close_listeners,
    peer_address,
    raise_nofile_limit,
)
from relay.edge.session import Session

if TYPE_CHECKING:
    from relay.base.incidents import Incidents
    from relay.edge.auth import Identity
    from relay.edge.http.frontend import HttpFrontend
    from relay.edge.parts import EdgeParts

log = logging.getLogger("relay.server")


async def serve_listeners(
    parts: EdgeParts,
    http: HttpFrontend,
    listeners: list[trio.SocketListener],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    cfg = parts.config
    # Caps on open sockets per source address and per node (relay/edge/gate.py);
    # the soft descriptor limit is raised to the hard one first.
    gate = ConnectionGate(
        cfg.connections_per_address,
        cfg.max_connections,
        cfg.trusted_proxies,
        nofile=raise_nofile_limit(),
        connect_rate=cfg.connect_rate_per_address,
        connect_burst=cfg.connect_burst_per_address,
    )
    gate.register_metrics(parts.metrics.registry)

    async def handler(stream: trio.SocketStream) -> None:
        address = peer_address(stream)
        refusal = gate.admit(address)
        if refusal is not None:
            parts.metrics.error(refusal.error)
            await gate.refuse(stream, refusal)
            return
        forwarded: list[str] = []
        # One connection's bug must never take the node (and everyone on it) down.
        try:
            await handle_connection(parts, http, stream, gate, address, forwarded)
        except Exception:
            log.exception("connection failed")
        finally:
            gate.release(address, forwarded[0] if forwarded else None)
            await trio.aclose_forcefully(stream)

    # Connections live in their own nursery so that shutdown can stop
    # accepting (cancel the accept loops) while open sessions keep running
    # until they are drained and closed.
    # Shutdown closes the port, then waits (bounded) until every connection
    # is done: the last ones accepted get their 503 before the node goes.
    all_done = trio.Event()

    async def stop_accepting() -> None:
        accepting.cancel()
        await all_done.wait()

    try:
        async with trio.open_nursery() as connections:
            with trio.CancelScope() as accepting:
                parts.listening(stop_accepting)
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        acceptors.start_soon(accept_loop, listener, gate, handler, connections)
                    task_status.started()
            await close_listeners(listeners, handler, connections)
    finally:
        all_done.set()


async def handle_connection(
    parts: EdgeParts,
    http: HttpFrontend,
    stream: trio.SocketStream,
    gate: ConnectionGate | None = None,
    address: str = "",
    forwarded: list[str] | None = None,
) -> None:
    buffer = b""
    try:
        with trio.move_on_after(parts.config.handshake_timeout_s):
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
        await _refuse(stream, exc)
        return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    if gate is not None and gate.trusts(address):
        # Behind a trusted reverse proxy: count the client it names (relay/edge/gate.py).
        client = gate.forwarded(head)
        if client is not None:
            refusal = gate.admit_forwarded(client)
            if refusal is not None:
                parts.metrics.error(refusal.error)
                await _refuse(stream, refusal)
                return
            if forwarded is not None:
                forwarded.append(client)
    if head.path == parts.config.ws_path:
        await _websocket(parts, stream, head)
    else:
        await http.serve_connection(stream, buffer)


async def _websocket(parts: EdgeParts, stream: trio.SocketStream, head: RequestHead) -> None:
    if not head.is_websocket:
        await _refuse(stream, ProtocolError("this path only accepts WebSocket upgrades"))
        return
    if parts.shutting_down():
        await _refuse(stream, ShuttingDown("relay is shutting down"))
        return
    incidents = parts.metrics.incidents
    # Every refusal below is an HTTP JSON answer, whatever failed, and leaves
    # nothing registered: the token's claims are checked (relay/edge/auth.py) before
    # the lease is taken, and the lease is given back on every way out.
    try:
        identity = parts.authenticator.verify(
            token_from_request(head.headers, head.query, from_query=True)
        )
        response = accept_response(head)
    except AuthError as exc:
        parts.metrics.error(exc.error)
        await _refuse(stream, exc)
        return
    except ProtocolError as exc:
        await _refuse(stream, exc)
        return
    except Exception as exc:
        await _refuse(stream, incidents.report("handshake", exc, "verifying the token"))
        return
    # A lease across all nodes (relay/cluster/presence.py); this node's count alone
    # when there is no Redis or it is unreachable.
    try:
        lease = await parts.presence.admit(identity.user, identity.device)
    except Exception as exc:  # TooManyConnections (429); anything else is answered too
        refusal = _refusal(incidents, exc)
        parts.metrics.error(refusal.error)
        await _refuse(stream, refusal)
        return
    try:
        session = await _start_session(parts, stream, identity)
        if session is None:
            return
        try:
            await stream.send_all(response)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            parts.registry.forget(session)
            return
        await session.run(head.rest)
    finally:
        parts.presence.release(lease)


async def _start_session(
    parts: EdgeParts, stream: trio.SocketStream, identity: Identity
) -> Session | None:
    """Spend the jti and register the session; None (answered) when refused."""
    session: Session | None = None
    try:
        # single-use tokens: spend the jti in the shared database (relay/offline/retention.py)
        await parts.tokens.consume(identity)
        session = Session(parts, identity, stream)
        previous = parts.registry.register(session)
    except Exception as exc:  # TokenReplayed (401), Unavailable (503), or a bug (500)
        if session is not None and parts.registry.is_registered(session):
            parts.registry.forget(session)
        refusal = _refusal(parts.metrics.incidents, exc)
        await _refuse(stream, refusal)
        return None
    if previous is not None:
        previous.close(CloseCode.REPLACED, CloseReason.REPLACED)
    return session


def _refusal(incidents: Incidents, exc: Exception) -> RelayError:
    """The error a refused handshake answers with: a RelayError as it is (an
    InternalError with an incident id), anything else as a logged incident."""
    if isinstance(exc, RelayError):
        return incidents.reply(exc, "handshake")
    return incidents.report("handshake", exc, "admitting a connection")


async def _refuse(stream: trio.SocketStream, exc: RelayError) -> None:
    """Answer the handshake with ``exc`` as JSON, at its own HTTP status, and close."""
    status = exc.http_status
    body: dict[str, object] = {"error": exc.error, "message": exc.message}
    # Details that say which claim failed, or the incident id of an InternalError.
    body.update({k: v for k, v in exc.details.items() if isinstance(v, str | int)})
    try:
        with trio.move_on_after(5):
            await stream.send_all(json_response(status, body, refusal_headers(status, exc)))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    await stream.aclose()
