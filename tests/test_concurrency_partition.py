"""A silent network partition between the relay and PostgreSQL (issue 14, bug 3).

The test-controlled proxy (tests/tcpproxy.py) stops forwarding without
closing anything, as a partition that drops packets does.  Before, a
statement waiting on such a connection could not be cancelled and nothing
bounded it: the node's single committer waited until TCP gave up.  Now
every job has a deadline, its connection is killed so the statement never
runs later, the callers get ``Unavailable`` (retryable), and sends commit
again once the network heals.
"""

from __future__ import annotations

import socket
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import trio

from protocol.errors import Unavailable
from relay.base.config import ConfigError, from_env
from storage.pgconn import PgTimeouts, pg_pool

from .harness import running_relay
from .relayclient import connect
from .tcpproxy import tcp_proxy

ALICE, BOB = "did:example:alice", "did:example:bob"
#: Slack for a shared 2-core machine on top of each bound below.
MARGIN_S = 1.5


def _via(dsn: str, port: int, query: str = "connect_timeout=2") -> str:
    parts = urlsplit(dsn)
    netloc = f"{parts.username + '@' if parts.username else ''}127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _target(dsn: str) -> int:
    return urlsplit(dsn).port or 5432


async def _direct(dsn: str, sql: str) -> Any:
    """One value read straight from the server, around the proxy."""

    def query() -> Any:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(sql.encode())
            row = cur.fetchone() if cur.description else None
            return None if row is None else row[0]

    return await trio.to_thread.run_sync(query)


@pytest.mark.timeout(40)
async def test_a_job_on_a_silent_connection_fails_at_its_deadline_and_never_runs_later(
    pg_database_url: str,
) -> None:
    await _direct(pg_database_url, "CREATE TABLE partition_probe (v integer)")
    deadline = 1.5
    bounds = PgTimeouts(statement_s=1.0, tcp_s=2.0, deadline_s=deadline)
    with trio.fail_after(30):
        async with tcp_proxy(_target(pg_database_url)) as proxy:
            pool = pg_pool(_via(pg_database_url, proxy.port), max_size=2, timeouts=bounds)
            try:
                await pool.run(lambda c: c.execute("SELECT 1").fetchall())  # a pooled connection
                proxy.blackhole()
                started = trio.current_time()
                with pytest.raises(Unavailable):
                    await pool.run(lambda c: c.execute("INSERT INTO partition_probe VALUES (1)"))
                elapsed = trio.current_time() - started
                assert deadline - 0.1 <= elapsed < deadline + MARGIN_S, elapsed
                assert pool.abandoned == 1
                # A new connection cannot get through either, and is bounded the same way.
                started = trio.current_time()
                with pytest.raises(Unavailable):
                    await pool.run(lambda c: c.execute("INSERT INTO partition_probe VALUES (2)"))
                assert trio.current_time() - started < deadline + MARGIN_S

                await proxy.heal()
                # What the proxy held for the abandoned connections is gone with
                # them: nothing the callers were told failed runs now.
                await trio.sleep(1.0)
                assert await _direct(pg_database_url, "SELECT count(*) FROM partition_probe") == 0
                await pool.run(lambda c: c.execute("INSERT INTO partition_probe VALUES (3)"))
                assert await _direct(pg_database_url, "SELECT sum(v) FROM partition_probe") == 3
            finally:
                await pool.aclose()


@pytest.mark.timeout(30)
async def test_connections_carry_the_bounds(pg_database_url: str) -> None:
    bounds = PgTimeouts(statement_s=0.5, tcp_s=4.0, deadline_s=5.0)
    pool = pg_pool(pg_database_url, max_size=1, timeouts=bounds)
    try:

        def settings(conn: Any) -> tuple[Any, ...]:
            shown = [
                conn.execute(f"SHOW {name}").fetchone()[0]
                for name in (
                    "statement_timeout",
                    "idle_in_transaction_session_timeout",
                    "tcp_user_timeout",
                    "tcp_keepalives_idle",
                )
            ]
            sock = socket.socket(fileno=conn.pgconn.socket)
            try:
                user_timeout = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
                keepalive = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            finally:
                sock.detach()  # libpq's descriptor: not ours to close
            return (*shown, user_timeout, keepalive, conn.execute("SELECT pg_backend_pid()"))

        *shown, user_timeout, keepalive, _ = await pool.run(settings)
        assert shown == ["500ms", "500ms", "4000", "2"]  # tcp_* show in ms and s
        assert (user_timeout, keepalive) == (4000, 1)

        # The server ends a slow statement itself: Unavailable, and the
        # connection (not killed) serves the next job.
        pid = await pool.run(lambda c: c.execute("SELECT pg_backend_pid()").fetchone()[0])
        started = trio.current_time()
        with pytest.raises(Unavailable):
            await pool.run(lambda c: c.execute("SELECT pg_sleep(3)").fetchall())
        assert trio.current_time() - started < 0.5 + MARGIN_S
        assert await pool.run(lambda c: c.execute("SELECT pg_backend_pid()").fetchone()[0]) == pid
        assert pool.abandoned == 0
    finally:
        await pool.aclose()

    # Options the DATABASE_URL sets itself win over ours.
    own = pg_database_url + "?options=-c%20statement_timeout%3D2500"
    pool = pg_pool(own, max_size=1, timeouts=bounds)
    try:
        assert await pool.run(lambda c: c.execute("SHOW statement_timeout").fetchone()[0]) == (
            "2500ms"
        )
    finally:
        await pool.aclose()


@pytest.mark.timeout(60)
async def test_committer_gives_up_on_a_silent_partition_and_commits_after_it_heals(
    pg_database_url: str,
) -> None:
    conv = b"partition"
    deadline = 1.5
    bound = deadline + MARGIN_S
    with trio.fail_after(50):
        async with (
            tcp_proxy(_target(pg_database_url)) as proxy,
            running_relay(
                _via(pg_database_url, proxy.port),
                db_statement_timeout_s=1.0,
                db_tcp_timeout_s=2.0,
                db_deadline_s=deadline,
            ) as r,
            connect(r.ws_url, ALICE, "a1") as alice,
            connect(r.ws_url, BOB, "b1", subscribe=True) as bob,
        ):
            await alice.ok("#createConversation", conversation=conv, members=[BOB])
            assert await alice.send(conv, b"before") == 1
            assert [m["seq"] for m in await bob.messages(1, conv)] == [1]

            proxy.blackhole()
            cmids = [f"during-{i}-{uuid.uuid4().hex[:8]}" for i in range(3)]
            took: dict[str, float] = {}
            errors: dict[str, dict[str, Any]] = {}

            async def send(cmid: str) -> None:
                started = trio.current_time()
                reply = await alice.request(
                    "#send", conversation=conv, ciphertext=cmid.encode(), client_message_id=cmid
                )
                took[cmid] = trio.current_time() - started
                assert not reply.ok, reply.body
                errors[cmid] = reply.body

            async with trio.open_nursery() as nursery:
                for cmid in cmids:
                    nursery.start_soon(send, cmid)
            for cmid in cmids:
                assert errors[cmid]["error"] == "Unavailable", errors[cmid]
                assert errors[cmid]["retryable"] is True
                assert took[cmid] < bound, took
            # The committer is not stuck behind the dead connection: a later
            # send fails within the bound too.
            started = trio.current_time()
            late = await alice.request(
                "#send", conversation=conv, ciphertext=b"late", client_message_id="late"
            )
            assert not late.ok and late.body["error"] == "Unavailable"
            assert trio.current_time() - started < bound

            await proxy.heal()
            await trio.sleep(1.0)
            # Nothing the senders were told failed ran after the heal.
            assert await _direct(pg_database_url, "SELECT count(*) FROM messages") == 1

            # Resent with the same ids, they commit once each, in order.
            seqs = []
            with trio.fail_after(20):
                for cmid in cmids:
                    while not (
                        reply := await alice.request(
                            "#send",
                            conversation=conv,
                            ciphertext=cmid.encode(),
                            client_message_id=cmid,
                        )
                    ).ok:
                        assert reply.body["error"] == "Unavailable", reply.body
                        await trio.sleep(0.2)
                    seqs.append(reply.body["seq"])
            assert seqs == [2, 3, 4]
            got = await bob.messages(3, conv)
            assert [(m["seq"], m["ciphertext"]) for m in got] == [
                (seq, cmid.encode()) for seq, cmid in zip(seqs, cmids, strict=True)
            ]
            assert await _direct(pg_database_url, "SELECT count(*) FROM messages") == 4


def test_database_bounds_are_settings_with_defaults() -> None:
    cfg = from_env({})
    assert cfg.pg_timeouts == PgTimeouts(statement_s=10.0, tcp_s=10.0, deadline_s=15.0)
    cfg = from_env({"RELAY_DB_DEADLINE_S": "3", "RELAY_DB_STATEMENT_TIMEOUT_S": "2"})
    assert cfg.pg_timeouts.deadline_s == 3.0
    for bad in (
        {"RELAY_DB_DEADLINE_S": "0"},
        {"RELAY_DB_DEADLINE_S": "5", "RELAY_DB_STATEMENT_TIMEOUT_S": "6"},
        {"RELAY_DB_TCP_TIMEOUT_S": "-1"},
    ):
        with pytest.raises(ConfigError):
            from_env(bad)
