"""``mls-relay serve --workers N``: N relay processes sharing one port.

A Trio process runs on one core; a machine with more cores runs several
worker processes, each a full relay node that fans out to the others through
Redis (relay.redisbus), with PostgreSQL as the shared source of truth.

The supervisor binds the listening socket ONCE and hands the same socket to
every worker (inherited fd); the kernel gives each new connection to whichever
worker accepts first.  We chose this over each worker binding its own socket
with SO_REUSEPORT because:

* a port already taken (say, a stale relay) fails loudly at start, where
  SO_REUSEPORT would silently share it with the other process;
* connections waiting in the accept queue survive a worker crash: with
  SO_REUSEPORT each socket has its own queue, reset when its worker dies;
* a busy worker accepts less often, so load follows free capacity rather
  than a hash of the client address.

The supervisor forwards SIGTERM/SIGINT to the workers (each drains as a
single relay does), exits once they have all exited, and restarts a worker
that exits on its own, with backoff so a worker crashing at start does not
spin.  Workers run in their own session (a terminal's Ctrl-C reaches only the
supervisor, which forwards it once) and leave when the supervisor dies.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from types import FrameType

import trio

from relay.base.config import Config

log = logging.getLogger("relay.workers")

POLL_S = 0.1
MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
#: A worker that ran this long before exiting is restarted without backoff growth.
HEALTHY_RUN_S = 30.0


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=1024)
    sock.set_inheritable(True)
    return sock


def supervise(cfg: Config) -> int:
    sock = bind(cfg.host, cfg.port)
    fd = sock.fileno()
    log.info("supervisor %d: %d workers on %s:%s", os.getpid(), cfg.workers, cfg.host, cfg.port)
    command = [sys.executable, "-m", "relay.cli", "serve", "--listen-fd", str(fd)]
    return Supervisor(command, fd, cfg.workers, cfg.shutdown_deadline_s + 10).run()


class Supervisor:
    def __init__(self, command: list[str], fd: int, workers: int, stop_timeout: float) -> None:
        self._command = command
        self._fd = fd
        self._workers = workers
        self._stop_timeout = stop_timeout
        self._children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
        self._restart_at: dict[int, float] = {}
        self._backoff: dict[int, float] = {}
        self._signal: int | None = None
        self.restarts = 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only record it: the main loop forwards, so a worker started at the
        # same moment cannot miss the signal.
        self._signal = signum

    def _spawn(self, index: int) -> None:
        child = subprocess.Popen(
            [*self._command, "--worker-index", str(index)],
            pass_fds=(self._fd,),
            start_new_session=True,
        )
        self._children[index] = (child, time.monotonic())
        log.info("worker %d started (pid %d)", index, child.pid)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for index in range(self._workers):
            self._spawn(index)
        forwarded = False
        stop_deadline = 0.0
        while self._children or (self._signal is None and self._restart_at):
            if self._signal is not None and not forwarded:
                forwarded = True
                stop_deadline = time.monotonic() + self._stop_timeout
                self._restart_at.clear()
                log.info("supervisor: forwarding signal %d to workers", self._signal)
                for child, _ in self._children.values():
                    child.send_signal(self._signal)
            if forwarded and time.monotonic() > stop_deadline:
                for child, _ in self._children.values():
                    child.kill()
            self._reap()
            now = time.monotonic()
            for index, at in list(self._restart_at.items()):
                if now >= at:
                    del self._restart_at[index]
                    self.restarts += 1
                    self._spawn(index)
            time.sleep(POLL_S)
        log.info("supervisor: all workers exited")
        return 0

    def _reap(self) -> None:
        for index, (child, started) in list(self._children.items()):
            code = child.poll()
            if code is None:
                continue
            del self._children[index]
            if self._signal is not None:
                continue
            ran = time.monotonic() - started
            backoff = self._backoff.get(index, MIN_BACKOFF_S / 2)
            backoff = MIN_BACKOFF_S if ran > HEALTHY_RUN_S else min(backoff * 2, MAX_BACKOFF_S)
            self._backoff[index] = backoff
            self._restart_at[index] = time.monotonic() + backoff
            log.warning(
                "worker %d (pid %d) exited with %s after %.1fs; restarting in %.1fs",
                index,
                child.pid,
                code,
                ran,
                backoff,
            )


# --- inside a worker -------------------------------------------------------------


def worker_config(cfg: Config, index: int) -> Config:
    """A configured node id must stay unique per process (it names the node in
    #hello and in Redis client names); without one, Relay uses host-pid."""
    return replace(cfg, node_id=f"{cfg.node_id}-w{index}") if cfg.node_id else cfg


def inherited_listeners(fd: int) -> list[trio.SocketListener]:
    sock = socket.socket(fileno=fd)
    return [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]


async def leave_with_parent(parent: int) -> None:
    """A worker outlives a SIGKILLed supervisor only until it notices: then it
    drains like on SIGTERM (same signal path as an operator's stop)."""
    while os.getppid() == parent:  # noqa: ASYNC110 (no event to wait on: poll the OS)
        await trio.sleep(1)
    log.warning("supervisor %d is gone; shutting down", parent)
    os.kill(os.getpid(), signal.SIGTERM)
