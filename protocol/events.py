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


#: The type of a request's error reply (an ``op: 1`` frame, see error()).
ERROR_T = "#error"


def error(exc: RelayError, request_id: int | None = None) -> bytes:
    """The error reply to a request: ``{op: 1, t: "#error"}`` with ``id`` (when
    the request had a valid one), ``error``, ``message``, ``retryable`` and
    the error's details.

    Not an ``op: -1`` frame: in AT Protocol an error frame ends the stream and
    its body is exactly ``{error, message}`` (the Python SDK raises TypeError
    on any other key), while a request error leaves the connection open and
    must name its request.  An ``op: 1`` frame may carry any body, so every
    AT Protocol decoder reads this one (docs/PROTOCOL.md, "Requests and
    replies")."""
    body: dict[str, Any] = dict(exc.details)
    if request_id is not None:
        body["id"] = request_id
    if exc.retryable:
        body["retryable"] = True
    body["error"] = exc.error
    body["message"] = exc.message
    return encode_frame(ERROR_T, body)


def fatal(error: str, message: str) -> bytes:
    """An ``op: -1`` frame: an error after which the relay ends the stream."""
    return encode_error(error, message)
