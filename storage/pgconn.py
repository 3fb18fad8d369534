"""PostgreSQL connections for the pool (storage/connpool.py): psycopg 3, sync.

Each connection is bounded three ways (:class:`PgTimeouts`; the relay's
RELAY_DB_* settings), so that a silent network partition -- packets dropped,
nothing closed -- can hold a caller for a known time, not until TCP gives up:

* the server stops any statement after ``statement_timeout`` and ends a
  session idle in a transaction after as long (a partitioned node's open
  transaction stops holding its row locks);
* TCP keepalives and ``TCP_USER_TIMEOUT`` on both ends notice dead
  connections and give up data the peer never acknowledges;
* the pool's deadline per job: the caller gets ``Unavailable`` and the job's
  connection is killed (:class:`_Killswitch`), so the statement can never be
  delivered and run after the caller was told it failed.
"""

from __future__ import annotations

import functools
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from protocol.errors import RelayError, StorageError, Unavailable
from storage.connpool import STOP_GRACE_S, ConnectionPool, Driver

PgConn = psycopg.Connection[Any]


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


@dataclass(frozen=True, slots=True)
class PgTimeouts:
    """Bounds on every PostgreSQL job (docs/OPERATIONS.md, "Database timeouts").

    Without them a statement waiting on a connection that died silently (a
    network partition that drops packets, nothing closed) waited until TCP
    gave up, many minutes later, and the node's single committer with it."""

    #: Server side: ``statement_timeout`` and ``idle_in_transaction_session_timeout``
    #: (a partitioned node's open transaction stops holding its row locks).  0: none.
    statement_s: float = 10.0
    #: TCP keepalives and ``TCP_USER_TIMEOUT`` on both ends of each connection:
    #: dead idle connections are noticed, unacknowledged data is given up.  0: none.
    tcp_s: float = 10.0
    #: The caller's deadline per job (see ConnectionPool); None: none.
    deadline_s: float | None = 15.0

    def connect_params(self, conninfo: str) -> dict[str, Any]:
        """libpq parameters for these bounds; ones the conninfo sets itself win."""
        given = conninfo_to_dict(conninfo)
        params: dict[str, Any] = {}
        server: list[str] = []
        if self.statement_s > 0:
            ms = max(1, round(self.statement_s * 1000))
            server += [f"statement_timeout={ms}", f"idle_in_transaction_session_timeout={ms}"]
        if self.tcp_s > 0:
            # Probes after tcp/2 idle, then every tcp/6, three lost: ~tcp in all.
            idle, interval = max(1, round(self.tcp_s / 2)), max(1, round(self.tcp_s / 6))
            user_ms = max(1, round(self.tcp_s * 1000))
            ours = {
                "keepalives": 1,
                "keepalives_idle": idle,
                "keepalives_interval": interval,
                "keepalives_count": 3,
                "tcp_user_timeout": user_ms,
            }
            params.update({k: v for k, v in ours.items() if k not in given})
            server += [
                f"tcp_keepalives_idle={idle}",
                f"tcp_keepalives_interval={interval}",
                "tcp_keepalives_count=3",
                f"tcp_user_timeout={user_ms}",
            ]
        if server:
            # Later -c options win: the conninfo's own options go last.
            options = " ".join(f"-c {setting}" for setting in server)
            params["options"] = f"{options} {given.get('options', '')}".strip()
        return params


#: For the migration connection: DDL may run long, and holds no request up.
NO_STATEMENT_BOUNDS = PgTimeouts(statement_s=0, deadline_s=None)


class _Killswitch:
    """Our own descriptor of a libpq connection's socket, so the socket can be
    shut down while libpq blocks on it in another thread (libpq's descriptor
    number could be closed and reused under us; ours cannot)."""

    def __init__(self, fd: int) -> None:
        self._sock: socket.socket | None = socket.socket(fileno=os.dup(fd))
        self._lock = threading.Lock()

    def pull(self) -> None:
        """Wake whatever waits on the socket with an error, and make its last
        close a reset that discards unsent data (zero linger)."""
        with self._lock:
            if self._sock is not None:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class _PgConnection(psycopg.Connection[Any]):
    killswitch: _Killswitch | None = None


def _pg_cancel(conn: PgConn) -> None:
    conn.cancel_safe(timeout=STOP_GRACE_S)


def _pg_kill(conn: PgConn) -> None:
    if isinstance(conn, _PgConnection) and conn.killswitch is not None:
        conn.killswitch.pull()


def _pg_close(conn: PgConn) -> None:
    try:
        conn.close()
    finally:
        if isinstance(conn, _PgConnection) and conn.killswitch is not None:
            conn.killswitch.close()


def pg_connect(
    conninfo: str, connect_timeout: float, timeouts: PgTimeouts = NO_STATEMENT_BOUNDS
) -> PgConn:
    """An autocommit connection (transactions are explicit blocks).  A
    ``connect_timeout`` in the conninfo wins over the argument."""
    kwargs: dict[str, Any] = {"autocommit": True, "application_name": "mls-relay"}
    if "connect_timeout" not in conninfo_to_dict(conninfo):
        kwargs["connect_timeout"] = max(1, round(connect_timeout))
    kwargs.update(timeouts.connect_params(conninfo))
    conn = _PgConnection.connect(conninfo, **kwargs)
    try:
        conn.killswitch = _Killswitch(conn.pgconn.socket)
    except OSError:
        conn.close()
        raise
    return conn


def pg_pool(
    conninfo: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    connect_timeout: float = 3.0,
    timeouts: PgTimeouts | None = None,
) -> ConnectionPool[PgConn]:
    bounds = PgTimeouts() if timeouts is None else timeouts
    driver: Driver[PgConn] = Driver(
        connect=functools.partial(pg_connect, conninfo, connect_timeout, bounds),
        cancel=_pg_cancel,
        reusable=_pg_reusable,
        close=_pg_close,
        translate=translate_pg_error,
        kill=_pg_kill,
    )
    return ConnectionPool(
        driver, min_size=min_size, max_size=max_size, deadline_s=bounds.deadline_s
    )
