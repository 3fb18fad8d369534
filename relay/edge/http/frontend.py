"""The HTTP surface (Quart on Hypercorn), sharing the relay's one port.

Connections that are not WebSocket upgrades on the relay path arrive here
with the bytes already read; :class:`PrefixedStream` replays them into
Hypercorn's per-connection server.  The ASGI ``send`` is shielded from
cancellation: without it, Quart-Trio on Hypercorn never closed HTTP
connections (neither on ``Connection: close`` nor on keep-alive timeout).
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app
from quart import has_request_context, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from protocol.errors import QuotaExceeded, RelayError
from relay import __version__
from relay.edge.http.blobs import blueprint as blobs_blueprint
from relay.edge.http.body import SCOPE_KEY, RequestBody, wrap_receive
from relay.edge.http.keypackages import blueprint as keypackages_blueprint
from relay.edge.http.limits import HttpLimits, run_cleanup

if TYPE_CHECKING:
    from relay.base.config import Config
    from relay.mls.service import DeliveryService
    from relay.offline.blobs import Blobs
    from storage.base import Storage

log = logging.getLogger("relay.http")


class PrefixedStream:
    """A SocketStream whose first bytes were already read by the router."""

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix
        self.socket = stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            return data
        return bytes(await self._stream.receive_some(max_bytes))

    async def send_all(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


def _shielded(app: Any) -> Any:
    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        async def shielded_send(message: Any) -> None:
            with trio.CancelScope(shield=True):
                await send(message)

        try:
            # Bodies reach routes through relay/edge/http/body.py, never Quart's buffer.
            await app(scope, wrap_receive(scope, receive), shielded_send)
        finally:
            await run_cleanup(
                scope
            )  # concurrency slots, open blob readers (relay/edge/http/limits.py)

    return asgi


@dataclass(frozen=True, slots=True)
class AppParts:
    """What the HTTP app serves from (built by relay/node.py)."""

    config: Config
    storage: Storage
    limits: HttpLimits
    mls: DeliveryService
    blobs: Blobs
    #: Counts an error reply by its protocol name (relay_errors_total{type}).
    count_error: Callable[[str], None]
    shutting_down: Callable[[], bool]
    #: The cross-node fan-out's health; None: one node (no Redis).
    fanout_healthy: Callable[[], bool] | None
    #: More routes, registered last (the status pages, the SSE stream).
    routes: Sequence[Callable[[QuartTrio], None]] = ()


class HttpFrontend:
    def __init__(self, app: QuartTrio) -> None:
        self.app = app
        self.config = HypercornConfig()
        self.config.keep_alive_timeout = 5
        self.config.access_log_format = ""
        self._asgi = wrap_app(_shielded(self.app), self.config.wsgi_max_body_size, "asgi")
        self._context = WorkerContext(None)

    async def startup(self) -> None:
        """Nothing to start: the app has no before/after-serving hooks, and
        Quart-Trio's lifespan expects to own a nursery we do not give it."""

    async def shutdown(self) -> None:
        """See startup()."""

    async def serve_connection(self, stream: trio.SocketStream, prefix: bytes) -> None:
        wrapped = PrefixedStream(stream, prefix)
        server = TCPServer(self._asgi, self.config, self._context, {}, wrapped)  # type: ignore[arg-type]
        await server.run()


def _jsonable(value: Any) -> Any:
    """Error details as JSON: byte strings (conversation ids) in standard base64."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _error(exc: RelayError) -> Any:
    response = jsonify(_jsonable(exc.to_body()))
    response.status_code = exc.http_status
    return _close_if_unread(response)


def _close_if_unread(response: Any) -> Any:
    """A refusal sent before the route read the body closes the connection:
    draining what the client still sends would cost what the refusal saved."""
    body = request.scope.get(SCOPE_KEY) if has_request_context() else None
    if isinstance(body, RequestBody) and not (body.received or body.consumed):
        response.headers["Connection"] = "close"
    return response


def _http_error(exc: HTTPException) -> Any:
    """The framework's own refusals (404, 405, 408, 413, ...) as JSON too."""
    name = "".join(word.capitalize() for word in (exc.name or "Error").split())
    code = exc.code or 500
    response = jsonify({"error": name, "message": exc.description or name})
    response.status_code = code
    return _close_if_unread(response)


def create_app(parts: AppParts) -> QuartTrio:
    app = QuartTrio("mls-relay")
    cfg, limits, storage = parts.config, parts.limits, parts.storage
    kp_routes = keypackages_blueprint(
        parts.mls,
        storage,
        limits,
        max_upload=cfg.keypackage_max_upload,
        max_per_device=cfg.max_keypackages_per_device,
        max_devices=cfg.max_keypackage_devices_per_user,
        idle_timeout=cfg.handshake_timeout_s,
    )
    app.register_blueprint(kp_routes)  # MLS DS routes
    blob_routes = blobs_blueprint(
        parts.blobs, storage, limits, max_blob=cfg.max_blob, idle_timeout=cfg.handshake_timeout_s
    )
    app.register_blueprint(blob_routes)  # out-of-line ciphertext
    _error_handlers(app, parts.count_error)
    _health_routes(app, parts)
    for register in parts.routes:  # observability and SSE routes live in their own modules
        register(app)
    return app


def _error_handlers(app: QuartTrio, count_error: Callable[[str], None]) -> None:
    @app.errorhandler(RelayError)
    async def relay_error(exc: RelayError) -> Any:
        if isinstance(exc, QuotaExceeded):  # relay_errors_total{type}, as over the WebSocket
            count_error(exc.error)
        return _error(exc)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Any:
        return _http_error(exc)

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Any:
        # A bug: JSON like every other error, and an id to find it in the log.
        incident = secrets.token_hex(6)
        log.error("HTTP request failed", exc_info=exc, extra={"incident": incident})
        count_error("InternalError")
        body = {"error": "InternalError", "message": "internal error", "incident": incident}
        response = jsonify(body)
        response.status_code = 500
        return _close_if_unread(response)

    @app.errorhandler(404)
    async def not_found(exc: Exception) -> Any:
        return jsonify({"error": "NotFound", "message": "no such route"}), 404

    @app.errorhandler(405)
    async def not_allowed(exc: Exception) -> Any:
        return jsonify({"error": "MethodNotAllowed", "message": "method not allowed"}), 405


def _health_routes(app: QuartTrio, parts: AppParts) -> None:
    @app.get("/health/live")
    async def live() -> Any:
        return jsonify({"status": "alive", "timestamp": int(time.time())})

    @app.get("/health/ready")
    async def ready() -> Any:
        checks = await _checks(parts)
        shutting_down = parts.shutting_down()
        ok = checks["database"] == "healthy" and not shutting_down
        body = {
            "status": "ready" if ok else "not_ready",
            "timestamp": int(time.time()),
            "checks": checks,
            "shutting_down": shutting_down,
        }
        return jsonify(body), 200 if ok else 503

    @app.get("/health")
    async def health() -> Any:
        checks = await _checks(parts)
        if parts.fanout_healthy is not None:
            # Several nodes: a broken fan-out must not look green (a known
            # failure of other relays).  "degraded", not "unhealthy": this node
            # still serves its own clients and repairs from the database later.
            checks["fanout"] = "healthy" if parts.fanout_healthy() else "degraded"
        ok = all(v == "healthy" for v in checks.values())
        degraded = not ok and all(v in ("healthy", "degraded") for v in checks.values())
        body = {
            "status": "healthy" if ok else "degraded" if degraded else "unhealthy",
            "timestamp": int(time.time()),
            "version": __version__,
            "checks": checks,
        }
        return jsonify(body), 200 if ok or degraded else 503


async def _checks(parts: AppParts) -> dict[str, str]:
    database = "healthy"
    try:
        with trio.fail_after(2):
            await parts.storage.ping()
    except (RelayError, trio.TooSlowError):
        database = "unhealthy"
    return {"database": database, "memory": _memory_check(parts.config.memory_limit_mb)}


def _memory_check(limit: int) -> str:
    if not limit:
        return "healthy"
    try:
        with open("/proc/self/statm") as fh:
            rss_pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return "healthy"
    rss_mb = rss_pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    return "healthy" if rss_mb < limit else "unhealthy"
