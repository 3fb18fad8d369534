"""The fan-out bus's wire format (relay.buswire), without Redis: what one node
encodes, another decodes into calls on its (real) hub.  tests/test_multinode.py
runs the same path between nodes through Redis."""

from __future__ import annotations

import cbor2
import pytest

from relay.cluster import buswire as buswire
from relay.delivery.hub import Ephemeral, Hub, MembershipChange, Published, ReadMark
from relay.delivery.outbox import Flusher

CONV, OTHER, LOST = b"conv-1", b"conv-2", b"conv-3"


def received(events: list[buswire.Event]) -> list[buswire.Event]:
    """``events`` as another node reads them off the channel."""
    sender, decoded = buswire.loads(buswire.dumps(b"node-a", events))
    assert sender == b"node-a"
    return decoded


class Told:
    """What deliver() reports besides the hub calls."""

    def __init__(self) -> None:
        self.byes = 0
        self.repairs = 0
        self.displaced: list[tuple[str, str, float]] = []

    def deliver(self, hub: Hub, events: list[buswire.Event]) -> int | None:
        return buswire.deliver(
            events,
            hub,
            on_bye=self.bye,
            on_repair=self.repair,
            on_displaced=lambda user, device, at: self.displaced.append((user, device, at)),
        )

    def bye(self) -> None:
        self.byes += 1

    def repair(self) -> None:
        self.repairs += 1


def test_every_event_kind_survives_the_trip() -> None:
    inline = Published(CONV, 1, "did:example:a", "a1", 1_000, b"ct")
    blob = Published(CONV, 2, "did:example:a", "a1", 900, b"", "k" * 24, 5000)
    events = [
        buswire.message(inline),
        buswire.message(blob),
        buswire.ephemeral(Ephemeral(CONV, "did:example:a", "a1", 1_100, b"typing")),
        buswire.membership(MembershipChange(CONV, "did:example:a", (("did:example:b", 2),), (), 2)),
        buswire.read_mark(ReadMark(CONV, "did:example:b", "b1", 2)),
        buswire.message(Published(OTHER, 7, "did:example:a", "a1", 1_200, b"x")),
        buswire.repair({LOST: 9}),
        buswire.displace("did:example:b", "b1", 12.5),
        buswire.bye(),
    ]
    assert len(events[0]) == 7 and len(events[1]) == 9  # blob fields only when set
    hub = Hub(Flusher())
    seen = hub.watch()  # records what the hub was offered
    told = Told()
    assert told.deliver(hub, received(events)) == 900  # the oldest message's commit time
    assert seen == {CONV: 2, OTHER: 7, LOST: 9}  # a lost seq counts as published
    assert (told.byes, told.repairs, told.displaced) == (1, 1, [("did:example:b", "b1", 12.5)])


def test_unknown_tags_are_skipped() -> None:
    # Lets a later release append a tag while older nodes still listen.
    hub = Hub(Flusher())
    seen = hub.watch()
    later = [99, b"anything"]
    events = [later, buswire.message(Published(CONV, 3, "did:example:a", "a1", 5, b"m"))]
    assert Told().deliver(hub, received(events)) == 5
    assert seen == {CONV: 3}


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff not cbor",
        cbor2.dumps("not a pair"),
        cbor2.dumps([b"node-a", [[buswire.MSG, CONV]]]),  # a message without its fields
        cbor2.dumps([b"node-a", [[buswire.MEMBER, CONV, "did:example:a"]]]),
        cbor2.dumps([b"node-a", [[]]]),
    ],
)
def test_malformed_payloads_raise_what_the_bus_catches(payload: bytes) -> None:
    with pytest.raises(buswire.MALFORMED):
        _, events = buswire.loads(payload)
        Told().deliver(Hub(Flusher()), events)
