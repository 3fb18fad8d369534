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
from collections.abc import Callable
from typing import Any

import coredis
import trio
from coredis.retry import NoRetryPolicy

log = logging.getLogger("relay.peers")

PERIOD_S = 2.0
#: A peer not heard from for this long is left off the page (it died or left).
STALE_S = 10.0


Summary = dict[str, Any]


async def share_node_status(
    redis_url: str,
    prefix: str,
    node_id: str,
    summary: Callable[[], Summary],
    peers: list[Summary],
) -> None:
    """Publish this node's ``summary()`` and keep ``peers`` (the list the
    status page reads) filled with the other nodes' recent ones."""
    key = f"{prefix}nodes"
    while True:
        try:
            client = coredis.Redis.from_url(
                redis_url, retry_policy=NoRetryPolicy(), connect_timeout=5
            )
            async with client:
                while True:
                    with trio.fail_after(5):
                        peers[:] = await _exchange(client, key, node_id, summary())
                    await trio.sleep(PERIOD_S)
        except Exception as exc:  # Redis down or slow: show no peers, try again later
            log.debug("node status exchange failed: %r", exc)
            peers.clear()
        await trio.sleep(PERIOD_S)


async def _exchange(
    client: coredis.Redis[Any], key: str, node_id: str, summary: Summary
) -> list[Summary]:
    now = time.time()
    mine = {**summary, "seen": now}
    await client.hset(key, {node_id: json.dumps(mine)})
    await client.expire(key, int(STALE_S * 6))
    found: list[Summary] = []
    stale: list[Any] = []
    for node, raw in (await client.hgetall(key)).items():
        name = node.decode() if isinstance(node, bytes) else str(node)
        if name == node_id:
            continue
        summary = json.loads(raw)
        if now - float(summary.get("seen", 0)) > STALE_S:
            stale.append(node)
        else:
            found.append(summary)
    if stale:
        await client.hdel(key, stale)
    return sorted(found, key=lambda s: str(s.get("node")))
