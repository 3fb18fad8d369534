"""Fan-out bus: how committed events reach the hub of every relay node.

The in-process bus (the embedded default, one node) hands events straight to
the local hub.  A multi-node deployment replaces it with a Redis bus that
publishes to Redis and feeds every node's hub from its subscription.
PostgreSQL stays the source of truth either way: a lost fan-out message shows
up as a seq gap at the subscriber, which repairs it from storage.
"""

from __future__ import annotations

import abc

import trio

from relay.delivery.hub import Ephemeral, Hub, MembershipChange, Published, ReadMark


class FanOut(abc.ABC):
    """Synchronous publish calls: implementations must not block the caller."""

    @abc.abstractmethod
    def publish(self, messages: list[Published]) -> None: ...

    @abc.abstractmethod
    def publish_ephemeral(self, message: Ephemeral) -> None: ...

    @abc.abstractmethod
    def publish_membership(self, change: MembershipChange) -> None: ...

    @abc.abstractmethod
    def publish_read(self, mark: ReadMark) -> None: ...

    def displace(self, user: str, device: str, registered_at: float) -> None:
        """A connection for ``user``/``device`` registered here: other nodes close
        theirs (one session per device across the deployment).  Local no-op."""
        return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work of the bus, if any (started with the relay)."""
        task_status.started()

    @property
    def healthy(self) -> bool:
        return True


class LocalFanOut(FanOut):
    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def publish(self, messages: list[Published]) -> None:
        self._hub.publish(messages)

    def publish_ephemeral(self, message: Ephemeral) -> None:
        self._hub.publish_ephemeral(message)

    def publish_membership(self, change: MembershipChange) -> None:
        self._hub.publish_membership(change)

    def publish_read(self, mark: ReadMark) -> None:
        self._hub.publish_read(mark)
