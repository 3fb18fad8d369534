"""Run a real relay in the test's Trio loop, on a loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import trio

from relay.base.config import Config
from relay.node import Relay
from storage import open_storage
from storage.base import Storage

from .relayclient import AUDIENCE, SECRET


@dataclass
class Running:
    relay: Relay
    port: int

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{self.relay.config.ws_path}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def test_config(database_url: str, **overrides: Any) -> Config:
    cfg = Config(
        host="127.0.0.1",
        port=0,
        database_url=database_url,
        service_id=AUDIENCE,
        jwt_secret=SECRET,
        dev_mode=True,
        # Tests connect from one address in quick succession; the connect rate
        # has its own tests (tests/hostile/test_quotas_connect.py).
        connect_rate_per_address=0.0,
    )
    return replace(cfg, **overrides)


@asynccontextmanager
async def running_relay(database_url: str, **overrides: Any) -> AsyncIterator[Running]:
    cfg = test_config(database_url, **overrides)
    storage: Storage = open_storage(
        database_url, pool_min=1, pool_max=cfg.pool_max, pg_timeouts=cfg.pg_timeouts
    )
    await storage.migrate()
    relay = Relay(cfg, storage)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run, listeners)
        yield Running(relay, port)
        nursery.cancel_scope.cancel()
