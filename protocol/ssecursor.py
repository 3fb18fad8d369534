"""The SSE stream's resume cursor: ``v1.`` + base64url(CBOR list of [conversation, seq]).

Decoding is a strict, hand-written reader of exactly this shape, not a
general CBOR decoder, because the text comes from the client: a general
decoder builds whatever the bytes describe (a 14-character cursor once made
the relay allocate 64 MiB of zeros for a "conversation" that was the integer
2^26).  Here every length is checked against the bytes actually present and
against the limits below BEFORE anything is allocated or looped over:

* the text is at most :data:`MAX_CURSOR_TEXT` characters (it travels in a
  request head, which the relay bounds at 16 KiB);
* at most :data:`MAX_CURSOR_ENTRIES` entries, each a definite-length byte
  string of 1..255 bytes (a conversation id, as on the WebSocket) and an
  unsigned integer that fits 63 bits (a seq, as on the WebSocket);
* no tags, no floats, no indefinite lengths, no duplicate conversations, no
  trailing bytes.

Encoding keeps the cursor within the same limits: it holds the most recently
delivered conversations first and stops before the text would pass
:data:`MAX_CURSOR_TEXT` (a conversation left out resumes from the device's
stored cursor: a repeat at worst, never a gap).

No I/O and no Trio, like the rest of ``protocol/``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from .errors import InvalidRequest

PREFIX = "v1."
#: Longest cursor text accepted or issued (characters, all ASCII).
MAX_CURSOR_TEXT = 8 * 1024
#: Most conversations in one cursor.
MAX_CURSOR_ENTRIES = 512
MAX_CONVERSATION_ID = 255
MAX_SEQ = 2**63 - 1

_BAD = "Last-Event-ID / cursor is not a cursor issued by this relay"


def encode(positions: Mapping[bytes, int]) -> str:
    """The cursor for ``positions`` (iteration order: least recent first).

    Entries are taken from the most recent backwards while the text stays
    within MAX_CURSOR_TEXT and MAX_CURSOR_ENTRIES, then written sorted."""
    budget = (MAX_CURSOR_TEXT - len(PREFIX)) * 3 // 4 - 9  # raw bytes, minus the list header
    chosen: list[tuple[bytes, int]] = []
    for conv, seq in reversed(list(positions.items())):
        entry = _entry(conv, seq)
        if len(chosen) == MAX_CURSOR_ENTRIES or len(entry) > budget:
            break
        budget -= len(entry)
        chosen.append((conv, seq))
    chosen.sort()
    raw = _head(4, len(chosen)) + b"".join(_entry(c, s) for c, s in chosen)
    return PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode(text: str) -> dict[bytes, int]:
    """Positions from a cursor ("" gives none); InvalidRequest on anything else."""
    if not text:
        return {}
    if len(text) > MAX_CURSOR_TEXT or not text.startswith(PREFIX) or not text.isascii():
        raise InvalidRequest(_BAD, field="cursor")
    body = text[len(PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (ValueError, binascii.Error):
        raise InvalidRequest(_BAD, field="cursor") from None
    return _Reader(raw).cursor()


def _head(major: int, value: int) -> bytes:
    """A CBOR item head, shortest form (DAG-CBOR canonical)."""
    if value < 24:
        return bytes([major << 5 | value])
    for extra, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * size):
            return bytes([major << 5 | extra]) + value.to_bytes(size, "big")
    raise ValueError("value too large for CBOR")


def _entry(conv: bytes, seq: int) -> bytes:
    return b"\x82" + _head(2, len(conv)) + conv + _head(0, seq)


class _Reader:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.at = 0

    def _fail(self, why: str) -> InvalidRequest:
        return InvalidRequest(f"{_BAD} ({why})", field="cursor")

    def _item(self, major: int) -> int:
        """The argument of the next item, which must have ``major`` type."""
        if self.at >= len(self.raw):
            raise self._fail("truncated")
        first = self.raw[self.at]
        self.at += 1
        if first >> 5 != major:
            raise self._fail("unexpected item")
        info = first & 0x1F
        if info < 24:
            return info
        if info > 27:  # 28-30 reserved, 31 indefinite length: never issued
            raise self._fail("indefinite or reserved length")
        size = 1 << (info - 24)
        if self.at + size > len(self.raw):
            raise self._fail("truncated")
        value = int.from_bytes(self.raw[self.at : self.at + size], "big")
        self.at += size
        return value

    def cursor(self) -> dict[bytes, int]:
        count = self._item(4)
        # The smallest entry takes 4 bytes: a count the bytes cannot hold is a lie.
        if count > MAX_CURSOR_ENTRIES or count * 4 > len(self.raw) - self.at:
            raise self._fail(f"more than {MAX_CURSOR_ENTRIES} entries")
        out: dict[bytes, int] = {}
        for _ in range(count):
            if self._item(4) != 2:
                raise self._fail("an entry is [conversation, seq]")
            length = self._item(2)
            if not 0 < length <= MAX_CONVERSATION_ID or self.at + length > len(self.raw):
                raise self._fail("conversation ids are 1..255 bytes")
            conv = self.raw[self.at : self.at + length]
            self.at += length
            seq = self._item(0)
            if seq > MAX_SEQ:
                raise self._fail("seqs fit 63 bits")
            if conv in out:
                raise self._fail("a conversation appears twice")
            out[conv] = seq
        if self.at != len(self.raw):
            raise self._fail("trailing bytes")
        return out
