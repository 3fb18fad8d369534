"""Sans-I/O WebSocket server side: request head, handshake, frames.

The relay routes each new TCP connection itself: it reads the HTTP request
head, and only a WebSocket upgrade on the relay's path stays here; every other
request is handed to the HTTP app.  After the handshake, incoming frames are
parsed by :mod:`protocol.wsframes` (masked client frames, fragments, control frames), while
outgoing data frames are built here once per message: server frames are not
masked, so the same bytes go to every recipient (encode once, write many).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from dataclasses import dataclass
from urllib.parse import parse_qs

import h11

from .errors import ProtocolError, RelayError, UnsupportedWebSocketVersion
from .text import excerpt
from .wsframes import Closed, FrameReader, Message, PingReceived, WsEvent

__all__ = ["Closed", "Message", "PingReceived", "ServerConnection", "WsEvent"]

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEAD = 16 * 1024


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    #: Bytes that followed the head (early WebSocket frames).
    rest: bytes

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def query_param(self, name: str) -> str | None:
        values = parse_qs(self.query.decode("latin-1")).get(name)
        return values[0] if values else None

    @property
    def is_websocket(self) -> bool:
        upgrade = (self.header(b"upgrade") or b"").lower()
        connection = (self.header(b"connection") or b"").lower()
        return self.method == "GET" and upgrade == b"websocket" and b"upgrade" in connection


def parse_head(buffer: bytes) -> RequestHead | None:
    """Parse an HTTP/1.1 request head; None while incomplete.

    Raises ProtocolError when the head is malformed or larger than MAX_HEAD.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD:
            raise ProtocolError("request head too large")
        return None
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(buffer[: end + 4])
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise ProtocolError(f"bad request head: {excerpt(str(exc))}") from None
    if not isinstance(event, h11.Request):
        raise ProtocolError("bad request head")
    target = bytes(event.target)
    path, _, query = target.partition(b"?")
    return RequestHead(
        method=event.method.decode("ascii"),
        path=path.decode("latin-1"),
        query=query,
        headers=[(k.lower(), v) for k, v in event.headers],
        rest=buffer[end + 4 :],
    )


def accept_response(head: RequestHead) -> bytes:
    """The 101 response completing the handshake; raises ProtocolError if invalid."""
    key = head.header(b"sec-websocket-key")
    if (head.header(b"sec-websocket-version") or b"").strip() != b"13":
        raise UnsupportedWebSocketVersion("this relay speaks WebSocket version 13 only")
    if not key:
        raise ProtocolError("a WebSocket upgrade needs a Sec-WebSocket-Key")
    accept = base64.b64encode(hashlib.sha1(key.strip() + WS_GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


def refusal_headers(status: int, exc: RelayError) -> str:
    """Headers a refused upgrade needs beside its JSON body: the auth scheme
    on 401 (RFC 6750), the version we speak on a version mismatch (RFC 6455
    §4.2.2: "MUST ... include a Sec-WebSocket-Version header field")."""
    if status == 401:
        return 'www-authenticate: Bearer realm="mls-relay"\r\n'
    if isinstance(exc, UnsupportedWebSocketVersion):
        return "sec-websocket-version: 13\r\n"
    return ""


def json_response(status: int, body: dict[str, object], extra: str = "") -> bytes:
    """A complete HTTP/1.1 JSON response that closes the connection."""
    payload = json.dumps(body).encode()
    reason = {
        400: "Bad Request",
        401: "Unauthorized",
        404: "Not Found",
        429: "Too Many Requests",
        503: "Service Unavailable",
    }.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\nconnection: close\r\n{extra}\r\n"
    )
    return head.encode() + payload


def binary_frame(payload: bytes) -> bytes:
    """One unmasked FIN binary frame: identical bytes for every recipient."""
    n = len(payload)
    if n < 126:
        head = bytes((0x82, n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x82, 126, n)
    else:
        head = struct.pack("!BBQ", 0x82, 127, n)
    return head + payload


#: Longest close reason: a control frame holds 125 bytes, 2 of them the code.
MAX_CLOSE_REASON = 123


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; ``reason`` is cut to fit, never inside a UTF-8 character
    (a cut one would make the client fail the close with 1007)."""
    raw = reason.encode()
    if len(raw) > MAX_CLOSE_REASON:
        raw = raw[:MAX_CLOSE_REASON].decode("utf-8", "ignore").encode()
    payload = struct.pack("!H", code) + raw
    return bytes((0x88, len(payload))) + payload


def close_reason(exc: RelayError) -> str:
    """The close reason for a protocol error: its name, then what was wrong
    (``MalformedFrame: CBOR tag 2 is not allowed``), so that the client
    learns why without a frame the protocol does not have.  Error messages
    quote at most a short excerpt of client input (protocol/text.py)."""
    if exc.message == exc.error:
        return exc.error
    return f"{exc.error}: {exc.message}"


def pong_frame(payload: bytes) -> bytes:
    return bytes((0x8A, len(payload))) + payload[:125]


def ping_frame(payload: bytes = b"") -> bytes:
    return bytes((0x89, len(payload))) + payload[:125]


class ServerConnection:
    """Frames in, events out, after the handshake.  One per WebSocket
    (protocol/wsframes.py does the work)."""

    def __init__(self, max_message: int) -> None:
        self._reader = FrameReader(max_message)

    @property
    def messages(self) -> int:
        """Data messages received whole so far."""
        return self._reader.messages

    @property
    def message_pending(self) -> bool:
        """A frame or fragmented message has begun and not ended."""
        return self._reader.message_pending

    def receive(self, data: bytes) -> list[WsEvent]:
        """Feed bytes; returns complete events.

        Raises MalformedFrame (text frames), FrameTooLarge, or ProtocolError
        (bad framing: close 1002)."""
        return self._reader.receive(data)
