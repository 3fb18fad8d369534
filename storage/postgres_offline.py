"""PostgreSQL side of the offline-devices storage (storage/offline.py).

The shared SQL (:mod:`storage.offline_sql`) runs through ``_offline_read``
and ``_offline_write``; the two statements that run every second under load
(delivered positions, devices seen) are single array statements here with
binary parameters: as ``executemany`` they were hundreds of pipelined
statements of GIL-bound Python per round, stalling the event loop.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import TypeVar

from storage import offline_sql
from storage.connpool import ConnectionPool
from storage.offline import Job, OfflineStorage
from storage.pgconn import PgConn
from storage.postgres_mls import pg_exec
from storage.quotas import PG_LOCK_SQL

T = TypeVar("T")

# offline_sql.record_deliveries as one statement (see PostgresStorage.record_deliveries).
_RECORD_DELIVERIES_SQL = """
INSERT INTO deliveries (conversation_id, user_did, device_id, seq, updated_ms)
SELECT t.conv, t.usr, t.dev, t.seq, %b FROM unnest(%b::bytea[], %b::text[], %b::text[],
       %b::bigint[]) AS t (conv, usr, dev, seq)
 WHERE EXISTS (SELECT 1 FROM conversations c WHERE c.id = t.conv)
ON CONFLICT (conversation_id, user_did, device_id)
DO UPDATE SET seq = excluded.seq, updated_ms = excluded.updated_ms
WHERE excluded.seq > deliveries.seq
"""


_TOUCH_DEVICES_SQL = """
INSERT INTO devices (user_did, device_id, first_seen_ms, last_seen_ms)
SELECT t.usr, t.dev, %b, %b FROM unnest(%b::text[], %b::text[]) AS t (usr, dev)
ON CONFLICT (user_did, device_id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms
"""


def _pg_many(conn: PgConn) -> offline_sql.Many:
    def many(sql: str, rows: Sequence[Sequence[object]]) -> None:
        if rows:
            with conn.cursor() as cur:
                cur.executemany(sql.replace("?", "%s"), rows)

    return many


class PgOfflineStorage(OfflineStorage):
    _pool: ConnectionPool[PgConn]
    _quota_lock_sql = PG_LOCK_SQL

    @abc.abstractmethod
    async def _tx(self, job: Callable[[PgConn], T]) -> T:
        """Run ``job`` in one transaction (PostgresStorage)."""

    async def record_deliveries(
        self, rows: Sequence[tuple[str, str, bytes, int]], now_ms: int
    ) -> None:
        """One statement over arrays, parameters in binary: executemany spent
        tens of ms of GIL per 1,000 rows, stalling the event loop each round."""
        if not rows:
            return
        params = (
            now_ms, [r[2] for r in rows], [r[0] for r in rows], [r[1] for r in rows],
            [r[3] for r in rows],
        )  # fmt: skip
        await self._pool.run(lambda conn: conn.execute(_RECORD_DELIVERIES_SQL, params))

    async def touch_devices(self, devices: Sequence[tuple[str, str]], now_ms: int) -> None:
        """One array statement, as record_deliveries (1,000 devices connecting
        at once were 1,000 pipelined statements of GIL-bound Python)."""
        if not devices:
            return
        params = (now_ms, now_ms, [d[0] for d in devices], [d[1] for d in devices])
        await self._pool.run(lambda conn: conn.execute(_TOUCH_DEVICES_SQL, params))

    async def _offline_read(self, job: Job[T]) -> T:
        return await self._pool.run(lambda conn: job(pg_exec(conn), _pg_many(conn)))

    async def _offline_write(self, job: Job[T]) -> T:
        return await self._tx(lambda conn: job(pg_exec(conn), _pg_many(conn)))
