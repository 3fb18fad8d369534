"""``mls-relay`` command line: serve, migrate, healthcheck, token, inspect,
check, bench, tail."""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator

import trio

from protocol.errors import RelayError
from relay.base.config import ConfigError, from_env, redacted, validate, with_dev_secret

log = logging.getLogger("relay")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # everything after it is bench's own (argparse would parse "-x")
        from relay.ops.check import bench as run_bench

        return run_bench(argv[1:])
    if argv[:1] == ["tail"] and importlib.util.find_spec("mls_relay_client") is None:
        print(_NO_CLIENT, file=sys.stderr)  # before parsing: its options are the client's
        return 2
    parser = argparse.ArgumentParser(prog="mls-relay", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the relay (WebSocket + HTTP on one port)")
    serve.add_argument("--port", type=int, help="listen port (default $PORT or 3000)")
    serve.add_argument("--host", help="listen address (default 0.0.0.0)")
    serve.add_argument(
        "--workers", type=int, help="processes serving the port (default 1; >1 needs REDIS_URL)"
    )
    # Internal: how the --workers supervisor starts each worker (relay.workers).
    serve.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    sub.add_parser("migrate", help="apply database migrations (idempotent)")
    health = sub.add_parser("healthcheck", help="exit 0 if the local relay is ready")
    health.add_argument("--url", help="base URL (default http://127.0.0.1:$PORT)")
    sub.add_parser("config", help="print the effective configuration, secrets redacted")
    token = sub.add_parser("token", help="mint a development token with the configured secret")
    token.add_argument("user", help="user DID, e.g. did:example:alice")
    token.add_argument("--device", default="dev1")
    token.add_argument("--lifetime", type=int, default=3600, help="seconds")
    from relay.ops.inspect import DESCRIPTION as INSPECT_DESCRIPTION
    from relay.ops.inspect import add_arguments as inspect_arguments

    inspect = sub.add_parser(
        "inspect", help="decode an MLS object and print JSON", description=INSPECT_DESCRIPTION
    )
    inspect_arguments(inspect)  # real options: they work in any order, --help answers
    sub.add_parser("check", help="print the configuration and test database / Redis access")
    # Listed for --help only: main() hands "bench ..." to bench/run.py before
    # parsing, which answers "mls-relay bench --help" itself.
    sub.add_parser("bench", help="run bench/run.py (source checkout; --help for its options)")
    _add_tail(sub.add_parser("tail", help="print a device's events as JSON lines (debugging)"))
    args = parser.parse_args(argv)
    if args.command == "inspect":
        from relay.ops.inspect import run as inspect_run

        return inspect_run(args)
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"mls-relay: configuration error: {exc.message}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    cfg = from_env()
    if args.port is not None:
        cfg = replace(cfg, port=args.port)
    if args.host:
        cfg = replace(cfg, host=args.host)
    if args.workers is not None:
        cfg = replace(cfg, workers=args.workers)
        validate(cfg)
    cfg = with_dev_secret(cfg)
    from relay.base.logs import configure as configure_logs

    configure_logs(cfg.log_level, cfg.log_format)
    if cfg.workers > 1 and args.listen_fd is None:
        from relay.ops.workers import supervise

        return supervise(cfg)
    if args.listen_fd is not None:
        from relay.ops.workers import worker_config

        cfg = worker_config(cfg, args.worker_index)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_run_server, cfg, args.listen_fd)
    return 0


async def _run_server(cfg: object, listen_fd: int | None = None) -> None:
    from relay.base.config import Config
    from relay.node import Relay
    from relay.ops.workers import inherited_listeners, leave_with_parent

    assert isinstance(cfg, Config)
    relay = Relay(cfg)
    if listen_fd is None:
        listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.host)
    else:  # a worker: the supervisor bound the port (relay.workers)
        listeners = inherited_listeners(listen_fd)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            if listen_fd is not None:
                nursery.start_soon(leave_with_parent, os.getppid())
            await nursery.start(relay.run, listeners)
            # Everything imported and built at start lives as long as the
            # process: keep it out of the collector's full passes, which
            # otherwise scanned ~100k such objects (~50 ms pauses under load).
            gc.collect()
            gc.freeze()
            port = listeners[0].socket.getsockname()[1]
            log.info(
                "mls-relay listening on %s:%s (ws path %s, database %s)",
                cfg.host,
                port,
                cfg.ws_path,
                redacted(cfg)["DATABASE_URL"] or cfg.effective_database_url,
            )
            await _drain_on_signal(relay, cfg, signals)
            nursery.cancel_scope.cancel()


async def _drain_on_signal(relay: object, cfg: object, signals: AsyncIterator[int]) -> None:
    """The first SIGTERM/SIGINT drains (relay/ops/shutdown.py); a second one ends
    the drain grace period at once (the deadline still bounds the rest)."""
    from relay.base.config import Config
    from relay.node import Relay
    from relay.ops.shutdown import graceful_shutdown

    assert isinstance(relay, Relay) and isinstance(cfg, Config)
    async for _ in signals:
        break
    log.info(
        "shutdown requested; draining (grace %ss, deadline %ss)",
        cfg.drain_grace_s,
        cfg.shutdown_deadline_s,
    )
    hurry = trio.Event()
    async with trio.open_nursery() as nursery:

        async def second_signal() -> None:
            async for _ in signals:
                log.info("second signal: ending the drain grace period now")
                hurry.set()
                return

        nursery.start_soon(second_signal)
        await graceful_shutdown(relay, hurry)
        nursery.cancel_scope.cancel()


def _migrate(args: argparse.Namespace) -> int:
    from storage import open_storage

    cfg = from_env()

    async def run() -> None:
        storage = open_storage(cfg.effective_database_url, pool_min=1, pool_max=2)
        try:
            await storage.migrate()
        finally:
            await storage.aclose()

    try:
        trio.run(run)
    except RelayError as exc:
        print(f"mls-relay migrate: {exc.error}: {exc.message}", file=sys.stderr)
        return 1
    print("migrations applied")
    return 0


def _healthcheck(args: argparse.Namespace) -> int:
    cfg = from_env()
    url = (args.url or f"http://127.0.0.1:{cfg.port}").rstrip("/") + "/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1


def _config(args: argparse.Namespace) -> int:
    print(json.dumps(redacted(from_env()), indent=2, default=str))
    return 0


def _token(args: argparse.Namespace) -> int:
    import jwt

    cfg = with_dev_secret(from_env())
    if not cfg.jwt_secret:
        print("mls-relay token: needs an HS256 secret (RELAY_JWT_SECRET)", file=sys.stderr)
        return 2
    now = int(time.time())
    claims = {
        "sub": args.user,
        "aud": cfg.service_id,
        "iat": now,
        "exp": now + args.lifetime,
        "jti": uuid.uuid4().hex,
        cfg.device_claim: args.device,
    }
    print(jwt.encode(claims, cfg.jwt_secret, algorithm="HS256"))
    return 0


def _check(args: argparse.Namespace) -> int:
    from relay.ops.check import check

    return check()


#: tail is the Python client's (clients/python), a distribution of its own: the
#: server runs without it, so only this command needs it (docs/ARCHITECTURE.md).
_NO_CLIENT = (
    "mls-relay tail: needs the Python client: pip install ./clients/python "
    "(from the source checkout), or run mls-relay-tail where it is installed"
)


def _add_tail(parser: argparse.ArgumentParser) -> None:
    if importlib.util.find_spec("mls_relay_client") is None:
        parser.description = _NO_CLIENT  # listed in --help all the same
        return
    from mls_relay_client.tail import add_arguments

    add_arguments(parser)


def _tail(args: argparse.Namespace) -> int:
    from mls_relay_client.tail import main as tail_main

    cfg = from_env()
    return tail_main(args, cfg.port, cfg.ws_path)


_COMMANDS = {
    "check": _check,
    "tail": _tail,
    "serve": _serve,
    "migrate": _migrate,
    "healthcheck": _healthcheck,
    "config": _config,
    "token": _token,
}

if __name__ == "__main__":
    sys.exit(main())
