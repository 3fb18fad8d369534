"""Graceful shutdown: stop taking work, finish what was accepted, close cleanly."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from protocol.websocket import CLOSE_RESTART

if TYPE_CHECKING:
    from .app import Relay


async def graceful_shutdown(relay: Relay) -> None:
    """Drain the node within ``RELAY_SHUTDOWN_DEADLINE_S``.

    1. Readiness turns 503; new WebSocket upgrades and SSE streams are refused
       with 503 ShuttingDown; the listeners close.
    2. The committer stops taking sends (later ones get a retryable
       ShuttingDown error and are never stored); those already queued are
       committed and acknowledged.
    3. Every WebSocket is closed with 1012 (service restart) so clients resume
       on another node -- also when step 2 ran out of time, so that the caller's
       cancellation still closes them with 1012, not 1000.

    Returns by the deadline even if a client never reads (its close frame
    cannot be written); the caller then cancels what is left, and each
    session's own bounded close finishes the job."""
    from .session import Session

    relay.state.shutting_down = True
    relay.stop_accepting()
    deadline = trio.current_time() + relay.config.shutdown_deadline_s
    with trio.move_on_at(deadline):
        relay.committer.close()
        await relay.committer.drained.wait()
    for session in list(relay.sessions.values()):
        if isinstance(session, Session):
            session.close(CLOSE_RESTART, "ServiceRestart")
    with trio.move_on_at(deadline):
        await relay.all_sessions_closed()
