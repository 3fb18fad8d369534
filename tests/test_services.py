"""The test services the conftest fixtures hand out are real and isolated, and
the per-test timeout the conftest adds really stops a hanging test."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import coredis
import psycopg
from psycopg import sql

from tests.conftest import PG_DEFAULT, RedisTarget

ROOT = Path(__file__).resolve().parents[1]


def test_postgres_dsn_is_a_database_of_its_own(postgres_dsn: str) -> None:
    base = os.environ.get("MLS_RELAY_TEST_PG", PG_DEFAULT)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
        assert row is not None
        assert re.fullmatch(r"relay_test_[0-9a-f]{12}", row[0]), row[0]
        with psycopg.connect(base, autocommit=True) as admin:
            base_row = admin.execute("SELECT current_database()").fetchone()
        assert base_row is not None and base_row[0] != row[0]  # not the shared one
        # Writable: a table of this test's own (no IF NOT EXISTS: it must be new).
        table = sql.Identifier(f"infra_probe_{secrets.token_hex(4)}")
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY)").format(table))
        conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(table))
        assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone() == (1,)
        conn.execute(sql.SQL("DROP TABLE {}").format(table))


async def test_redis_target_works_with_coredis_on_trio(redis_url: RedisTarget) -> None:
    assert re.fullmatch(r"relay-test-[0-9a-f]{12}:", redis_url.prefix), redis_url.prefix
    key = redis_url.key(f"probe-{secrets.token_hex(4)}")
    async with coredis.Redis.from_url(redis_url.url) as client:
        assert await client.get(key) is None
        await client.set(key, "1")
        assert await client.get(key) == b"1"
        await client.delete([key])


# --- the per-test timeout (conftest.pytest_collection_modifyitems) ---------------------
#
# Checked in a pytest run of its own, so that what is tested is the effect (a
# hanging test is stopped and fails) rather than which marker the hook attached.
# The inner run's default is 1 s instead of 60: the hook reads the module constant.

_INNER_CONFTEST = """
import tests.conftest
from tests.conftest import pytest_collection_modifyitems  # noqa: F401 (the hook under test)

tests.conftest.DEFAULT_TEST_TIMEOUT = 1
"""

_INNER_TESTS = """
import time

import pytest


def test_unmarked_hang():
    time.sleep(30)


def test_unmarked_two_seconds():
    time.sleep(2)


@pytest.mark.timeout(8)
def test_marked_outlasts_the_default():
    time.sleep(2)


@pytest.mark.timeout(1)
def test_marked_hang():
    time.sleep(30)
"""


def _inner_pytest(tmp_path: Path, *args: str) -> tuple[dict[str, str], str]:
    """Outcome per inner test (PASSED / FAILED), and the whole output."""
    (tmp_path / "conftest.py").write_text(_INNER_CONFTEST)
    (tmp_path / "test_inner.py").write_text(_INNER_TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not the project's ini
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_TIMEOUT"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # The -rA summary: "PASSED file::name" or "FAILED file::name - Failed: Timeout ...".
    outcomes = {
        m.group(2): m.group(1)
        + (" (timeout)" if m.group(3).startswith(" - Failed: Timeout") else "")
        for m in re.finditer(r"^(PASSED|FAILED|ERROR) \S*::(\w+)(.*)$", out.stdout, re.M)
    }
    return outcomes, out.stdout + out.stderr


def test_a_test_without_timeout_marker_is_stopped_by_the_default(tmp_path: Path) -> None:
    started = time.monotonic()
    outcomes, output = _inner_pytest(tmp_path)
    assert outcomes == {
        "test_unmarked_hang": "FAILED (timeout)",
        "test_unmarked_two_seconds": "FAILED (timeout)",  # the 1 s default applied
        "test_marked_outlasts_the_default": "PASSED",  # its own 8 s was kept
        "test_marked_hang": "FAILED (timeout)",
    }, output
    assert time.monotonic() - started < 60  # no hang ran its 30 s


def test_a_timeout_given_to_the_run_wins_over_the_default(tmp_path: Path) -> None:
    outcomes, output = _inner_pytest(tmp_path, "--timeout=5", "-k", "unmarked")
    assert outcomes == {
        "test_unmarked_hang": "FAILED (timeout)",
        "test_unmarked_two_seconds": "PASSED",
    }, output
