"""Events, request results and errors of the Python SDK.

Plain data, no I/O: what :meth:`mls_relay_client.RelayClient.events` yields,
what the typed request methods return, and what they raise.  Import them from
:mod:`mls_relay_client`, which re-exports every public name here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# --- events ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    conversation: bytes
    seq: int
    sender: str
    time_ms: int
    ciphertext: bytes
    #: Blob conversations: the ciphertext is out of line (empty above); fetch it
    #: with GET /v1/conversations/<hex>/blobs/<blob> (docs/PROTOCOL.md).
    blob: str = ""
    size: int = 0


@dataclass(frozen=True, slots=True)
class Membership:
    conversation: bytes
    actor: str
    added: tuple[str, ...]
    removed: tuple[str, ...]
    seq: int


@dataclass(frozen=True, slots=True)
class Ephemeral:
    conversation: bytes
    sender: str
    time_ms: int
    ciphertext: bytes


@dataclass(frozen=True, slots=True)
class Read:
    """``#read``: ``user`` (another member, or this user on another device) has
    read ``conversation`` up to ``seq``.  Live only: not replayed after a
    reconnect; :meth:`~mls_relay_client.client.RelayClient.read_positions` has them all."""

    conversation: bytes
    user: str
    seq: int


@dataclass(frozen=True, slots=True)
class Welcome:
    """``#welcome``: an MLS Welcome for this device, from the commit at ``seq``
    that created ``epoch``.  Delivered at least once (again from the relay's
    inbox after each subscribe, so after every reconnect) until an ack of
    ``seq`` or later in ``conversation``: dedupe by (conversation, seq)."""

    conversation: bytes
    seq: int
    epoch: int
    #: The Welcome MLSMessage, as the committer sent it.
    welcome: bytes


@dataclass(frozen=True, slots=True)
class Info:
    """``#info``: CaughtUp, OutdatedCursor, ... (``details`` holds extra fields)."""

    name: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Other:
    """Any event type this SDK version does not model (forward compatibility)."""

    type: str
    body: dict[str, Any]


Event = Message | Membership | Ephemeral | Read | Welcome | Info | Other


def parse_event(t: str, b: dict[str, Any]) -> Event:
    """The event of a server frame of type ``t`` with body ``b``."""
    if t == "#message":
        return Message(
            b["conversation"],
            b["seq"],
            b["sender"],
            b["time"],
            b["ciphertext"],
            b.get("blob", ""),
            b.get("size", 0),
        )
    if t == "#membership":
        return Membership(
            b["conversation"], b["actor"], tuple(b["added"]), tuple(b["removed"]), b["seq"]
        )
    if t == "#ephemeral":
        return Ephemeral(b["conversation"], b["sender"], b["time"], b["ciphertext"])
    if t == "#read":
        return Read(b["conversation"], b["user"], b["seq"])
    if t == "#welcome":
        return Welcome(b["conversation"], b["seq"], b["epoch"], b["welcome"])
    if t == "#info":
        rest = {k: v for k, v in b.items() if k not in ("name", "message")}
        return Info(b["name"], b.get("message", ""), rest)
    return Other(t, b)


# --- request results -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeliveryState:
    """How far one of the caller's own messages got (``#deliveryState``)."""

    seq: int
    #: Recipient devices the relay knows of (not the sending device).
    devices: int
    #: Devices whose connection was handed the message; lags by up to
    #: ``RELAY_DELIVERY_FLUSH_S``, since the relay records these in batches.
    delivered: int
    #: Devices whose ``#ack`` cursor is at or past it (exact).
    acknowledged: int


@dataclass(frozen=True, slots=True)
class ClaimedKeyPackage:
    user: str
    device: str
    #: The KeyPackageRef a Welcome names this device by.
    ref: bytes
    #: The KeyPackage MLSMessage.
    key_package: bytes
    #: A last-resort package: handed out only when the device has nothing else,
    #: and not consumed by the claim (others may be handed it too).
    last_resort: bool


@dataclass(frozen=True, slots=True)
class KeyPackageClaim:
    """The result of ``#claimKeyPackages``: one KeyPackage per device."""

    key_packages: tuple[ClaimedKeyPackage, ...]
    #: (user, device) with no usable KeyPackage; device None: the user has no
    #: device with packages at all.
    missing: tuple[tuple[str, str | None], ...]


# --- errors ----------------------------------------------------------------------


class RequestFailed(Exception):
    """The relay answered a request with an error frame."""

    def __init__(self, error: str, message: str, body: dict[str, Any]) -> None:
        super().__init__(f"{error}: {message}")
        self.error, self.message, self.body = error, message, body


class ConnectionLost(Exception):
    """The connection dropped before a non-idempotent request was answered."""
