"""A Trio-native pool of blocking database connections.

psycopg's async API and asyncpg are asyncio-only, so the relay drives sync
psycopg 3 connections from Trio worker threads.  The rules:

* WAITING for a connection happens in Trio (a ``trio.Semaphore``): it is
  cancellable, costs no thread, and a caller cancelled while waiting never
  runs its statement later.
* A job runs in a worker thread that is never abandoned, so a connection is
  never handed to someone else while a thread still uses it.  Next to it a
  watcher task waits for the caller's cancellation and then asks the
  database to stop the running statement (``conn.cancel_safe()`` for
  PostgreSQL, ``interrupt()`` for SQLite); the job's transaction rolls back
  and ``Cancelled`` propagates.
* Broken connections are discarded and replaced lazily.  Driver errors are
  translated into :mod:`protocol.errors` classes.

The pool is driver-agnostic (:class:`Driver`): the SQLite backend reuses it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import outcome
import psycopg
import trio
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from protocol.errors import RelayError, StorageError, Unavailable

C = TypeVar("C")
T = TypeVar("T")

PgConn = psycopg.Connection[Any]


async def run_sync_cancellable(
    fn: Callable[[], T],
    cancel: Callable[[], object],
    on_cancel: Callable[[], None] | None = None,
) -> T:
    """Run blocking ``fn`` in a worker thread, calling ``cancel`` (in another
    thread) if the caller is cancelled meanwhile.  Waits for ``fn`` to finish
    either way.  A job that still completed returns its result; a job that
    failed after the caller was cancelled raises ``Cancelled``.  ``on_cancel``
    is called (in Trio's thread) when the cancel request is sent.

    Built on trio's low-level thread primitives rather than
    ``trio.to_thread.run_sync`` plus a watcher task: that pair cost a
    nursery, a task and two OS thread renames per call, about a tenth of the
    event loop's time on the commit path."""
    await trio.lowlevel.checkpoint_if_cancelled()  # never start for a gone caller
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()
    cancel_sent = False

    def deliver(result: outcome.Outcome[T]) -> None:
        # Wrapped once more: wait_task_rescheduled unwraps what it is sent, and
        # we want the job's Outcome itself (to decide about Cancelled below).
        token.run_sync_soon(trio.lowlevel.reschedule, task, outcome.Value(result))

    def abort(raise_cancel: object) -> trio.lowlevel.Abort:
        # The caller is cancelled: ask the server to stop the statement, and
        # keep waiting for the thread (its connection must not be reused
        # while it runs).  Cancelled is raised once the job is over.
        nonlocal cancel_sent
        if not cancel_sent:
            cancel_sent = True
            if on_cancel is not None:
                on_cancel()
            trio.lowlevel.start_thread_soon(lambda: _quietly(cancel), _discard)
        return trio.lowlevel.Abort.FAILED

    trio.lowlevel.start_thread_soon(fn, deliver)
    result: outcome.Outcome[T] = await trio.lowlevel.wait_task_rescheduled(abort)
    if cancel_sent and isinstance(result, outcome.Error):
        await trio.lowlevel.checkpoint_if_cancelled()
    return result.unwrap()


def _discard(result: object) -> None:
    pass


def _quietly(fn: Callable[[], object]) -> None:
    # A failed cancel request must not hide the job's own outcome.
    with contextlib.suppress(Exception):
        fn()


@dataclass(frozen=True, slots=True)
class Driver(Generic[C]):
    """How the pool handles one kind of connection.  All callables block."""

    connect: Callable[[], C]
    cancel: Callable[[C], object]
    #: False when the connection must be discarded after a job.
    reusable: Callable[[C], bool]
    close: Callable[[C], object]
    #: Maps a driver exception to a RelayError (None: not a driver error).
    translate: Callable[[Exception], RelayError | None]


class ConnectionPool(Generic[C]):
    """At most ``max_size`` connections; ``fill()`` pre-opens ``min_size``."""

    def __init__(self, driver: Driver[C], *, min_size: int = 2, max_size: int = 10) -> None:
        if min_size < 0 or max_size < 1:
            raise ValueError("need min_size >= 0 and max_size >= 1")
        self._driver = driver
        self._min_size = min(min_size, max_size)
        self._slots = trio.Semaphore(max_size)
        self._idle: list[C] = []
        self._closed = False

    async def run(self, job: Callable[[C], T]) -> T:
        """Run ``job(conn)`` in a worker thread on a pooled connection."""
        if self._closed:
            raise Unavailable("storage is closed")
        async with self._slots:
            conn = await self._checkout()
            # A cancel request travels on its own connection and may reach the
            # server after the statement it was meant for has finished: it
            # would then cancel the NEXT statement on this connection (seen
            # as a spurious QueryCanceled).  A connection we sent one for is
            # therefore never reused.
            cancel_sent = False

            def note_cancel() -> None:
                nonlocal cancel_sent
                cancel_sent = True

            try:
                return await run_sync_cancellable(
                    functools.partial(job, conn),
                    functools.partial(self._driver.cancel, conn),
                    note_cancel,
                )
            except RelayError:
                raise
            except Exception as exc:
                mapped = self._driver.translate(exc)
                if mapped is None:
                    raise
                raise mapped from exc
            finally:
                with trio.CancelScope(shield=True):
                    await self._checkin(conn, reuse=not cancel_sent)

    async def fill(self) -> None:
        """Open connections until ``min_size`` are idle (startup warm-up)."""
        while len(self._idle) < self._min_size and not self._closed:
            async with self._slots:
                self._idle.append(await self._connect())

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        with trio.CancelScope(shield=True):
            for conn in idle:
                await trio.to_thread.run_sync(_quietly, functools.partial(self._driver.close, conn))

    async def _checkout(self) -> C:
        if self._idle:
            return self._idle.pop()
        return await self._connect()

    async def _connect(self) -> C:
        try:
            return await trio.to_thread.run_sync(self._driver.connect)
        except Exception as exc:
            mapped = self._driver.translate(exc)
            if mapped is None:
                raise
            raise mapped from exc

    async def _checkin(self, conn: C, *, reuse: bool = True) -> None:
        if reuse and not self._closed and self._driver.reusable(conn):
            self._idle.append(conn)
            return
        doomed = [conn]
        if reuse and not self._closed:
            # One dead connection usually means the server restarted: the
            # idle ones are dead too, so drop them now instead of failing one
            # request per stale connection.
            doomed += self._idle
            self._idle = []
        for victim in doomed:
            await trio.to_thread.run_sync(_quietly, functools.partial(self._driver.close, victim))


# --- PostgreSQL ------------------------------------------------------------------


def translate_pg_error(exc: Exception) -> RelayError | None:
    # OperationalError covers lost connections, shutdowns, timeouts and
    # serialization/deadlock aborts: all worth a retry.  Anything else that
    # the server rejects is a bug on our side.
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return Unavailable(f"database unavailable ({type(exc).__name__})")
    if isinstance(exc, psycopg.Error):
        return StorageError(f"database error ({type(exc).__name__})")
    return None


def _pg_reusable(conn: PgConn) -> bool:
    return (
        not conn.closed
        and not conn.broken
        and conn.info.transaction_status == TransactionStatus.IDLE
    )


def _pg_cancel(conn: PgConn) -> None:
    conn.cancel_safe(timeout=5.0)


def pg_connect(conninfo: str, connect_timeout: float) -> PgConn:
    """An autocommit connection (transactions are explicit blocks).  A
    ``connect_timeout`` in the conninfo wins over the argument."""
    kwargs: dict[str, Any] = {"autocommit": True, "application_name": "mls-relay"}
    if "connect_timeout" not in conninfo_to_dict(conninfo):
        kwargs["connect_timeout"] = max(1, round(connect_timeout))
    return psycopg.Connection.connect(conninfo, **kwargs)


def pg_pool(
    conninfo: str, *, min_size: int = 2, max_size: int = 10, connect_timeout: float = 3.0
) -> ConnectionPool[PgConn]:
    driver: Driver[PgConn] = Driver(
        connect=functools.partial(pg_connect, conninfo, connect_timeout),
        cancel=_pg_cancel,
        reusable=_pg_reusable,
        close=lambda conn: conn.close(),
        translate=translate_pg_error,
    )
    return ConnectionPool(driver, min_size=min_size, max_size=max_size)
