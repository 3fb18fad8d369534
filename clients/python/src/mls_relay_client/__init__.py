"""mls-relay's Python client: a Trio SDK for the relay's WebSocket protocol.

::

    from mls_relay_client import Message, RelayClient

    async with RelayClient.connect("ws://localhost:3000/v1/ws", token) as client:
        seq = await client.send(b"room", ciphertext)
        async for event in client.events():
            ...

It depends on trio, trio-websocket and cbor2 only, never on the server
(``relay``, ``storage``): it speaks the wire protocol of docs/PROTOCOL.md on
its own, as any other client does.  Modules: :mod:`.client` (the connection:
reconnects, request/reply matching, the event stream), :mod:`.requests` (one
typed method per request), :mod:`.events` (events, results, errors) and
:mod:`.tail` (print a device's events, behind ``mls-relay tail``).
"""

from .client import (
    ClaimedKeyPackage,
    ConnectionLost,
    DeliveryState,
    Ephemeral,
    Event,
    Info,
    KeyPackageClaim,
    Membership,
    Message,
    Other,
    Read,
    RelayClient,
    RequestFailed,
    Welcome,
)

__all__ = [
    "ClaimedKeyPackage",
    "ConnectionLost",
    "DeliveryState",
    "Ephemeral",
    "Event",
    "Info",
    "KeyPackageClaim",
    "Membership",
    "Message",
    "Other",
    "Read",
    "RelayClient",
    "RequestFailed",
    "Welcome",
]
