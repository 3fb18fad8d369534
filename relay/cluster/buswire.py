"""Wire format of the Redis fan-out bus (:mod:`relay.cluster.redisbus`), sans-I/O.

One Redis message is CBOR ``[instance_id, [event, ...]]``: the random id of
the publishing process (so a node skips its own batches), then events as
tagged lists.  Several events share one PUBLISH so that the bus keeps up with
the committer's batches; positional lists keep each event small.

* ``MSG``: conversation, seq, sender, device, created_ms, ciphertext, and
  for out-of-line ciphertext blob_key, blob_size;
* ``EPH``: conversation, sender, device, created_ms, ciphertext;
* ``MEMBER``: conversation, actor, [[user, joined_seq], ...], [user, ...],
  last_seq;
* ``READ``: conversation, user, device, seq;
* ``REPAIR``: {conversation: highest lost seq}, or None (anything may be lost);
* ``DISPLACE``: user, device, registered_at;
* ``BYE``: nothing (the node stops cleanly: its silence is no crash).

The tag numbers are the wire format: never renumber them, only append, or
nodes of two releases misread each other during a rolling upgrade.

This module only builds and reads these lists; what is queued, published,
retried or counted is the bus's business.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import cbor2

from relay.delivery.hub import Ephemeral, MembershipChange, Published, ReadMark

if TYPE_CHECKING:
    from relay.delivery.hub import Hub

MSG, EPH, MEMBER, REPAIR, DISPLACE, BYE, READ = range(7)

#: What a malformed fan-out message (a buggy or incompatible peer) raises while
#: being read or delivered; the bus counts and skips it.
MALFORMED = (ValueError, TypeError, IndexError, KeyError, cbor2.CBORDecodeError)

#: One event: a tagged list (see the table above).
Event = list[Any]


# --- encoding ----------------------------------------------------------------------


def message(m: Published) -> Event:
    event = [MSG, m.conversation, m.seq, m.sender, m.device, m.created_ms, m.ciphertext]
    if m.blob_key:
        event += [m.blob_key, m.blob_size]
    return event


def ephemeral(m: Ephemeral) -> Event:
    return [EPH, m.conversation, m.sender, m.device, m.created_ms, m.ciphertext]


def membership(c: MembershipChange) -> Event:
    added = [[user, seq] for user, seq in c.added]
    return [MEMBER, c.conversation, c.actor, added, list(c.removed), c.last_seq]


def read_mark(mark: ReadMark) -> Event:
    return [READ, mark.conversation, mark.user, mark.device, mark.seq]


def repair(lost: dict[bytes, int] | None) -> Event:
    return [REPAIR, lost]


def displace(user: str, device: str, registered_at: float) -> Event:
    return [DISPLACE, user, device, registered_at]


def bye() -> Event:
    return [BYE]


def dumps(instance: bytes, events: Iterable[Event]) -> bytes:
    """The payload of one PUBLISH."""
    return cbor2.dumps([instance, list(events)])


# --- decoding ----------------------------------------------------------------------


def loads(data: bytes) -> tuple[Any, list[Event]]:
    """(sender instance id, events) of one received payload; raises one of
    :data:`MALFORMED`."""
    sender, events = cbor2.loads(data)
    return sender, events


def deliver(
    events: list[Event],
    hub: Hub,
    *,
    on_bye: Callable[[], object],
    on_repair: Callable[[], object],
    on_displaced: Callable[[str, str, float], None] | None,
) -> int | None:
    """Hand one received batch to ``hub``, in order; returns the commit time (ms)
    of its oldest message, or None when it holds none.

    Consecutive messages go to the hub as one run: that keeps seq order and
    one flush per run.  The callbacks are told of what is the bus's own
    business (``on_repair`` before the hub repairs).  A malformed event raises
    one of :data:`MALFORMED`; the events before it were delivered."""
    run: list[Published] = []
    for event in events:
        if event[0] == MSG:
            run.append(Published(*event[1:]))
            continue
        if event[0] == BYE:
            on_bye()
            continue
        if run:
            hub.publish(run)
            run = []
        _dispatch(event, hub, on_repair, on_displaced)
    if run:
        hub.publish(run)
    return min((e[5] for e in events if e[0] == MSG), default=None)


def _dispatch(
    event: Event,
    hub: Hub,
    on_repair: Callable[[], object],
    on_displaced: Callable[[str, str, float], None] | None,
) -> None:
    tag = event[0]
    if tag == EPH:
        hub.publish_ephemeral(Ephemeral(*event[1:]))
    elif tag == MEMBER:
        _, conversation, actor, added, removed, last_seq = event
        hub.publish_membership(
            MembershipChange(
                conversation,
                actor,
                tuple((user, seq) for user, seq in added),
                tuple(removed),
                last_seq,
            )
        )
    elif tag == READ:
        hub.publish_read(ReadMark(*event[1:]))
    elif tag == REPAIR:
        on_repair()
        hub.repair(event[1])
    elif tag == DISPLACE and on_displaced is not None:
        on_displaced(event[1], event[2], event[3])
