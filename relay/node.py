"""The relay node: wiring of storage, committer, hub, sessions and HTTP.

One process, one port: :mod:`relay.edge.server` reads each connection's request
head and keeps WebSocket upgrades on the relay's own hot path, handing every
other request to the Quart app through Hypercorn's connection handler.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from protocol.requests import Limits
from relay import __version__
from relay.base.config import Config
from relay.base.ratelimits import Limits as NodeLimits
from relay.cluster.presence import Presence
from relay.delivery.committer import Committer
from relay.delivery.fanout import FanOut, LocalFanOut
from relay.delivery.hub import Hub, Published
from relay.delivery.outbox import Flusher
from relay.edge.auth import AuthConfig, Authenticator
from relay.edge.handlers import HandlerParts
from relay.edge.reader import NodeReader
from relay.edge.registry import SessionRegistry
from relay.mls.service import for_relay
from relay.offline.retention import Retention
from relay.ops.metrics import RelayMetrics
from storage import open_storage
from storage.base import Storage

if TYPE_CHECKING:
    from relay.offline.push import PushTarget

log = logging.getLogger("relay")


@dataclass
class State:
    shutting_down: bool = False


class Relay:
    #: What request handlers use (relay/edge/handlers.py), once running.
    handler_parts: HandlerParts

    def __init__(self, config: Config, storage: Storage | None = None) -> None:
        self.config = config
        self.server_name = f"mls-relay/{__version__}"
        self.node_id = config.node_id or f"{socket.gethostname()}-{os.getpid()}"
        self.limits = Limits(max_ciphertext=config.max_ciphertext)
        self.node_limits = NodeLimits(
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
        self._storage = storage
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
        #: relay.server once listening; relay/ops/shutdown.py).
        self.stop_accepting: Callable[[], Awaitable[None]] = trio.lowlevel.checkpoint
        self._committer: Committer | None = None
        #: Per-relay registry: several relays may share one process (tests).
        self.metrics = RelayMetrics(self)
        if config.redis_url:
            from relay.cluster.redisbus import RedisFanOut

            assert isinstance(self.fanout, RedisFanOut)
            self.fanout.observe_lag = self.metrics.observe_fanout_lag
        #: The relay's task nursery once running (SSE streams start tasks in it).
        self.nursery: trio.Nursery | None = None
        #: Retention and used-token purge (relay/offline/retention.py).
        self.retention = Retention(self)
        #: Connection leases and claim limits across nodes (relay/cluster/presence.py).
        self.presence = Presence.for_relay(self)
        self._wire_offline_devices()

    def _wire_offline_devices(self) -> None:
        """Blob storage, delivery state and push (docs/PROTOCOL.md, "Offline devices")."""
        from relay.offline.blobs import Blobs
        from relay.offline.delivery_state import DeliveryTracker
        from relay.offline.push import PushConfig, Pusher, parse_providers

        cfg = self.config
        self.blobs = Blobs(self)
        self.delivery = DeliveryTracker(self)
        self.push_providers = parse_providers(cfg.push_providers)
        self.pusher: Pusher | None = None
        if self.push_providers:
            push_config = PushConfig(
                self.push_providers, secret=cfg.push_secret, queue_limit=cfg.push_queue
            )
            self.pusher = Pusher(push_config, self._push_targets, self._online, self._push_gone)
            self.pusher.incidents = self.metrics.incidents

    async def _push_targets(self, conversations: list[bytes]) -> dict[bytes, list[PushTarget]]:
        """The pusher's resolve(): storage opens only in run(), so look it up per call."""
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
    def storage(self) -> Storage:
        assert self._storage is not None, "relay not started"
        return self._storage

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

        if self._storage is None:
            self._storage = open_storage(
                self.config.effective_database_url,
                pool_min=self.config.pool_min,
                pool_max=self.config.pool_max,
                pg_timeouts=self.config.pg_timeouts,
            )
            if self.config.effective_database_url.startswith("sqlite"):
                await self._storage.migrate()  # the embedded default migrates itself
        self._committer = Committer(
            self.storage,
            self.fanout,
            self.flusher,
            max_batch=self.config.commit_batch,
            queue=self.config.commit_queue,
            linger=self.config.commit_linger_ms / 1000,
            incidents=self.metrics.incidents,
        )
        self._committer.observer = self.metrics.observe_batch
        self._committer.on_published = self._on_published
        self.reader.committer = self._committer
        self.handler_parts = HandlerParts(
            self.storage,
            for_relay(self),
            self.hub,
            self.fanout,
            self.blobs,
            self.config,
            self.push_providers,
        )
        http = HttpFrontend(self)
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
                    from relay.cluster.peers import share_node_status

                    nursery.start_soon(share_node_status, self)
                self.nursery = nursery
                await http.startup()
                await nursery.start(serve_listeners, self, http, listeners)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await http.shutdown()
                await self.blobs.aclose()
                await self.storage.aclose()

    def _registered(self, user: str, device: str, at: float) -> None:
        """A device connected here: count it, and displace it on other nodes."""
        self.delivery.connected(user, device)
        self.fanout.displace(user, device, at)
