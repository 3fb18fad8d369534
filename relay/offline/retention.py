"""Retention and single-use tokens: the relay's housekeeping in the shared database.

**Retention job.**  With ``RELAY_RETENTION_DAYS`` > 0, every
``RELAY_RETENTION_INTERVAL_S`` (and once at start) the node prunes messages
older than the retention period and GroupInfo of older epochs, through
:meth:`storage.base.Storage.prune_messages` / ``prune_group_infos``.  What a
group still needs is never pruned: the commit that produced each MLS
conversation's current epoch, the epoch before it and everything after, the
messages after a Welcome still in an inbox, the newest GroupInfo, and the
unconsumed Welcomes themselves (the rule is in :mod:`storage.retention_sql`).
A cursor before what is left gets ``#info OutdatedCursor`` on ``#subscribe``.

Every node may run the job: pruning is idempotent, and on PostgreSQL it locks
conversation rows in the same id order as appends, so nodes never deadlock.

**Single-use tokens.**  With ``RELAY_TOKEN_SINGLE_USE`` (the default), each
WebSocket upgrade and each ``/v1/events`` stream consumes its token's ``jti``
in the shared database before anything is served: a replayed token gets
401 ``TokenReplayed``, whichever node saw it first.  The used ids are kept
until the token could no longer be accepted (``exp`` + the verifier's
leeway), then the job purges them; it therefore also runs when retention is
off.  HTTP key-package routes do not consume the ``jti`` (docs/PROTOCOL.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio

from protocol.errors import RelayError, TokenReplayed

if TYPE_CHECKING:
    from relay.base.incidents import Incidents
    from relay.offline.blobs import Blobs
    from storage.base import Storage

log = logging.getLogger("relay.retention")

DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class RetentionRun:
    """What one run removed."""

    #: Messages created before this time were candidates (None: retention off).
    cutoff_ms: int | None
    messages: int
    group_infos: int
    token_uses: int
    seconds: float
    #: Blobs deleted from the store (their messages pruned, or orphaned).
    blobs: int = 0


class Retention:
    """One per relay; :meth:`run` lives in the relay's nursery."""

    def __init__(
        self,
        storage: Storage,
        blobs: Blobs,
        incidents: Incidents,
        *,
        days: float,
        interval_s: float,
        token_single_use: bool,
    ) -> None:
        self._storage = storage
        self._blobs = blobs
        self._incidents = incidents
        self._days = days
        self._interval_s = interval_s
        self._token_single_use = token_single_use
        #: Seconds since the epoch; tests move it forward instead of waiting days.
        self.clock: Callable[[], float] = time.time
        self.runs = 0
        self.last: RetentionRun | None = None
        self._ran = trio.Event()

    @property
    def enabled(self) -> bool:
        return self._days > 0 or self._token_single_use

    async def run(self) -> None:
        """Run now, then every interval, until cancelled.  A failed run (database
        unreachable) is logged and retried at the next interval; one that fails
        with anything else (a bug) is an incident, and retried the same way: it
        runs in the node's nursery, which must not end for it."""
        interval = self._interval_s
        while True:
            try:
                await self.run_once()
            except RelayError as exc:
                log.warning(
                    "retention run failed", extra={"error": exc.error, "retryable": exc.retryable}
                )
            except Exception as exc:
                self._incidents.report("retention", exc, "a retention run")
            await trio.sleep(interval)

    async def run_once(self) -> RetentionRun:
        storage = self._storage
        started = trio.current_time()
        now_ms = int(self.clock() * 1000)
        cutoff: int | None = None
        messages = group_infos = 0
        days = self._days
        if days > 0:
            cutoff = now_ms - int(days * DAY_MS)
            messages = await storage.prune_messages(cutoff)
            group_infos = await storage.prune_group_infos(cutoff)
        tokens = await storage.purge_token_uses(now_ms)
        blobs = await self._blobs.collect(now_ms)  # what pruned messages referenced
        run = RetentionRun(
            cutoff, messages, group_infos, tokens, trio.current_time() - started, blobs
        )
        self.last = run
        self.runs += 1
        self._ran.set()
        self._ran = trio.Event()
        log.info(
            "retention run",
            extra={
                "cutoff_ms": cutoff,
                "messages_deleted": messages,
                "group_infos_deleted": group_infos,
                "token_uses_deleted": tokens,
                "blobs_deleted": blobs,
                "duration_s": round(run.seconds, 3),
            },
        )
        return run

    async def next_run(self) -> RetentionRun:
        """Wait for the next run to finish (tests, and operators' tooling)."""
        await self._ran.wait()
        assert self.last is not None
        return self.last


class TokenUse(Protocol):
    """What a verified token tells the single-use check (an edge Identity)."""

    @property
    def jti(self) -> str: ...
    @property
    def user(self) -> str: ...
    @property
    def expires_at(self) -> int: ...


class SingleUseTokens:
    """Spends each connecting token's ``jti`` in the shared database."""

    def __init__(self, storage: Storage, *, enabled: bool, leeway_s: int) -> None:
        self._storage = storage
        self.enabled = enabled
        #: The verifier's leeway: a used id is kept while the token could pass.
        self._leeway_s = leeway_s

    async def consume(self, identity: TokenUse) -> None:
        """Spend the token's ``jti``; TokenReplayed if already spent.

        Raises Unavailable when the database cannot tell: a replay check that
        cannot run must refuse, not let the token through."""
        if not self.enabled:
            return
        expires_ms = (identity.expires_at + self._leeway_s) * 1000
        now_ms = time.time_ns() // 1_000_000
        if not await self._storage.consume_token(identity.jti, identity.user, expires_ms, now_ms):
            raise TokenReplayed("this token was already used to connect; use a fresh token")
