"""The test services the conftest fixtures hand out are real and isolated."""

from __future__ import annotations

import coredis
import psycopg
import pytest

from tests.conftest import RedisTarget


def test_postgres_dsn_is_a_fresh_database(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
        assert row is not None
        assert row[0].startswith("relay_test_")
        conn.execute("CREATE TABLE IF NOT EXISTS infra_probe (id int PRIMARY KEY)")
        conn.execute("INSERT INTO infra_probe VALUES (1) ON CONFLICT DO NOTHING")
        count = conn.execute("SELECT count(*) FROM infra_probe").fetchone()
        assert count == (1,)


async def test_redis_target_works_with_coredis_on_trio(redis_url: RedisTarget) -> None:
    assert redis_url.prefix.startswith("relay-test-")
    key = redis_url.key("probe")
    async with coredis.Redis.from_url(redis_url.url) as client:
        await client.set(key, "1")
        assert await client.get(key) == b"1"


@pytest.mark.timeout(5)
def test_explicit_timeout_marker_is_kept(request: pytest.FixtureRequest) -> None:
    marks = [m.args[0] for m in request.node.iter_markers("timeout")]
    assert marks[0] == 5


def test_default_timeout_is_added(request: pytest.FixtureRequest) -> None:
    marker = request.node.get_closest_marker("timeout")
    assert marker is not None
