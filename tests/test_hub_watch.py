"""Hub.watch / unwatch when several connections of one node subscribe at once.

Each ``#subscribe`` records the seqs published while it reads its storage
snapshot (relay/edge/handlers.py).  Two subscribes overlap whenever clients
reconnect together (a node was killed: its clients all come back at once);
each must keep its own record until it unwatches, whatever the others do.
Found by tests/test_multinode.py's kill test once its client stopped
swallowing every exception: an overlapping #subscribe answered InternalError.
"""

from __future__ import annotations

from relay.delivery.hub import Hub, Published
from relay.delivery.outbox import Flusher


def _message(conversation: bytes, seq: int) -> Published:
    return Published(conversation, seq, "did:example:a", "d", 0, b"x")


def test_unwatching_one_subscriber_leaves_the_others_recording() -> None:
    hub = Hub(Flusher())
    first, second = hub.watch(), hub.watch()  # two snapshots in progress, both still empty
    hub.unwatch(second)  # the second finished first
    hub.publish([_message(b"c", 5)])  # published during the first one's snapshot
    assert first == {b"c": 5}, "the first subscriber no longer sees what is published"
    hub.unwatch(first)  # and its own unwatch still finds it
    hub.publish([_message(b"c", 6)])
    assert first == {b"c": 5}  # no longer recorded once unwatched


def test_equal_records_are_still_different_subscribers() -> None:
    hub = Hub(Flusher())
    a, b, c = hub.watch(), hub.watch(), hub.watch()
    hub.publish([_message(b"x", 1)])
    assert a == b == c == {b"x": 1}
    hub.unwatch(c)
    hub.unwatch(a)
    hub.publish([_message(b"x", 2)])
    assert (a, b, c) == ({b"x": 1}, {b"x": 2}, {b"x": 1})
    hub.unwatch(b)
