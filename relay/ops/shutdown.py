"""Graceful shutdown: stop taking work, finish what was accepted, close cleanly,
and let load balancers see it happen."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from protocol.closecodes import CloseCode, CloseReason
from relay.edge.gate import close_listeners as close_listeners  # moved there; re-exported

if TYPE_CHECKING:
    from relay.node import Relay

#: After the last SSE stream ended, time for the HTTP server to write the
#: chunked body's terminator before the port closes (a grace of 0 would
#: otherwise cut it: curl exit 18, ERR_INCOMPLETE_CHUNKED_ENCODING).
SSE_FLUSH_S = 0.2
#: When the grace ends, connections already accepted get this long to be
#: answered (their 503s) before the node goes away; the caller cancels the
#: rest.  Without it a probe accepted just before the end saw a reset.
LAST_ANSWERS_S = 1.0


async def graceful_shutdown(relay: Relay, hurry: trio.Event | None = None) -> None:
    """Drain the node within ``RELAY_SHUTDOWN_DEADLINE_S``.

    1. Readiness turns 503; new WebSocket upgrades and SSE streams are refused
       with 503 ShuttingDown -- on a port that keeps accepting, so that load
       balancers and clients *see* the drain instead of refused connections.
    2. Every SSE stream gets what is pending, then a last ``info`` event
       (``ServiceRestart``), and its chunked body ends properly.
    3. The committer stops taking sends (later ones get a retryable
       ShuttingDown error and are never stored); those already queued are
       committed and acknowledged.
    4. Every WebSocket is closed with 1012 (service restart) so clients resume
       on another node -- also when step 3 ran out of time, so that the caller's
       cancellation still closes them with 1012, not 1000.
    5. The port keeps answering until ``RELAY_DRAIN_GRACE_S`` after the start
       (Kubernetes removes a terminating pod from its endpoints asynchronously:
       requests keep arriving for a few seconds), or until ``hurry`` is set (a
       second SIGTERM); then the listeners close, once the connections
       already accepted or queued in their backlog are answered (a probe
       sees a 503 or a refused connect, never a reset).

    Returns by the deadline even if a client never reads (its close frame
    cannot be written); the caller then cancels what is left, and each
    session's own bounded close finishes the job."""
    relay.state.shutting_down = True
    start = trio.current_time()
    deadline = start + relay.config.shutdown_deadline_s
    grace_end = start + min(relay.config.drain_grace_s, relay.config.shutdown_deadline_s)
    streams = list(relay.registry.event_streams)
    for stream in streams:
        stream.close(CloseCode.SERVICE_RESTART, CloseReason.SERVICE_RESTART)
    with trio.move_on_at(deadline):
        relay.committer.close()
        await relay.committer.drained.wait()
    for session in list(relay.registry.sessions.values()):
        session.close(CloseCode.SERVICE_RESTART, CloseReason.SERVICE_RESTART)
    with trio.move_on_at(deadline):
        await relay.registry.all_closed()
        await relay.registry.streams_ended(streams)
        if streams:
            await trio.sleep(SSE_FLUSH_S)
    with trio.move_on_at(min(grace_end, deadline)):
        await (hurry if hurry is not None else trio.Event()).wait()
    with trio.move_on_at(min(deadline, trio.current_time() + LAST_ANSWERS_S)):
        await relay.stop_accepting()
