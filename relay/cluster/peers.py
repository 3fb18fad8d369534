"""Per-node view for the status page when several nodes share Redis.

Each node writes its summary (connections, messages per second, ...) into
one Redis hash every couple of seconds and reads everyone else's back; the
status page shows this node plus the peers heard from recently.  Best
effort and off the hot path: a Redis outage only empties the peer list
(the fan-out health check is what reports the outage).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

import coredis
import trio
from coredis.retry import NoRetryPolicy

if TYPE_CHECKING:
    from relay.node import Relay

log = logging.getLogger("relay.peers")

PERIOD_S = 2.0
#: A peer not heard from for this long is left off the page (it died or left).
STALE_S = 10.0


async def share_node_status(relay: Relay) -> None:
    key = f"{relay.config.redis_prefix}nodes"
    peers: list[dict[str, Any]] = []
    relay.metrics.peer_nodes = lambda: list(peers)
    while True:
        try:
            client = coredis.Redis.from_url(
                relay.config.redis_url, retry_policy=NoRetryPolicy(), connect_timeout=5
            )
            async with client:
                while True:
                    with trio.fail_after(5):
                        peers[:] = await _exchange(client, key, relay)
                    await trio.sleep(PERIOD_S)
        except Exception as exc:  # Redis down or slow: show no peers, try again later
            log.debug("node status exchange failed: %r", exc)
            peers.clear()
        await trio.sleep(PERIOD_S)


async def _exchange(client: coredis.Redis[Any], key: str, relay: Relay) -> list[dict[str, Any]]:
    now = time.time()
    mine = {**relay.metrics.node_summary(), "seen": now}
    await client.hset(key, {relay.node_id: json.dumps(mine)})
    await client.expire(key, int(STALE_S * 6))
    found: list[dict[str, Any]] = []
    stale: list[Any] = []
    for node, raw in (await client.hgetall(key)).items():
        name = node.decode() if isinstance(node, bytes) else str(node)
        if name == relay.node_id:
            continue
        summary = json.loads(raw)
        if now - float(summary.get("seen", 0)) > STALE_S:
            stale.append(node)
        else:
            found.append(summary)
    if stale:
        await client.hdel(key, stale)
    return sorted(found, key=lambda s: str(s.get("node")))
