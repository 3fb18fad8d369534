"""``mls-relay check`` and ``mls-relay bench``: operator commands beside serve.

check prints the effective configuration (secrets redacted) and then tries
every service the configuration names, so a bad DATABASE_URL or an
unreachable Redis shows up before a deploy rather than in the first client's
error.  It exits 1 if any check fails (2 for an invalid configuration).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio

from relay.base.config import Config, from_env, redacted

CHECK_TIMEOUT_S = 10.0


async def _check_database(cfg: Config) -> None:
    from storage import open_storage

    storage = open_storage(cfg.effective_database_url, pool_min=0, pool_max=1)
    try:
        await storage.ping()
    finally:
        await storage.aclose()


async def _check_redis(cfg: Config) -> None:
    import coredis
    from coredis.retry import NoRetryPolicy

    client: coredis.Redis[bytes] = coredis.Redis.from_url(
        cfg.redis_url, retry_policy=NoRetryPolicy(), connect_timeout=5
    )
    async with client:
        reply = await client.ping()
    if reply not in (b"PONG", "PONG", True):
        raise RuntimeError(f"unexpected PING reply {reply!r}")


async def _check_blobs(cfg: Config) -> None:
    from storage.blobstore import open_blob_store

    store = open_blob_store(cfg.blob_url, cfg.data_dir)
    try:
        await store.ping()
    finally:
        await store.aclose()


async def _run_checks(cfg: Config) -> dict[str, str]:
    checks = {"database": _check_database}
    if cfg.redis_url:
        checks["redis"] = _check_redis
    if cfg.blob_url:
        checks["blobs"] = _check_blobs
    results: dict[str, str] = {}
    for name, check in checks.items():
        try:
            with trio.fail_after(CHECK_TIMEOUT_S):
                await check(cfg)
        except trio.TooSlowError:
            results[name] = f"FAILED: no answer within {CHECK_TIMEOUT_S:.0f}s"
        except Exception as exc:  # drivers raise many kinds (and groups): report them all
            results[name] = f"FAILED: {_describe(exc)}"
        else:
            results[name] = "ok"
    return results


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]  # coredis and trio wrap the real cause in groups
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}"


def check() -> int:
    cfg = from_env()
    print("configuration:")
    print(json.dumps(redacted(cfg), indent=2, default=str))
    results = trio.run(_run_checks, cfg)
    print("connectivity:")
    for name, outcome in results.items():
        print(f"  {name}: {outcome}")
    return 0 if all(v == "ok" for v in results.values()) else 1


def bench(args: list[str]) -> int:
    """Exec bench/run.py from the repository root, passing the arguments through."""
    root = Path(__file__).resolve().parents[2]
    script = root / "bench" / "run.py"
    if not script.is_file():
        print(
            f"mls-relay bench: {script} not found: the benchmark ships with the "
            "source repository, not the installed package",
            file=sys.stderr,
        )
        return 2
    os.chdir(root)
    # bench/ is a package (run.py uses relative imports): run it as one.
    target = ["-m", "bench.run"] if (root / "bench" / "__init__.py").is_file() else [str(script)]
    os.execv(sys.executable, [sys.executable, *target, *args])
