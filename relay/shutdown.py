"""Graceful shutdown: stop taking work, finish what was accepted, close cleanly."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from protocol.websocket import CLOSE_RESTART

if TYPE_CHECKING:
    from .app import Relay


async def graceful_shutdown(relay: Relay) -> None:
    """Readiness goes 503, listeners close, in-flight sends commit, then every
    WebSocket is closed with 1012 (service restart) so clients reconnect
    elsewhere, all within the configured deadline."""
    from .session import Session

    relay.state.shutting_down = True
    with trio.move_on_after(relay.config.shutdown_deadline_s):
        relay.stop_accepting()
        # Let sends already queued reach the database and be acknowledged.
        relay.committer.close()
        await relay.committer.drained.wait()
        for session in list(relay.sessions.values()):
            if isinstance(session, Session):
                session.close(CLOSE_RESTART, "ServiceRestart")
        await relay.all_sessions_closed()
