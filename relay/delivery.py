"""Delivery state: which devices got which messages, kept off the hot path.

Delivering a message touches no table.  A session's streams already know,
per conversation, the next seq they will hand to the connection; once per
``RELAY_DELIVERY_FLUSH_S`` this tracker walks the node's sessions, collects
the positions that moved since the last round, and writes them in one
batch (``record_deliveries``), together with the devices that connected
(``touch_devices``: the recipients a sender's delivery state counts).

"Delivered" means handed to the device's connection; "acknowledged" comes
from the device's own ``#ack`` (its cursor).  A position the database did
not take (an outage) is retried next round: it only ever grows.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from protocol.errors import RelayError

if TYPE_CHECKING:
    from .app import Relay

log = logging.getLogger("relay.delivery")

#: Most devices remembered as connected-but-not-yet-recorded between rounds.
MAX_SEEN = 100_000

Key = tuple[str, str, bytes]


class DeliveryTracker:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._seen: set[tuple[str, str]] = set()
        #: Positions written so far, for the sessions alive at the last round.
        self._recorded: dict[Key, int] = {}
        self.rounds = 0
        self.rows_written = 0

    def connected(self, user: str, device: str) -> None:
        """A device connected (synchronous; recorded at the next round)."""
        if len(self._seen) < MAX_SEEN:
            self._seen.add((user, device))

    def _moved(self) -> tuple[list[tuple[str, str, bytes, int]], dict[Key, int]]:
        from .session import Session

        current: dict[Key, int] = {}
        moved: list[tuple[str, str, bytes, int]] = []
        recorded = self._recorded
        for session in self.relay.sessions.values():
            if not isinstance(session, Session):
                continue
            user, device = session.user, session.device
            for conversation, stream in session.streams.by_conversation.items():
                position = stream.next_seq - 1
                key = (user, device, conversation)
                current[key] = position
                if position > recorded.get(key, 0):
                    moved.append((user, device, conversation, position))
        return moved, current

    async def flush(self) -> None:
        """One round: write what moved; raises RelayError if storage refused."""
        seen, self._seen = self._seen, set()
        moved, current = self._moved()
        now_ms = int(time.time() * 1000)
        try:
            await self.relay.storage.touch_devices(sorted(seen), now_ms)
            await self.relay.storage.record_deliveries(moved, now_ms)
        except BaseException:
            self._seen |= seen  # next round tries again; positions are recomputed anyway
            raise
        self._recorded = current
        self.rounds += 1
        self.rows_written += len(moved)

    async def run(self) -> None:
        period = self.relay.config.delivery_flush_s
        while True:
            await trio.sleep(period)
            try:
                await self.flush()
            except RelayError:
                log.warning("could not record delivery positions", exc_info=True)
