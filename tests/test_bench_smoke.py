"""Smoke test of the benchmark runner (bench/run.py) in its tiny mode.

Not a benchmark: 20 clients, sub-second steps, only checks that the runner
drives both servers end to end and writes the JSON and the plot.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(60)
def test_bench_runner_tiny(tmp_path: Path, postgres_dsn: str) -> None:
    # postgres_dsn: skipped (or failed under CI) when PostgreSQL is unreachable;
    # the runner creates and drops its own bench_<hex> database next to it.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--tiny",
            "--scenarios",
            "fanout,baseline,idle,catchup",
            "--pg-dsn",
            postgres_dsn,
            "--out-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=55,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"meta", "scenarios", "targets"} <= results.keys()
    sc = results["scenarios"]
    assert {"fanout", "baseline", "ratios", "idle", "catchup"} <= sc.keys()
    for kind in ("fanout", "baseline"):
        step = sc[kind]["steps"][0]
        for key in (
            "offered_frames_per_s",
            "delivered_frames_per_s",
            "persisted_msgs_per_s",
            "p50_ms",
            "p99_ms",
            "max_ms",
            "server_cpu_us_per_frame",
            "generator_cpu_cores",
        ):
            assert key in step, key
        assert step["delivered_frames_per_s"] > 0
        assert step["errors"] == 0
    assert "max_delivered_relay_over_baseline" in sc["ratios"]
    assert sc["idle"]["relay"][0]["rss_per_connection_kb"] is not None
    assert sc["catchup"]["messages"] == 2000
    assert (tmp_path / "results.png").stat().st_size > 1000
