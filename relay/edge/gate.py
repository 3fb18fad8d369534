"""The node's front door: connection caps and an accept loop that survives EMFILE.

Every accepted socket is counted from ``accept`` on, before a byte of its
request head is read, so handshakes in progress count as much as open
WebSockets, SSE streams and HTTP keep-alive connections:

* per source address, ``RELAY_CONNECTIONS_PER_ADDRESS`` (256): beyond it the
  socket is answered ``429 {"error": "TooManyConnectionsFromAddress"}`` and
  closed.  IPv4 addresses count one by one; IPv6 addresses by their /64 (one
  subscriber's allocation: counting single IPv6 addresses would let one host
  open 2^64 of them).
* new connections per source address, ``RELAY_CONNECT_RATE_PER_ADDRESS``
  per second after a burst of ``RELAY_CONNECT_BURST_PER_ADDRESS`` (20/s,
  40; relay/edge/connrate.py): beyond it ``429 {"error":
  "TooManyConnectionAttempts", "retry_after_ms"}``, before anything of the
  request is read, so a handshake flood costs no token or signature work.
* per node, ``RELAY_MAX_CONNECTIONS`` (automatic: the file-descriptor limit
  less :data:`RESERVE_FDS`): beyond it ``503 {"error": "NodeBusy"}``.  The cap
  is always below the descriptor limit, so accept(2) itself never runs out
  and the database, Redis and blob store keep their descriptors.

At start the relay raises its soft ``RLIMIT_NOFILE`` to the hard limit
(:func:`raise_nofile_limit`).  Should accept(2) fail anyway (EMFILE, ENFILE,
ENOMEM, ENOBUFS: descriptors taken elsewhere, or another process), the accept
loop backs off (10 ms doubling to 1 s) and logs ONE line per episode, then one
when accepting works again, instead of a traceback per try.

Behind a reverse proxy every connection comes from the proxy's address.
Addresses listed in ``RELAY_TRUSTED_PROXIES`` (off by default) are exempt from
the per-address cap and rate at accept; their connection is counted instead under the
client address their ``X-Forwarded-For`` names (the rightmost entry that is
not itself a trusted proxy), once the request head is read.  Without that
setting ``X-Forwarded-For`` is ignored: a client could write anything there.

Refusals are counted in ``relay_connections_refused_total{cap}``, open
connections in ``relay_sockets_open`` and accept failures in
``relay_accept_errors_total``.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import resource
import select
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from protocol.errors import (
    NodeBusy,
    RelayError,
    TooManyConnectionAttempts,
    TooManyConnectionsFromAddress,
)
from protocol.websocket import RequestHead, json_response
from relay.base.parsing import parse_networks
from relay.edge.connrate import ConnectRate

log = logging.getLogger("relay.edge")

#: Descriptors kept free for everything but client connections: the database
#: pool, Redis, the blob store, log and data files, listeners, worker threads.
RESERVE_FDS = 128
#: accept(2) errors that mean "out of resources, try again later".
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: Refusals being written at once; past this a refused socket is closed unanswered.
MAX_REFUSING = 64
#: How long a refused socket is drained after its answer, so that closing it
#: with the client's request unread does not reset the answer away.
REFUSAL_DRAIN_S = 0.1


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise RLIMIT_NOFILE from %d to %d: %s", soft, hard, exc)
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


def address_key(address: str) -> str:
    """What the per-address cap counts: an IPv4 address, or an IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # not IP (a Unix socket): counted as it is
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def peer_address(stream: trio.SocketStream) -> str:
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return ""
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


class ConnectionGate:
    """This node's count of open connections, per address key and in total."""

    def __init__(
        self,
        per_address: int,
        max_connections: int,
        trusted: str = "",
        *,
        nofile: int = 0,
        connect_rate: float = 0.0,
        connect_burst: int = 1,
    ) -> None:
        self.per_address = per_address
        self.rate = ConnectRate(connect_rate, connect_burst)
        fd_cap = max(16, (nofile or raise_nofile_limit()) - RESERVE_FDS)
        if max_connections > fd_cap:
            log.warning(
                "RELAY_MAX_CONNECTIONS=%d is above what the file-descriptor limit leaves (%d):"
                " using %d",
                max_connections,
                fd_cap,
                fd_cap,
            )
        self.max_connections = min(max_connections, fd_cap) if max_connections else fd_cap
        self.trusted = parse_networks(trusted)
        self.by_address: Counter[str] = Counter()
        self.open = 0
        self.refused: Counter[str] = Counter()
        self.accept_errors = 0
        self.refusing = 0

    def trusts(self, address: str) -> bool:
        if not self.trusted:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def admit(self, address: str) -> RelayError | None:
        """Count a new connection from ``address``; the refusal if over a cap
        (then nothing is counted)."""
        if self.open >= self.max_connections:
            self.refused["node"] += 1
            return NodeBusy(
                f"this node holds {self.max_connections} connections; retry or use another node"
            )
        key = "" if self.trusts(address) else address_key(address)
        if key:
            refusal = self._too_fast(key) or self._too_many(key)
            if refusal is not None:
                return refusal
        self.open += 1
        if key:
            self.by_address[key] += 1
        return None

    def _too_many(self, key: str) -> RelayError | None:
        if self.per_address and self.by_address[key] >= self.per_address:
            self.refused["per_address"] += 1
            return TooManyConnectionsFromAddress(
                f"at most {self.per_address} connections from one address", retry_after_ms=1000
            )
        return None

    def _too_fast(self, key: str) -> RelayError | None:
        wait = self.rate.take(key)
        if not wait:
            return None
        self.refused["rate_per_address"] += 1
        return TooManyConnectionAttempts(
            f"at most {self.rate.rate:g} new connections per second from one address",
            retry_after_ms=max(1, int(wait * 1000 + 0.999)),
        )

    def forwarded(self, head: RequestHead) -> str | None:
        """The client a trusted proxy names in X-Forwarded-For, if any."""
        raw = b",".join(v for k, v in head.headers if k == b"x-forwarded-for")
        for item in reversed(raw.decode("latin-1").split(",")):
            address = item.strip()
            if address and not self.trusts(address):
                return address
        return None

    def admit_forwarded(self, address: str) -> RelayError | None:
        """Count a proxied connection under its client's address (the node
        count already holds it, from accept)."""
        key = address_key(address)
        refusal = self._too_fast(key) or self._too_many(key)
        if refusal is not None:
            return refusal
        self.by_address[key] += 1
        return None

    def release(self, address: str, forwarded: str | None = None) -> None:
        self.open -= 1
        key = "" if self.trusts(address) else address_key(address)
        for k in (key, address_key(forwarded) if forwarded else ""):
            if k:
                self.by_address[k] -= 1
                if self.by_address[k] <= 0:
                    del self.by_address[k]  # the table holds only addresses with connections

    def register_metrics(self, registry: CollectorRegistry) -> None:
        registry.register(_Collector(self))

    async def refuse(self, stream: trio.SocketStream, exc: RelayError) -> None:
        """Answer a refused socket with its JSON error, without reading its request,
        then close it.  The short drain after the answer lets the client read
        it (closing with unread input would reset the connection first)."""
        if self.refusing >= MAX_REFUSING:
            await trio.aclose_forcefully(stream)
            return
        self.refusing += 1
        try:
            with trio.move_on_after(1):
                await stream.send_all(json_response(exc.http_status, exc.to_body()))
                await stream.send_eof()
                with trio.move_on_after(REFUSAL_DRAIN_S):
                    while await stream.receive_some(16384):
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.refusing -= 1
            await trio.aclose_forcefully(stream)


async def accept_loop(
    listener: trio.SocketListener,
    gate: ConnectionGate,
    start: Callable[[trio.SocketStream], Awaitable[None]],
    nursery: trio.Nursery,
) -> None:
    """Accept forever, starting ``start(stream)`` in ``nursery`` for each socket.
    Out of descriptors: back off, with one log line per episode."""
    failures = 0
    pause = 0.01
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in CAPACITY_ERRNOS:
                raise
            gate.accept_errors += 1
            if not failures:
                log.error(
                    "accept failed: %s (%s); backing off until it works again"
                    " (RELAY_MAX_CONNECTIONS is %d)",
                    errno.errorcode.get(exc.errno or 0, "?"),
                    exc.strerror,
                    gate.max_connections,
                )
            failures += 1
            await trio.sleep(pause)
            pause = min(1.0, pause * 2)
            continue
        if failures:
            log.warning("accepting again after %d failed accepts", failures)
            failures, pause = 0, 0.01
        nursery.start_soon(start, stream)


class _Collector(Collector):
    def __init__(self, gate: ConnectionGate) -> None:
        self.gate = gate

    def collect(self) -> Iterator[Any]:
        refused = CounterMetricFamily(
            "relay_connections_refused",
            "Connections refused at accept by a cap (open per source address, new per"
            " second per source address, or the node's).",
            labels=["cap"],
        )
        for cap in ("per_address", "rate_per_address", "node"):
            refused.add_metric([cap], self.gate.refused.get(cap, 0))
        yield refused
        yield GaugeMetricFamily(
            "relay_sockets_open",
            "Sockets open on this node (handshakes in progress included).",
            value=self.gate.open,
        )
        yield GaugeMetricFamily(
            "relay_sockets_cap", "RELAY_MAX_CONNECTIONS in force.", value=self.gate.max_connections
        )
        yield CounterMetricFamily(
            "relay_accept_errors",
            "accept(2) failures for lack of resources (EMFILE, ENFILE, ENOMEM, ENOBUFS).",
            value=self.gate.accept_errors,
        )


async def close_listeners(
    listeners: list[trio.SocketListener],
    start: Callable[[trio.SocketStream], Awaitable[None]],
    nursery: trio.Nursery,
) -> None:
    """Close each listener once the connections the kernel already queued on
    it are accepted and handed to ``start``.

    Closing a listening socket resets every connection waiting in its
    backlog: a client (a load balancer's probe) whose connect succeeded a
    moment before would see a reset instead of the 503 or the refused
    connect it expects.  Between the last look at the backlog and the close
    there is no checkpoint, so only a connect landing in those microseconds
    is reset."""
    try:
        for listener in listeners:
            while _backlog_waiting(listener):
                # Another process sharing the socket (serve --workers) may take it first.
                with trio.move_on_after(0.1) as waited:
                    stream = await listener.accept()
                if waited.cancelled_caught:
                    break
                nursery.start_soon(start, stream)
            listener.socket.close()
    except OSError:
        pass  # out of descriptors: what is left is reset, as before
    finally:
        for listener in listeners:
            listener.socket.close()


def _backlog_waiting(listener: trio.SocketListener) -> bool:
    poll = select.poll()
    poll.register(listener.socket.fileno(), select.POLLIN)
    return bool(poll.poll(0))
