"""Frame codec: AT Protocol event-stream framing over DAG-CBOR.

Every WebSocket binary message is two concatenated CBOR objects: a header
``{op, t}`` and a body.  ``op: 1`` carries a message whose type is ``t``
(``"#send"``, ``"#message"``, ``"#result"``, and ``"#error"`` for a request
that failed); ``op: -1`` carries an error that ends the stream, whose body is
exactly ``{error, message}`` and has no ``t`` (AT Protocol's event-stream
error frame: its SDKs read no other field there).

What we emit is valid DAG-CBOR: map keys are text, sorted length-first then
bytewise, lengths are definite, bytes are byte strings, integers are minimal
and times are integers (milliseconds).  We never emit floats.  What we accept
is plain CBOR data that decodes to the expected types: no tags, definite
lengths, text map keys without duplicates (:mod:`.strictcbor`).

No I/O here: bytes in, :class:`Frame` out; values in, bytes out.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

from . import strictcbor
from .errors import MalformedFrame

OP_MESSAGE = 1
OP_ERROR = -1

#: Version of the wire protocol described in docs/PROTOCOL.md.
PROTOCOL_VERSION = 1


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1.5 µs per frame
class Frame:
    op: int
    t: str | None
    body: dict[str, Any]


def _canonical_key(key: str) -> tuple[int, bytes]:
    raw = key.encode()
    return (len(raw), raw)


def canonical(body: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``body`` with keys in DAG-CBOR order (recursively for maps).

    cbor2's own ``canonical=True`` would also shrink floats to 16 bits, which
    DAG-CBOR decoders reject, and is three times slower; ordering the keys
    ourselves and encoding plainly gives the same bytes for our value types.
    """
    out: dict[str, Any] = {}
    for key in sorted(body, key=_canonical_key):
        out[key] = _canonical_value(body[key])
    return out


def _canonical_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return canonical(value)
    if isinstance(value, list | tuple):
        return [_canonical_value(v) for v in value]
    if isinstance(value, float | cbor2.CBORTag):
        raise TypeError("floats and tags are not emitted by this protocol")
    return value


_HEADERS: dict[str | None, bytes] = {}
_TEXT, _SCALARS = strictcbor.TEXT, strictcbor.SCALARS


def encode_header(t: str | None, op: int = OP_MESSAGE) -> bytes:
    """CBOR header bytes, cached: there are only a handful of distinct ones."""
    key = t if op == OP_MESSAGE else None
    cached = _HEADERS.get(key)
    if cached is None:
        header = {"op": op} if op == OP_ERROR else {"t": t, "op": op}
        cached = cbor2.dumps(canonical(header))
        _HEADERS[key] = cached
    return cached


def encode_frame(t: str, body: Mapping[str, Any]) -> bytes:
    """Encode an ``op: 1`` frame (event or reply)."""
    return encode_header(t) + cbor2.dumps(canonical(body))


def encode_error(error: str, message: str) -> bytes:
    """Encode an ``op: -1`` frame: an error that ends the stream.  Its body is
    exactly ``{error, message}``, the shape AT Protocol SDKs accept (Python
    ``atproto`` raises on any other key); request errors are ``#error`` frames
    (protocol/events.py) and carry their ``id`` there."""
    return encode_header(None, OP_ERROR) + cbor2.dumps(
        canonical({"error": error, "message": message})
    )


def encode_presorted(t: str, body: dict[str, Any]) -> bytes:
    """Hot-path encoder: ``body`` is already in canonical key order and flat.

    Used for ``#message`` events, encoded once per message for every
    recipient; tests check it against :func:`encode_frame`.
    """
    return encode_header(t) + cbor2.dumps(body)


def decode_frame(data: bytes) -> Frame:
    """Decode one complete WebSocket message into a :class:`Frame`.

    Raises :class:`MalformedFrame` for anything that is not exactly a header
    map followed by a body map of plain CBOR data (module :mod:`.strictcbor`
    says what is refused).  Its message never quotes more than a short
    excerpt of the input.
    """
    stream = io.BytesIO(data)
    try:
        if len(data) > strictcbor.COUNT_ITEMS_FROM:
            strictcbor.count_items(data)
        decoder = strictcbor.decoder(stream)  # the thread's, reused
        header = decoder.decode()
        body = decoder.decode()
    except MalformedFrame:
        raise
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise strictcbor.refusal(exc) from None
    if stream.tell() != len(data):
        raise MalformedFrame("trailing bytes after the frame body")
    if type(header) is not dict or type(body) is not dict:
        raise MalformedFrame("header and body must both be CBOR maps")
    op = header.get("op")
    if type(op) is not int or op not in (OP_MESSAGE, OP_ERROR):
        raise MalformedFrame("header.op must be 1 or -1")
    t = header.get("t")
    if op == OP_MESSAGE and (type(t) is not str or not t.startswith("#")):
        raise MalformedFrame('header.t must be a text string starting with "#"')
    if len(header) != 2 or type(t) is not str:  # else: just op and t, both checked above
        strictcbor.check_plain(header)
    if not _TEXT.issuperset(map(type, body)) or not _SCALARS.issuperset(map(type, body.values())):
        strictcbor.check_plain(body)  # nested containers (or worse): the full walk
    return Frame(op, t if op == OP_MESSAGE else None, body)  # positional: kwargs cost 0.2 µs
