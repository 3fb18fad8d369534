"""A Trio-native pool of blocking database connections, for both backends.

psycopg's async API and asyncpg are asyncio-only, so the relay drives sync
psycopg 3 connections from Trio worker threads.  The rules:

* WAITING for a connection happens in Trio (a ``trio.Semaphore``): it is
  cancellable, costs no thread, and a caller cancelled while waiting never
  runs its statement later.
* A job runs in a worker thread that is never abandoned, so a connection is
  never handed to someone else while a thread still uses it.  When the
  caller is cancelled, the database is asked to stop the running statement
  (``conn.cancel_safe()`` for PostgreSQL, ``interrupt()`` for SQLite); the
  job's transaction rolls back and ``Cancelled`` propagates.  If the job is
  still running ``STOP_GRACE_S`` later (the cancel request itself got no
  answer: a silent network partition), or at once when the job's deadline
  passed, its connection is killed: the socket is shut down with a zero
  linger, which wakes the thread and makes the final close a reset that
  drops whatever the kernel still held to send, so a partition that heals
  later can never deliver the statement.
* A pool may give every job a deadline (PostgreSQL:
  ``storage.pgconn.PgTimeouts``): a job not done by then is stopped as above
  and its caller gets ``Unavailable`` (retryable), never a late execution.
* Broken connections are discarded and replaced lazily.  Driver errors are
  translated into :mod:`protocol.errors` classes.

The pool is driver-agnostic (:class:`Driver`): the SQLite backend reuses it;
the PostgreSQL driver and its bounds are in :mod:`storage.pgconn`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import outcome
import trio

from protocol.errors import RelayError, Unavailable

C = TypeVar("C")
T = TypeVar("T")

#: After a cancel request, how long a job may still run before its connection
#: is killed (the request may never arrive: a silent partition).
STOP_GRACE_S = 1.0


async def run_sync_cancellable(
    fn: Callable[[], T],
    cancel: Callable[[], object],
    on_cancel: Callable[[], None] | None = None,
    kill: Callable[[], object] | None = None,
    expired: Callable[[], bool] | None = None,
) -> T:
    """Run blocking ``fn`` in a worker thread, calling ``cancel`` (in another
    thread) if the caller is cancelled meanwhile, then ``kill`` if ``fn`` is
    still running ``STOP_GRACE_S`` later.  When ``expired()`` says the
    cancellation is a deadline that passed, ``kill`` comes first: the server
    had the whole deadline to answer.  Waits for ``fn`` to finish either
    way.  A job that still completed returns its result; a job that failed
    after the caller was cancelled raises ``Cancelled``.  ``on_cancel`` is
    called (in Trio's thread) when the cancel request is sent.

    Built on trio's low-level thread primitives rather than
    ``trio.to_thread.run_sync`` plus a watcher task: that pair cost a
    nursery, a task and two OS thread renames per call, about a tenth of the
    event loop's time on the commit path."""
    await trio.lowlevel.checkpoint_if_cancelled()  # never start for a gone caller
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()
    cancel_sent = False
    finished = False  # set by the worker thread; read by the stopper thread

    def deliver(result: outcome.Outcome[T]) -> None:
        nonlocal finished
        finished = True
        # Wrapped once more: wait_task_rescheduled unwraps what it is sent, and
        # we want the job's Outcome itself (to decide about Cancelled below).
        token.run_sync_soon(trio.lowlevel.reschedule, task, outcome.Value(result))

    def stop(at_deadline: bool) -> None:
        # Its own thread: a cancel request to an unreachable server blocks.
        if at_deadline and kill is not None:
            _quietly(kill)
            _quietly(cancel)  # best effort: the server may still be running it
            return
        give_up_at = time.monotonic() + STOP_GRACE_S
        _quietly(cancel)
        if kill is None:
            return
        while not finished and time.monotonic() < give_up_at:
            time.sleep(0.01)  # rare path (a cancelled job): polling beats an Event per call
        if not finished:
            _quietly(kill)

    def abort(raise_cancel: object) -> trio.lowlevel.Abort:
        # The caller is cancelled: ask the server to stop the statement, and
        # keep waiting for the thread (its connection must not be reused
        # while it runs).  Cancelled is raised once the job is over.
        nonlocal cancel_sent
        if not cancel_sent:
            cancel_sent = True
            if on_cancel is not None:
                on_cancel()
            at_deadline = expired is not None and expired()
            trio.lowlevel.start_thread_soon(functools.partial(stop, at_deadline), _discard)
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
    #: Makes a job blocked on the connection fail at once, whatever the peer
    #: does (None: ``cancel`` always suffices, as for a local SQLite file).
    kill: Callable[[C], object] | None = None


class _Slot:
    """One of the pool's ``max_size`` places; released exactly once, by
    whoever holds it last (the caller, or a connect thread it abandoned)."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = True


class ConnectionPool(Generic[C]):
    """At most ``max_size`` connections; ``fill()`` pre-opens ``min_size``.

    ``deadline_s``: a job (waiting for a slot, connecting, running) not done
    by then is stopped and fails with ``Unavailable``; None: no deadline."""

    def __init__(
        self,
        driver: Driver[C],
        *,
        min_size: int = 2,
        max_size: int = 10,
        deadline_s: float | None = None,
    ) -> None:
        if min_size < 0 or max_size < 1:
            raise ValueError("need min_size >= 0 and max_size >= 1")
        if deadline_s is not None and deadline_s <= 0:
            raise ValueError("need deadline_s > 0 (or None)")
        self._driver = driver
        self._min_size = min(min_size, max_size)
        self._slots = trio.Semaphore(max_size)
        self._idle: list[C] = []
        self._closed = False
        self._deadline_s = deadline_s
        #: Jobs given up at their deadline (each killed its connection).
        self.abandoned = 0

    async def run(self, job: Callable[[C], T], *, deadline_s: float | None = None) -> T:
        """Run ``job(conn)`` in a worker thread on a pooled connection.
        ``deadline_s`` overrides the pool's deadline for this job."""
        if self._closed:
            raise Unavailable("storage is closed")
        limit = self._deadline_s if deadline_s is None else deadline_s
        if limit is None:
            return await self._run(job)
        with trio.move_on_after(limit) as scope:
            return await self._run(job, lambda: scope.cancel_called)
        # Our deadline, not the caller's cancellation.  The job's connection
        # was killed before we got here (run_sync_cancellable), so its
        # statement cannot reach the server later.  The server answered
        # nothing for `limit` seconds: the idle connections are suspect too.
        self.abandoned += 1
        await self._drop_idle()
        raise Unavailable(f"the database did not answer within {limit:g} s")

    async def _run(self, job: Callable[[C], T], expired: Callable[[], bool] | None = None) -> T:
        await self._slots.acquire()
        slot = _Slot()
        try:
            conn = self._idle.pop() if self._idle else await self._connect(slot)
            # A cancel request travels on its own connection and may reach the
            # server after the statement it was meant for has finished: it
            # would then cancel the NEXT statement on this connection (seen
            # as a spurious QueryCanceled).  A connection we sent one for is
            # therefore never reused.
            cancel_sent = False

            def note_cancel() -> None:
                nonlocal cancel_sent
                cancel_sent = True

            kill = self._driver.kill
            try:
                return await run_sync_cancellable(
                    functools.partial(job, conn),
                    functools.partial(self._driver.cancel, conn),
                    note_cancel,
                    None if kill is None else functools.partial(kill, conn),
                    expired,
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
        finally:
            if slot.held:
                self._slots.release()

    async def fill(self) -> None:
        """Open connections until ``min_size`` are idle (startup warm-up)."""
        while len(self._idle) < self._min_size and not self._closed:
            await self._slots.acquire()
            slot = _Slot()
            try:
                self._idle.append(await self._connect(slot))
            finally:
                if slot.held:
                    self._slots.release()

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        with trio.CancelScope(shield=True):
            for conn in idle:
                await trio.to_thread.run_sync(_quietly, functools.partial(self._driver.close, conn))

    async def _connect(self, slot: _Slot) -> C:
        """A new connection.  A caller cancelled meanwhile (or at its
        deadline) does not wait for it: the connecting thread closes what it
        gets and only then frees the caller's slot, so the pool never holds
        more than ``max_size`` connections (connect_timeout bounds the thread)."""
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()
        lock = threading.Lock()
        state = {"done": False, "abandoned": False}

        def deliver(result: outcome.Outcome[C]) -> None:
            with lock:
                state["done"] = True
                abandoned = state["abandoned"]
            if not abandoned:
                token.run_sync_soon(trio.lowlevel.reschedule, task, outcome.Value(result))
                return
            if isinstance(result, outcome.Value):
                _quietly(functools.partial(self._driver.close, result.value))
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._slots.release)

        def abort(raise_cancel: object) -> trio.lowlevel.Abort:
            with lock:
                if state["done"]:
                    return trio.lowlevel.Abort.FAILED  # the connection is on its way
                state["abandoned"] = True
            slot.held = False  # deliver() frees it
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.checkpoint_if_cancelled()
        trio.lowlevel.start_thread_soon(self._driver.connect, deliver)
        result: outcome.Outcome[C] = await trio.lowlevel.wait_task_rescheduled(abort)
        try:
            return result.unwrap()
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

    async def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        with trio.CancelScope(shield=True):
            for conn in idle:
                await trio.to_thread.run_sync(_quietly, functools.partial(self._driver.close, conn))
