"""Server-to-client frames: events pushed by the relay and replies to requests."""

from __future__ import annotations

from typing import Any

from .errors import RelayError
from .frames import PROTOCOL_VERSION, encode_error, encode_frame, encode_presorted


def hello(user: str, device: str, server: str, session: str, node: str = "") -> bytes:
    """First frame on every connection: protocol version and who you are.
    ``node`` names the relay process serving it (several share one address)."""
    body = {
        "protocol": PROTOCOL_VERSION,
        "server": server,
        "user": user,
        "device": device,
        "session": session,
    }
    if node:
        body["node"] = node
    return encode_frame("#hello", body)


def message(
    conversation: bytes,
    seq: int,
    sender: str,
    time_ms: int,
    ciphertext: bytes,
    blob: str = "",
    size: int = 0,
) -> bytes:
    """A stored message.  Keys are listed in DAG-CBOR order (length, then bytes).

    A message kept out of line (a blob-model conversation) has an empty
    ``ciphertext`` and names its ``blob`` (download it over HTTP) and ``size``."""
    if blob:
        return encode_presorted(
            "#message",
            {
                "seq": seq,
                "blob": blob,
                "size": size,
                "time": time_ms,
                "sender": sender,
                "ciphertext": ciphertext,
                "conversation": conversation,
            },
        )
    return encode_presorted(
        "#message",
        {
            "seq": seq,
            "time": time_ms,
            "sender": sender,
            "ciphertext": ciphertext,
            "conversation": conversation,
        },
    )


def ephemeral(conversation: bytes, sender: str, time_ms: int, ciphertext: bytes) -> bytes:
    """A live-only message: not stored, not sequenced, never replayed."""
    return encode_presorted(
        "#ephemeral",
        {
            "time": time_ms,
            "sender": sender,
            "ciphertext": ciphertext,
            "conversation": conversation,
        },
    )


def read(conversation: bytes, user: str, seq: int) -> bytes:
    """A member published its read position (live only; #readPositions lists them)."""
    return encode_presorted("#read", {"seq": seq, "user": user, "conversation": conversation})


def info(name: str, message: str, **extra: Any) -> bytes:
    """``#info`` frames: OutdatedCursor, CaughtUp, ..."""
    return encode_frame("#info", {"name": name, "message": message, **extra})


def membership(
    conversation: bytes, actor: str, added: list[str], removed: list[str], seq: int
) -> bytes:
    """Membership of a conversation changed; ``seq`` is its last_seq at that moment."""
    return encode_frame(
        "#membership",
        {
            "conversation": conversation,
            "actor": actor,
            "added": added,
            "removed": removed,
            "seq": seq,
        },
    )


def welcome(conversation: bytes, seq: int, epoch: int, welcome: bytes) -> bytes:
    """An MLS Welcome for this device: the commit at ``seq`` (creating ``epoch``) won."""
    return encode_frame(
        "#welcome", {"conversation": conversation, "seq": seq, "epoch": epoch, "welcome": welcome}
    )


def send_result(
    request_id: int, seq: int, time_ms: int, epoch: int | None = None, blob: str = ""
) -> bytes:
    """The ``#result`` of a durable send: one per send, so presorted (DAG-CBOR
    key order) instead of sorting keys each time."""
    body: dict[str, Any] = {"id": request_id, "seq": seq}
    if blob:
        body["blob"] = blob
    body["time"] = time_ms
    if epoch is not None:
        body["epoch"] = epoch
    return encode_presorted("#result", body)


def result(request_id: int, **fields: Any) -> bytes:
    """The successful reply to request ``request_id``."""
    return encode_frame("#result", {"id": request_id, **fields})


def error(exc: RelayError, request_id: int | None = None) -> bytes:
    """An ``op: -1`` error frame, addressed to a request when it has an id."""
    extra: dict[str, Any] = dict(exc.details)
    if request_id is not None:
        extra["id"] = request_id
    if exc.retryable:
        extra["retryable"] = True
    return encode_error(exc.error, exc.message, **extra)
