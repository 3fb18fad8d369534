"""Every metric docs/OPERATIONS.md tells an operator to watch is one a relay
exports at /metrics (a node on PostgreSQL and Redis, as in production).

Names are read from OPERATIONS.md wherever they stand in code spans, PromQL
included (`rate(relay_x_total[5m])`, `relay_frames_*_total`)."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest
import trio

from .conftest import RedisTarget
from .harness import running_relay
from .test_relay_edges import http_request

OPERATIONS = Path(__file__).resolve().parents[1] / "docs" / "OPERATIONS.md"
METRIC = re.compile(r"\b((?:relay|process)_[a-z0-9_*]*[a-z0-9*])\b")


def documented_metrics() -> set[str]:
    spans = re.findall(r"`([^`\n]+)`", OPERATIONS.read_text())
    return {m for span in spans for m in METRIC.findall(span)}


def exported(text: str) -> set[str]:
    """The sample names: what a PromQL query names (a counter's end in _total).
    A labelled family with no series yet has only its TYPE line."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()
            if kind == "counter":
                names.add(family if family.endswith("_total") else f"{family}_total")
            elif kind == "histogram":
                names.update(f"{family}_{suffix}" for suffix in ("bucket", "sum", "count"))
            else:
                names.add(family)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def present(name: str, samples: set[str]) -> bool:
    if "*" in name:
        pattern = re.compile(re.escape(name).replace(r"\*", "[a-z0-9_]+") + "$")
        return any(pattern.match(n) for n in samples)
    # A histogram may be named bare in prose; its samples are _bucket, _sum, _count.
    return name in samples or f"{name}_bucket" in samples


@pytest.mark.timeout(60)
async def test_every_metric_operations_md_names_is_exported(
    postgres_dsn: str, redis_url: RedisTarget
) -> None:
    documented = documented_metrics()
    assert len(documented) >= 25, documented  # the pattern still finds them
    prefix = f"{redis_url.prefix}{secrets.token_hex(4)}:"
    with trio.fail_after(30):
        async with running_relay(postgres_dsn, redis_url=redis_url.url, redis_prefix=prefix) as r:
            status, _, body = await http_request(
                r.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
    assert status == 200
    names = exported(body.decode())
    missing = sorted(n for n in documented if not present(n, names))
    assert missing == [], missing
