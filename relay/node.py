"""The relay node: wiring of storage, committer, hub, sessions and HTTP.

One process, one port: :mod:`relay.edge.server` reads each connection's request
head and keeps WebSocket upgrades on the relay's own hot path, handing every
other request to the Quart app through Hypercorn's connection handler.

Only this module builds the parts, and each gets the collaborators it uses
(storage, the blob service, config values, incidents, a metrics registry,
callables) rather than the node: only the node, :mod:`relay.ops` above it
and :mod:`relay.cli` import this module (pyproject.toml's layers contract).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from protocol.requests import RequestLimits
from relay import __version__
from relay.base.config import Config
from relay.base.incidents import Incidents
from relay.base.ratelimits import RateLimits
from relay.cluster.presence import Presence
from relay.cluster.sharedlimits import ClaimLimits, SharedRedis
from relay.delivery.committer import Committer
from relay.delivery.fanout import FanOut, LocalFanOut
from relay.delivery.hub import Hub, Published
from relay.delivery.outbox import Flusher
from relay.edge.auth import AuthConfig, Authenticator
from relay.edge.handlers import HandlerParts
from relay.edge.parts import EdgeParts
from relay.edge.reader import NodeReader
from relay.edge.registry import SessionRegistry
from relay.mls.service import DeliveryService
from relay.offline.blobs import Blobs
from relay.offline.delivery_state import DeliveryTracker
from relay.offline.push import PushConfig, Pusher, parse_providers
from relay.offline.retention import Retention, SingleUseTokens
from relay.ops.metrics import RelayMetrics, Sampled
from storage import open_storage
from storage.base import Storage
from storage.blobstore import open_blob_store

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from relay.offline.push import PushTarget

log = logging.getLogger("relay")


@dataclass
class State:
    shutting_down: bool = False


class Relay:
    """One node: builds every part with the collaborators it uses, runs them."""

    def __init__(self, config: Config, storage: Storage | None = None) -> None:
        self.config = config
        self.server_name = f"mls-relay/{__version__}"
        self.node_id = config.node_id or f"{socket.gethostname()}-{os.getpid()}"
        self.limits = RequestLimits(max_ciphertext=config.max_ciphertext)
        self.node_limits = RateLimits(
            connections_per_user=config.connections_per_user,
            requests_per_connection=config.requests_per_connection,
            requests_per_user=config.requests_per_user,
            rate_limit_strikes=config.rate_limit_strikes,
        )
        self.flusher = Flusher()
        self.reader = NodeReader(self.flusher)
        self.hub = Hub(self.flusher)
        #: The node's connections by device: displacement, heartbeats, token expiry.
        self.registry = SessionRegistry(self.hub, config.ping_interval_s, self._registered)
        self.fanout: FanOut = LocalFanOut(self.hub)
        if config.redis_url:  # several nodes: fan out through Redis (relay.redisbus)
            from relay.cluster.redisbus import RedisFanOut

            self.fanout = RedisFanOut(
                self.hub,
                config.redis_url,
                config.redis_prefix,
                node_id=self.node_id,
                on_displaced=self.registry.displaced_elsewhere,
            )
        #: Built here, connected on first use; the embedded default migrates in run().
        self._own_storage = storage is None
        if storage is None:
            storage = open_storage(
                config.effective_database_url,
                pool_min=config.pool_min,
                pool_max=config.pool_max,
                pg_timeouts=config.pg_timeouts,
            )
        self.storage = storage
        self.authenticator = Authenticator(
            AuthConfig(
                audience=config.service_id,
                hs256_secret=config.jwt_secret or None,
                jwks_path=config.jwks_file or None,
                device_claim=config.device_claim,
                max_lifetime_s=config.max_token_lifetime_s,
            )
        )
        self.state = State()
        self.metrics_slow_consumers = 0
        #: Closes the port, answering what was already accepted (set by
        #: relay.edge.server once listening; relay/ops/shutdown.py).
        self.stop_accepting: Callable[[], Awaitable[None]] = trio.lowlevel.checkpoint
        self._committer: Committer | None = None
        #: The relay's task nursery once running (SSE streams start tasks in it).
        self.nursery: trio.Nursery | None = None
        self._build_services()
        #: What request handlers use (relay/edge/handlers.py).
        self.handler_parts = HandlerParts(
            self.storage,
            self.mls,
            self.hub,
            self.fanout,
            self.blobs,
            self.config,
            self.push_providers,
            self.node_limits,
        )
        #: What sessions, SSE streams and the upgrade use (relay/edge/parts.py).
        self.edge_parts = self._edge_parts()

    def _build_services(self) -> None:
        """Every part gets what it uses (storage, config values, incidents), never the node."""
        cfg, storage = self.config, self.storage
        #: Unexpected failures (InternalError replies) and poisoned rows dropped.
        self.incidents = incidents = Incidents()
        store = open_blob_store(cfg.blob_url, cfg.data_dir)
        self.blobs = Blobs(
            storage,
            store,
            incidents,
            quota_bytes=cfg.blob_quota_bytes,
            orphan_ttl_s=cfg.blob_orphan_ttl_s,
        )
        self.delivery = DeliveryTracker(
            storage,
            lambda: self.registry.sessions.values(),
            incidents,
            flush_s=cfg.delivery_flush_s,
        )
        #: Retention and used-token purge (relay/offline/retention.py).
        self.retention = Retention(
            storage,
            self.blobs,
            incidents,
            days=cfg.retention_days,
            interval_s=cfg.retention_interval_s,
            token_single_use=cfg.token_single_use,
        )
        self.tokens = SingleUseTokens(
            storage,
            enabled=cfg.token_single_use,
            leeway_s=self.authenticator.config.leeway_s,
        )
        self._build_push()
        #: Per-relay registry: several relays may share one process (tests).
        self.metrics = RelayMetrics(self.node_id, incidents, self._sampled())
        if cfg.redis_url:
            from relay.cluster.redisbus import RedisFanOut

            assert isinstance(self.fanout, RedisFanOut)
            self.fanout.observe_lag = self.metrics.observe_fanout_lag
        #: Connection leases and claim limits across nodes (relay/cluster/presence.py).
        self.presence = self._build_presence()
        claims = ClaimLimits(
            self.presence.redis, cfg.claim_rate_per_min, cfg.claim_target_rate_per_min
        )
        #: The MLS delivery service (relay/mls/service.py).
        self.mls = DeliveryService(storage, self.blobs, cfg, claims)

    def _sampled(self) -> Sampled:
        return Sampled(
            hub=self.hub,
            storage=self.storage,
            blobs=self.blobs,
            delivery=self.delivery,
            pusher=self.pusher,
            committer=lambda: self._committer,
            slow_consumers=lambda: self.metrics_slow_consumers,
            pool_max=self.config.pool_max,
        )

    def _build_presence(self) -> Presence:
        cfg = self.config
        name = f"{cfg.redis_prefix}{self.node_id}"
        redis = SharedRedis(cfg.redis_url, cfg.redis_prefix, name=name)
        redis.register_metrics(self.metrics.registry)
        return Presence(
            self.node_limits,
            redis,
            self.node_id,
            lease_ttl=cfg.presence_lease_ttl_s,
            incidents=self.incidents,
        )

    def _build_push(self) -> None:
        """Push for offline devices (docs/PROTOCOL.md, "Offline devices")."""
        cfg = self.config
        self.push_providers = parse_providers(cfg.push_providers)
        self.pusher: Pusher | None = None
        if self.push_providers:
            push_config = PushConfig(
                self.push_providers, secret=cfg.push_secret, queue_limit=cfg.push_queue
            )
            self.pusher = Pusher(
                push_config, self._push_targets, self._online, self._push_gone, self.incidents
            )

    async def _push_targets(self, conversations: list[bytes]) -> dict[bytes, list[PushTarget]]:
        """The pusher's resolve(): which devices of these conversations take pushes."""
        return await self.storage.push_registrations(conversations)

    async def _online(self, pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """Devices connected right now to any node (relay/cluster/presence.py)."""
        return await self.presence.online(pairs)

    async def _push_gone(self, target: PushTarget) -> None:
        """The provider says the token is dead: stop pushing to it (idempotent;
        a token the device registered since is kept)."""
        await self.storage.drop_push_token(target.user, target.device, target.token)

    def _on_published(self, messages: list[Published]) -> None:
        pusher = self.pusher
        if pusher is not None:
            for m in messages:
                pusher.offer(m.conversation, m.seq, m.sender, m.device)

    @property
    def committer(self) -> Committer:
        assert self._committer is not None, "relay not started"
        return self._committer

    async def run(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        from relay.edge.http.frontend import HttpFrontend
        from relay.edge.server import serve_listeners

        if self._own_storage and self.config.effective_database_url.startswith("sqlite"):
            await self.storage.migrate()  # the embedded default migrates itself
        self._committer = Committer(
            self.storage,
            self.fanout,
            self.flusher,
            max_batch=self.config.commit_batch,
            queue=self.config.commit_queue,
            linger=self.config.commit_linger_ms / 1000,
            incidents=self.incidents,
            observer=self.metrics.observe_batch,
            on_published=self._on_published,
        )
        self.reader.committer = self._committer
        http = HttpFrontend(self.http_app())
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.fanout.run)
                await nursery.start(self.presence.run)
                nursery.start_soon(self._committer.run)
                nursery.start_soon(self.metrics.run_sampler)
                if self.retention.enabled:
                    nursery.start_soon(self.retention.run)
                nursery.start_soon(self.registry.sweep)
                nursery.start_soon(self.delivery.run)
                nursery.start_soon(self.blobs.run)
                if self.pusher is not None:
                    await nursery.start(self.pusher.run)
                nursery.start_soon(self.reader.run)
                if self.config.redis_url:
                    nursery.start_soon(self._share_status)
                self.nursery = nursery
                await http.startup()
                await nursery.start(serve_listeners, self.edge_parts, http, listeners)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await http.shutdown()
                await self.blobs.aclose()
                await self.storage.aclose()

    async def _share_status(self) -> None:
        """Several nodes: the status page lists the others (relay/cluster/peers.py)."""
        from relay.cluster.peers import Summary, share_node_status

        peers: list[Summary] = []
        self.metrics.peer_nodes = lambda: list(peers)
        cfg = self.config
        await share_node_status(
            cfg.redis_url, cfg.redis_prefix, self.node_id, self.metrics.node_summary, peers
        )

    def http_app(self) -> QuartTrio:
        """The HTTP app on the relay's port (relay/edge/http/frontend.py)."""
        import relay.edge.sse as sse
        import relay.ops.status as status
        from relay.edge.http.frontend import AppParts, create_app
        from relay.edge.http.limits import HttpLimits

        cfg, metrics = self.config, self.metrics
        limits = HttpLimits(
            self.authenticator,
            metrics.error,
            metrics.registry,
            requests_per_user=cfg.http_requests_per_user,
            transfers_per_user=cfg.transfers_per_user,
            transfers=cfg.transfers,
        )
        fanout = self.fanout
        return create_app(
            AppParts(
                config=cfg,
                storage=self.storage,
                limits=limits,
                mls=self.mls,
                blobs=self.blobs,
                count_error=metrics.error,
                shutting_down=self._shutting_down,
                fanout_healthy=(lambda: fanout.healthy) if cfg.redis_url else None,
                routes=(
                    lambda app: status.register(app, metrics, self._shutting_down),
                    lambda app: sse.register(app, self.edge_parts),
                ),
            )
        )

    def _shutting_down(self) -> bool:
        return self.state.shutting_down

    def _edge_parts(self) -> EdgeParts:
        return EdgeParts(
            config=self.config,
            server_name=self.server_name,
            node_id=self.node_id,
            flusher=self.flusher,
            reader=self.reader,
            storage=self.storage,
            hub=self.hub,
            registry=self.registry,
            metrics=self.metrics,
            node_limits=self.node_limits,
            request_limits=self.limits,
            handlers=self.handler_parts,
            presence=self.presence,
            authenticator=self.authenticator,
            tokens=self.tokens,
            committer=lambda: self.committer,
            nursery=lambda: self.nursery,
            shutting_down=self._shutting_down,
            slow_consumer=self._slow_consumer,
            listening=self._listening,
        )

    def _slow_consumer(self) -> None:
        self.metrics_slow_consumers += 1

    def _listening(self, stop_accepting: Callable[[], Awaitable[None]]) -> None:
        self.stop_accepting = stop_accepting

    # --- sessions -------------------------------------------------------------

    def _registered(self, user: str, device: str, at: float) -> None:
        """A device connected here: count it, and displace it on other nodes."""
        self.delivery.connected(user, device)
        self.fanout.displace(user, device, at)
