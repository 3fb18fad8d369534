"""Benchmark runner: start servers, drive the generator, write JSON and a plot.

    .venv/bin/python -m bench.run                 # everything (~5 min)
    .venv/bin/python -m bench.run --quick         # short steps (~1.5 min)
    .venv/bin/python -m bench.run --scenarios fanout,baseline --rates 10000 --profile

Scenarios (``--scenarios``, comma separated):

* ``fanout``   the relay (PostgreSQL, a throwaway ``bench_<hex>`` database)
               under 1,000 devices in 100 conversations of 10, offered load
               stepped up until p99 > 100 ms;
* ``baseline`` the same against ``bench/baseline_server.py`` (no persistence);
* ``ceiling``  the baseline ramp again with 1 generator process (vs the
               default 2) to show where the generator itself tops out;
* ``idle``     server RSS per idle (subscribed) connection at 1,000 / 10,000;
* ``catchup``  one device resuming a 100,000-message backlog (COPY-inserted).

Servers only ever listen on 127.0.0.1; generators only connect there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import psycopg
import trio
from psycopg import sql

from . import loadgen
from .loadgen import AUDIENCE, LOOPBACK, SECRET, raise_nofile

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PG_DEFAULT = "postgresql://127.0.0.1:5432/test"
P99_LIMIT_MS = 100.0
ALL_SCENARIOS = ("fanout", "baseline", "ceiling", "idle", "catchup")


# --- processes -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {port} within {timeout}s")


@dataclass
class Server:
    kind: str
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.proc.pid)

    def _procs(self) -> list[psutil.Process]:
        """The server and, with ``serve --workers N``, its worker processes."""
        ps = self.ps
        return [ps, *ps.children(recursive=True)]

    def cpu(self) -> float:
        return sum(float(t.user + t.system) for t in self._cpu_times())

    def sys_cpu(self) -> float:
        """Kernel CPU seconds: on loopback a send() also runs the receiver's TCP path."""
        return sum(float(t.system) for t in self._cpu_times())

    def _cpu_times(self) -> list[Any]:
        times = []
        for p in self._procs():
            with contextlib.suppress(psutil.Error):
                times.append(p.cpu_times())
        return times

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_relay(database_url: str, workers: int = 1, redis_url: str = "") -> Server:
    """The relay as a subprocess; ``workers`` > 1 runs ``serve --workers`` (one
    port, fan-out between the processes through Redis, a fresh key prefix)."""
    port = free_port()
    env = dict(os.environ)
    env.update(
        PORT=str(port),
        DATABASE_URL=database_url,
        RELAY_JWT_SECRET=SECRET,
        RELAY_SERVICE_ID=AUDIENCE,
        RELAY_DEV_MODE="1",
        RELAY_LOG_LEVEL="WARNING",
    )
    cmd = [sys.executable, "-m", "relay.cli", "serve", "--host", LOOPBACK, "--port", str(port)]
    if workers > 1:
        env.update(REDIS_URL=redis_url, RELAY_REDIS_PREFIX=f"bench-{os.urandom(4).hex()}:")
        cmd += ["--workers", str(workers)]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, preexec_fn=raise_nofile)
    server = Server("relay", proc, port)
    _wait_port(port, proc)
    _wait_ready(port, proc)
    return server


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Poll /health/ready: the port listens before the HTTP app has started."""
    url = f"http://{LOOPBACK}:{port}/health/ready"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"relay exited with {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                time.sleep(0.3)
                return
        time.sleep(0.1)
    raise RuntimeError(f"relay not ready within {timeout}s")


def start_baseline() -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "bench.baseline_server", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, preexec_fn=raise_nofile)
    server = Server("baseline", proc, port)
    _wait_port(port, proc)
    return server


class Workers:
    """Generator processes, each a Trio loop driven over a pipe."""

    def __init__(self, count: int, port: int) -> None:
        ctx = mp.get_context("spawn")
        self.pipes = []
        self.procs = []
        for w in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=loadgen.worker_main, args=(child, port, w), daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)

    def call(self, cmd: str, args: list[dict[str, Any]], timeout: float = 120.0) -> list[Any]:
        for pipe, a in zip(self.pipes, args, strict=True):
            pipe.send((cmd, a))
        out = []
        deadline = time.monotonic() + timeout
        for pipe in self.pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"generator did not answer {cmd!r} within {timeout}s")
            status, value = pipe.recv()
            if status != "ok":
                raise RuntimeError(f"generator failed {cmd!r}: {value}")
            out.append(value)
        return out

    def cpu(self) -> float:
        total = 0.0
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(p.pid).cpu_times()
                total += t.user + t.system
        return total

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("exit", [{} for _ in self.pipes], timeout=10)
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.terminate()


def pg_cpu(dbname: str | None) -> float:
    """CPU seconds of the PostgreSQL backends serving ``dbname`` (best effort)."""
    if not dbname:
        return 0.0
    total = 0.0
    for p in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["name"] == "postgres" and f" {dbname} " in f" {cmd} ":
                t = p.cpu_times()
                total += t.user + t.system
    return total


def machine_busy() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.system + t.nice + getattr(t, "softirq", 0) + getattr(t, "irq", 0))


# --- PostgreSQL ------------------------------------------------------------------


def _with_db(dsn: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


@contextlib.contextmanager
def bench_database(admin_dsn: str) -> Any:
    """A throwaway migrated database; dropped afterwards."""
    name = f"bench_{secrets.token_hex(5)}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = _with_db(admin_dsn, name)
    try:
        env = dict(os.environ, DATABASE_URL=url)
        subprocess.run(
            [sys.executable, "-m", "relay.cli", "migrate"],
            env=env,
            cwd=REPO,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        yield name, url
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


# --- statistics ------------------------------------------------------------------


def percentiles(lat_us: np.ndarray) -> dict[str, float | None]:
    if lat_us.size == 0:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    p50, p99 = np.percentile(lat_us, [50, 99])
    return {
        "p50_ms": round(float(p50) / 1000, 3),
        "p99_ms": round(float(p99) / 1000, 3),
        "max_ms": round(float(lat_us.max()) / 1000, 3),
    }


# --- scenarios -------------------------------------------------------------------


@dataclass
class Opts:
    clients: int
    group: int
    size: int
    workers: int
    rates: list[int]
    step_s: float
    warm_s: float
    budget_s: float
    idle_counts: list[int]
    catchup_messages: int
    profile: bool
    out_dir: Path
    no_stop: bool = False
    idle_subscribe: bool = False


def fanout(
    server: Server, opts: Opts, dbname: str | None, workers: int, label: str
) -> dict[str, Any]:
    """Ramp offered load until p99 > 100 ms; one record per step."""
    started = time.monotonic()
    gen = Workers(workers, server.port)
    steps: list[dict[str, Any]] = []
    try:
        n_conv = opts.clients // opts.group
        args = []
        for w in range(workers):
            convs = [c for c in range(n_conv) if c % workers == w]
            indices = [c * opts.group + m for c in convs for m in range(opts.group)]
            args.append(
                {"indices": indices, "group": opts.group, "subscribe": True, "concurrency": 100}
            )
        setup = gen.call("fanout", args, timeout=120)
        gen.call("settle", [{"seconds": 0.5}] * workers)
        started = time.monotonic()
        recipients = opts.group - 1
        for i, rate in enumerate(opts.rates):
            if time.monotonic() - started > opts.budget_s:
                break
            msgs = rate / recipients
            # The first step's warm-up is three times longer: first contact
            # fills the relay's caches (conversation kinds, prepared
            # statements) and was ~1 s of backlog that a 1 s warm-up let into
            # the measured window.  Later steps start warm.
            warm = opts.warm_s * (3 if i == 0 else 1)
            step = {"rate": msgs / workers, "warm": warm, "duration": opts.step_s}
            step["size"] = opts.size
            for pipe in gen.pipes:
                pipe.send(("step", step))
            prof = None
            time.sleep(warm)
            c0 = (server.cpu(), gen.cpu(), pg_cpu(dbname), machine_busy(), time.monotonic())
            sys0 = server.sys_cpu()
            if opts.profile:
                prof = start_profile(server, opts, label, rate)
            time.sleep(opts.step_s)
            c1 = (server.cpu(), gen.cpu(), pg_cpu(dbname), machine_busy(), time.monotonic())
            sys1 = server.sys_cpu()
            stats = _collect(gen, opts.step_s + 30)
            profile_file = finish_profile(prof)
            wall = c1[4] - c0[4]
            span = max(s["elapsed_s"] for s in stats)
            delivered = sum(s["delivered"] for s in stats)
            # Deliveries during the runner's CPU window (same rate, its own clock).
            frames = max(delivered / span * wall, 1.0)
            lat = np.concatenate([np.frombuffer(s["latencies_us"], dtype=np.int64) for s in stats])
            rec: dict[str, Any] = {
                "offered_frames_per_s": rate,
                "offered_msgs_per_s": round(msgs, 1),
                "sent_msgs_per_s": round(sum(s["sent"] for s in stats) / span, 1),
                "delivered_frames_per_s": round(delivered / span, 1),
                "persisted_msgs_per_s": round(sum(s["results"] for s in stats) / span, 1),
                "errors": sum(s["errors"] for s in stats),
                "closed_by_server": sum(s["closed_by_server"] for s in stats),
                **percentiles(lat),
                "server_cpu_cores": round((c1[0] - c0[0]) / wall, 3),
                "server_sys_cpu_cores": round((sys1 - sys0) / wall, 3),
                "generator_cpu_cores": round((c1[1] - c0[1]) / wall, 3),
                "postgres_cpu_cores": round((c1[2] - c0[2]) / wall, 3),
                "machine_busy_cores": round((c1[3] - c0[3]) / wall, 3),
                "server_cpu_us_per_frame": round((c1[0] - c0[0]) / frames * 1e6, 2),
                "server_pg_cpu_us_per_frame": round(
                    (c1[0] - c0[0] + c1[2] - c0[2]) / frames * 1e6, 2
                ),
                "generator_cpu_us_per_frame": round((c1[1] - c0[1]) / frames * 1e6, 2),
            }
            rec["other_cpu_cores"] = round(
                rec["machine_busy_cores"]
                - rec["server_cpu_cores"]
                - rec["generator_cpu_cores"]
                - rec["postgres_cpu_cores"],
                3,
            )
            if profile_file:
                rec["profile"] = profile_file
            steps.append(rec)
            print(f"[{label}] {json.dumps(rec)}", flush=True)
            # On a noisy shared machine one p99 spike must not end the ramp:
            # stop once p99 > 100 ms AND the server no longer keeps up
            # (delivered < 90% of offered) or p99 > 1 s.
            over = rec["p99_ms"] is None or rec["p99_ms"] > P99_LIMIT_MS
            behind = rec["delivered_frames_per_s"] < 0.9 * rate or (rec["p99_ms"] or 1e9) > 1000
            if (over and behind and not opts.no_stop) or rec["closed_by_server"]:
                break
            gen.call("settle", [{"seconds": 0.5}] * workers)
    finally:
        gen.close()
    return {
        "workers": workers,
        "clients": opts.clients,
        "group": opts.group,
        "ciphertext_bytes": opts.size,
        "setup_s": round(max(s["setup_s"] for s in setup), 2) if steps else None,
        "steps": steps,
        "summary": summarize(steps),
    }


def _collect(gen: Workers, timeout: float) -> list[dict[str, Any]]:
    out = []
    deadline = time.monotonic() + timeout
    for pipe in gen.pipes:
        if not pipe.poll(max(0.0, deadline - time.monotonic())):
            raise TimeoutError("generator step did not finish")
        status, value = pipe.recv()
        if status != "ok":
            raise RuntimeError(f"generator step failed: {value}")
        out.append(value)
    return out


def summarize(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Saturation = the step with the most delivered frames/s (whatever its p99)."""
    if not steps:
        return {}
    best = max(steps, key=lambda s: s["delivered_frames_per_s"])
    ok = [s for s in steps if s["p99_ms"] is not None and s["p99_ms"] <= P99_LIMIT_MS]
    at10k = next((s for s in steps if s["offered_frames_per_s"] == 10000), None)
    return {
        "max_delivered_frames_per_s": best["delivered_frames_per_s"],
        "max_persisted_msgs_per_s": best["persisted_msgs_per_s"],
        "max_offered_with_p99_le_100ms": max((s["offered_frames_per_s"] for s in ok), default=0),
        "saturation_step": best,
        "at_10k": at10k,
    }


def idle(server: Server, opts: Opts, workers: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    gen = Workers(workers, server.port)
    try:
        time.sleep(0.5)
        rss0 = server.rss()
        have = 0
        base_index = 2_000_000
        for count in opts.idle_counts:
            extra = count - have
            args = []
            for w in range(workers):
                idx = list(range(base_index + have + w, base_index + count, workers))
                args.append({"indices": idx, "subscribe": opts.idle_subscribe, "concurrency": 200})
            t0 = time.monotonic()
            rec: dict[str, Any] = {"connections": count}
            try:
                res = gen.call("idle", args, timeout=max(60.0, extra / 100))
            except (RuntimeError, TimeoutError) as exc:
                rec["error"] = str(exc)
                alive = server.proc.poll() is None
                rec["server_alive"] = alive
                rec["server_fds"] = server.ps.num_fds() if alive else None
                out.append(rec)
                print(f"[idle {server.kind}] {json.dumps(rec)}", flush=True)
                break
            rec["connect_subscribe_s"] = round(time.monotonic() - t0, 2)
            time.sleep(1.0)
            rss = server.rss()
            have = count
            rec.update(
                {
                    "open_on_generator": sum(r["conns"] for r in res),
                    "server_fds": server.ps.num_fds(),
                    "rss_before_mb": round(rss0 / 2**20, 1),
                    "rss_mb": round(rss / 2**20, 1),
                    "rss_per_connection_kb": round((rss - rss0) / count / 1024, 2),
                }
            )
            out.append(rec)
            print(f"[idle {server.kind}] {json.dumps(rec)}", flush=True)
    finally:
        gen.close()
    return out


def insert_backlog(url: str, messages: int, size: int) -> tuple[int, float]:
    """COPY a backlog into one conversation; returns (reader index, seconds)."""
    reader, writer = 3_000_000, 3_000_001
    conv = b"bench-catchup"
    t0 = time.monotonic()
    now = int(time.time() * 1000)
    body = bytes(size)
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO conversations (id, creator, created_ms, last_seq) VALUES (%s, %s, %s, %s)",
            (conv, loadgen.user_did(writer), now, messages),
        )
        for u in (reader, writer):
            cur.execute(
                "INSERT INTO members (conversation_id, user_did, joined_seq, added_ms)"
                " VALUES (%s, %s, 0, %s)",
                (conv, loadgen.user_did(u), now),
            )
        with cur.copy(
            "COPY messages (conversation_id, seq, sender_did, sender_device,"
            " client_message_id, ciphertext, created_ms) FROM STDIN"
        ) as copy:
            sender = loadgen.user_did(writer)
            for seq in range(1, messages + 1):
                copy.write_row((conv, seq, sender, "d1", f"m{seq}", body, now))
        conn.commit()
    # A backlog this size builds up over hours, in which autovacuum (triggered
    # by inserts since PostgreSQL 13) has set the rows' visibility hints.  Read
    # straight after COPY, PostgreSQL would set them during the replay itself:
    # that "cold" read measured about half the rate (see bench/README.md).
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE messages")
    return reader, time.monotonic() - t0


def catchup(server: Server, url: str, dbname: str, opts: Opts) -> dict[str, Any]:
    reader, insert_s = insert_backlog(url, opts.catchup_messages, opts.size)
    c0 = (server.cpu(), pg_cpu(dbname))
    try:
        res = trio.run(loadgen.catch_up, server.port, reader, opts.catchup_messages)
    except (OSError, RuntimeError) as exc:
        err = {"error": f"{type(exc).__name__}: {exc}", "backlog": opts.catchup_messages}
        print(f"[catchup] {json.dumps(err)}", flush=True)
        return err
    c1 = (server.cpu(), pg_cpu(dbname))
    res.update(
        {
            "backlog_insert_s": round(insert_s, 2),
            "ciphertext_bytes": opts.size,
            "server_cpu_s": round(c1[0] - c0[0], 3),
            "postgres_cpu_s": round(c1[1] - c0[1], 3),
            "server_cpu_us_per_message": round((c1[0] - c0[0]) / res["messages"] * 1e6, 2),
        }
    )
    for key in ("seconds", "messages_per_s", "first_result_s", "client_cpu_s"):
        res[key] = round(res[key], 3)
    print(f"[catchup] {json.dumps(res)}", flush=True)
    return res


# --- profiling -----------------------------------------------------------------------


def start_profile(server: Server, opts: Opts, label: str, rate: int) -> Any:
    pyspy = Path(sys.executable).with_name("py-spy")
    path = opts.out_dir / "profiles" / f"{label}_{rate}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(pyspy), "record", "--pid", str(server.proc.pid), "--duration",
        str(max(1, int(opts.step_s))), "--rate", "200", "--nonblocking", "--idle",
        "--threads", "--format", "raw", "-o", str(path),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, path


def finish_profile(prof: Any) -> str | None:
    if prof is None:
        return None
    proc, path = prof
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    if not path.exists():
        return None
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


# --- output ------------------------------------------------------------------------


def ratios(relay: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    r, b = relay.get("summary", {}), base.get("summary", {})
    out: dict[str, Any] = {}
    if r and b:
        out["max_delivered_relay_over_baseline"] = round(
            r["max_delivered_frames_per_s"] / b["max_delivered_frames_per_s"], 3
        )
        rs, bs = r["saturation_step"], b["saturation_step"]
        out["cpu_per_frame_at_saturation_relay_over_baseline"] = round(
            rs["server_cpu_us_per_frame"] / max(bs["server_cpu_us_per_frame"], 1e-9), 3
        )
        if r.get("at_10k") and b.get("at_10k"):
            r10, b10 = r["at_10k"], b["at_10k"]
            out["cpu_per_frame_at_10k_relay_over_baseline"] = round(
                r10["server_cpu_us_per_frame"] / max(b10["server_cpu_us_per_frame"], 1e-9), 3
            )
            if r10["p99_ms"] and b10["p99_ms"]:
                out["p99_at_10k_relay_over_baseline"] = round(r10["p99_ms"] / b10["p99_ms"], 3)
    return out


def targets(results: dict[str, Any]) -> dict[str, Any]:
    sc = results["scenarios"]
    t: dict[str, Any] = {}
    relay = sc.get("fanout", {}).get("summary", {})
    if relay:
        sat, at10k = relay["saturation_step"], relay.get("at_10k")
        t["delivered_frames_per_s>=40000"] = relay["max_delivered_frames_per_s"]
        t["server_pg_cpu_us_per_frame_at_saturation<=5"] = sat["server_pg_cpu_us_per_frame"]
        if at10k:
            t["server_pg_cpu_us_per_frame_at_10k<=10"] = at10k["server_pg_cpu_us_per_frame"]
            t["p99_ms_at_10k<=20"] = at10k["p99_ms"]
    if "ratios" in sc:
        t["relay_over_baseline>=2"] = sc["ratios"].get("max_delivered_relay_over_baseline")
    for rec in sc.get("idle", {}).get("relay", []):
        if "rss_per_connection_kb" in rec:
            t[f"rss_kb_per_idle_connection_at_{rec['connections']}<=16"] = rec[
                "rss_per_connection_kb"
            ]
        else:
            t[f"connections_{rec['connections']}"] = rec.get("error")
    if "catchup" in sc:
        t["catchup_msgs_per_s>=50000"] = sc["catchup"].get(
            "messages_per_s", sc["catchup"].get("error")
        )
    return t


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = results["scenarios"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    series = [
        (name, sc[key]["steps"])
        for key, name in (
            ("fanout", "relay (PostgreSQL)"),
            ("baseline", "baseline (trio-websocket, no persistence)"),
            ("ceiling", "baseline, 1 generator process"),
        )
        if key in sc and sc[key].get("steps")
    ]
    ax = axes[0][0]
    for name, steps in series:
        x = [s["offered_frames_per_s"] for s in steps]
        ax.plot(x, [s["delivered_frames_per_s"] for s in steps], "o-", label=name)
    if series:
        top = max(s["offered_frames_per_s"] for _, st in series for s in st)
        ax.plot([0, top], [0, top], ":", color="grey", label="offered")
    ax.set_title("fan-out: delivered frames/s vs offered")
    ax.set_xlabel("offered frames/s")
    ax.set_ylabel("delivered frames/s")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    for name, steps in series:
        x = [s["offered_frames_per_s"] for s in steps]
        ax.plot(x, [s["p50_ms"] for s in steps], "o--", label=f"{name} p50")
        ax.plot(x, [s["p99_ms"] for s in steps], "o-", label=f"{name} p99")
    ax.axhline(P99_LIMIT_MS, color="red", lw=0.8)
    ax.set_yscale("log")
    ax.set_title("send-to-deliver latency (ms)")
    ax.set_xlabel("offered frames/s")
    ax.legend(fontsize=7)
    ax = axes[1][0]
    for name, steps in series:
        x = [s["offered_frames_per_s"] for s in steps]
        ax.plot(x, [s["server_cpu_us_per_frame"] for s in steps], "o-", label=f"{name} server")
        ax.plot(
            x, [s["generator_cpu_us_per_frame"] for s in steps], "x:", label=f"{name} generator"
        )
    ax.set_title("CPU µs per delivered frame (server process / generator)")
    ax.set_xlabel("offered frames/s")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    labels, values = [], []
    for kind in ("relay", "baseline"):
        for rec in sc.get("idle", {}).get(kind, []):
            if "rss_per_connection_kb" in rec:
                labels.append(f"{kind}\n{rec['connections']}")
                values.append(rec["rss_per_connection_kb"])
    ax.bar(labels, values, color="tab:purple")
    ax.axhline(16, color="red", lw=0.8)
    ax.set_title("RSS per idle connection (KB); red = 16 KB target")
    if "catchup" in sc and "messages_per_s" in sc["catchup"]:
        cu = sc["catchup"]
        ax.text(
            0.02,
            0.95,
            f"catch-up: {cu['messages']} msgs in {cu['seconds']} s = "
            f"{cu['messages_per_s']:.0f} msgs/s",
            transform=ax.transAxes,
            va="top",
        )
    fig.suptitle(
        f"mls-relay bench {results['meta']['started']} "
        f"({results['meta']['cpus']} shared cores; noisy)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scenarios", default=",".join(ALL_SCENARIOS))
    p.add_argument("--quick", action="store_true", help="short steps (each scenario <= ~10 s)")
    p.add_argument("--tiny", action="store_true", help="20 clients, 2 s (smoke test)")
    p.add_argument("--clients", type=int)
    p.add_argument("--group", type=int, default=10)
    p.add_argument("--size", type=int, default=1024, help="ciphertext bytes")
    p.add_argument("--workers", type=int, default=2, help="generator processes")
    p.add_argument("--rates", help="offered delivered-frames/s steps, comma separated")
    p.add_argument("--step-seconds", type=float)
    p.add_argument("--idle-counts", help="e.g. 1000,10000")
    p.add_argument("--catchup-messages", type=int)
    p.add_argument("--pg-dsn", default=os.environ.get("MLS_RELAY_TEST_PG", PG_DEFAULT))
    p.add_argument(
        "--relay-workers", type=int, default=1, help="fan-out: serve --workers N (needs Redis)"
    )
    p.add_argument(
        "--redis-url", default=os.environ.get("MLS_RELAY_TEST_REDIS", "redis://127.0.0.1:6379/0")
    )
    p.add_argument("--profile", action="store_true", help="py-spy the relay at each step")
    p.add_argument("--idle-subscribe", action="store_true", help="idle connections also #subscribe")
    p.add_argument("--no-stop", action="store_true", help="run every rate even past p99 100 ms")
    p.add_argument("--out-dir", type=Path, default=BENCH_DIR)
    return p.parse_args(argv)


def options(a: argparse.Namespace) -> Opts:
    rates = [2000, 5000, 10000, 15000, 20000, 30000, 40000, 60000, 80000, 100000, 120000, 150000]
    # (clients, rates, step_s, warm_s, budget_s, idle_counts, catch-up messages)
    if a.tiny:
        preset = (20, [500, 1000], 0.6, 0.2, 2.0, [20], 2000)
    elif a.quick:
        preset = (1000, rates, 1.0, 0.3, 20.0, [1000], 20000)
    else:
        preset = (1000, rates, 5.0, 1.0, 90.0, [1000, 10000], 100000)
    clients, rates, step_s, warm_s, budget_s, idle_counts, catchup_messages = preset
    o = Opts(
        clients=clients,
        group=a.group,
        size=a.size,
        workers=a.workers,
        rates=rates,
        step_s=step_s,
        warm_s=warm_s,
        budget_s=budget_s,
        idle_counts=idle_counts,
        catchup_messages=catchup_messages,
        profile=a.profile,
        out_dir=a.out_dir,
        no_stop=a.no_stop,
        idle_subscribe=a.idle_subscribe,
    )
    if a.clients:
        o.clients = a.clients
    if a.rates:
        o.rates = [int(x) for x in a.rates.split(",")]
    if a.step_seconds:
        o.step_s = a.step_seconds
        o.budget_s = max(o.budget_s, len(o.rates) * (o.step_s + o.warm_s + 1))
    if a.idle_counts:
        o.idle_counts = [int(x) for x in a.idle_counts.split(",")]
    if a.catchup_messages:
        o.catchup_messages = a.catchup_messages
    return o


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    opts = options(a)
    wanted = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    unknown = set(wanted) - set(ALL_SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenarios: {sorted(unknown)}")
    raise_nofile()
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "meta": {
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "argv": sys.argv[1:] if argv is None else argv,
            "cpus": os.cpu_count(),
            "cpu_model": platform.processor() or platform.machine(),
            "loadavg_before": os.getloadavg(),
            "python": platform.python_version(),
            "mode": "tiny" if a.tiny else "quick" if a.quick else "full",
            "workers": opts.workers,
            "relay_workers": a.relay_workers,
            "nofile": raise_nofile(),
        },
        "scenarios": {},
    }
    sc = results["scenarios"]
    t_all = time.monotonic()
    needs_pg = {"fanout", "idle", "catchup"} & set(wanted)
    with contextlib.ExitStack() as stack:
        dbname = url = None
        relay = None
        if needs_pg:
            dbname, url = stack.enter_context(bench_database(a.pg_dsn))
            relay = start_relay(url, a.relay_workers, a.redis_url)
            stack.callback(relay.stop)
        if "fanout" in wanted and relay:
            sc["fanout"] = fanout(relay, opts, dbname, opts.workers, "relay")
        if {"baseline", "ceiling"} & set(wanted):
            base = start_baseline()
            try:
                if "baseline" in wanted:
                    sc["baseline"] = fanout(base, opts, None, opts.workers, "baseline")
                if "ceiling" in wanted:
                    base.stop()
                    base = start_baseline()
                    sc["ceiling"] = fanout(base, opts, None, 1, "baseline_1proc")
            finally:
                base.stop()
        if "fanout" in sc and "baseline" in sc:
            sc["ratios"] = ratios(sc["fanout"], sc["baseline"])
        if "idle" in wanted and relay:
            # A fresh relay: RSS must not include the fan-out's connections.
            relay.stop()
            relay = start_relay(str(url))
            stack.callback(relay.stop)
            sc["idle"] = {"relay": idle(relay, opts, opts.workers)}
            relay.stop()
            base = start_baseline()
            try:
                sc["idle"]["baseline"] = idle(base, opts, opts.workers)
            finally:
                base.stop()
            relay = start_relay(str(url))
            stack.callback(relay.stop)
        if "catchup" in wanted and relay and url and dbname:
            sc["catchup"] = catchup(relay, url, dbname, opts)
    results["targets"] = targets(results)
    results["meta"]["loadavg_after"] = os.getloadavg()
    results["meta"]["total_s"] = round(time.monotonic() - t_all, 1)
    out = opts.out_dir / "results.json"
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    plot(results, opts.out_dir / "results.png")
    print(f"wrote {out} and {opts.out_dir / 'results.png'}")
    print(json.dumps(results["targets"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
