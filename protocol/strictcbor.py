"""Which CBOR the relay accepts from clients, refused cheaply.

Client frames must be plain CBOR data, the part of DAG-CBOR this protocol
uses (docs/PROTOCOL.md, "Frames"):

* no tags at all: not the semantic tags a generic decoder would interpret
  (0/1 dates, 2/3 bignums, 4/5 decimal fractions, 25/256 string
  references, 28/29 shared values, 258 sets, ...), not 55799
  (self-describe) and not 42 (CIDs), which this protocol never uses;
* definite lengths only (no indefinite strings, arrays or maps);
* map keys are text strings, and no map has the same key twice;
* of the simple values only false, true and null;
* containers nested at most MAX_DEPTH deep, and a frame holds at most
  MAX_ITEMS data items.

Accepted although DAG-CBOR is stricter: keys in any order, integers and
lengths not in their shortest form, floats of any width (no request field
takes a float, so a float where a number belongs is InvalidRequest).  Being
lenient there costs nothing and lets a generic CBOR encoder speak the
protocol; the refusals above are about meaning (a bignum that reads as
request id 1, a duplicate key whose last value silently wins) or memory.

How, within the hot path's budget (a #send is decoded for every message): a
pure-Python decoder would cost several times cbor2's, so cbor2 does the work
with its strict options -- no indefinite lengths, no duplicate keys, only
text or byte keys, a depth bound -- and a semantic-decoder table that
refuses every tag number before cbor2 would interpret it (cbor2 decodes
some tags itself without calling ``tag_hook``: that is how ``c2 41 01``
became the integer 1).  What cbor2 cannot be told (byte-string keys, simple
values) is checked on the decoded maps with set operations that cost well
under a microsecond for a flat body.  Frames above COUNT_ITEMS_FROM bytes
first get a scan of their item heads that bounds how many Python objects
the decode may create: a 1 MiB frame of empty arrays would otherwise become
a million lists.  The module checks at import that the installed cbor2
really refuses what it must.
"""

from __future__ import annotations

import io
import threading
from typing import Any

import cbor2

from .errors import MalformedFrame
from .text import excerpt

#: Deepest nesting of arrays and maps (requests need 3: body, cursors, entry).
MAX_DEPTH = 16
#: Most data items (of any kind, nested ones included) in one frame.
MAX_ITEMS = 65536
#: Frames up to this size are not scanned: they cannot hold more items than
#: bytes, and that many small objects are a few MB at most.
COUNT_ITEMS_FROM = 16 * 1024

#: Types of decoded values that need no further look (a flat map's values).
SCALARS = frozenset({str, bytes, int, bool, float, type(None)})
TEXT = frozenset({str})


class _NoTags(dict[int, Any]):
    """cbor2 looks every tag number up here before its own decoders; none is found."""

    def __missing__(self, tag: int) -> Any:
        raise MalformedFrame(f"CBOR tag {tag} is not allowed")


_NO_TAGS = _NoTags()


def _refuse_tag(tag: cbor2.CBORTag, *_: object) -> Any:
    # Not reached while _NO_TAGS catches every tag; kept so that a cbor2 that
    # skipped the table for some tag would still refuse it.
    raise MalformedFrame(f"CBOR tag {tag.tag} is not allowed")


def _new_decoder() -> cbor2.CBORDecoder:
    return cbor2.CBORDecoder(
        io.BytesIO(b""),
        tag_hook=_refuse_tag,
        semantic_decoders=_NO_TAGS,
        max_depth=MAX_DEPTH,
        allow_indefinite=False,
        allow_duplicate_keys=False,
        strict_hashable_types=True,
    )


_per_thread = threading.local()


def decoder(stream: io.BytesIO) -> cbor2.CBORDecoder:
    """A cbor2 decoder reading ``stream`` that refuses what this module's doc lists.

    One per thread, reused: building a decoder with these options costs
    about a microsecond (keyword parsing), pointing one at a new stream half
    that.  cbor2 keeps no state between ``decode`` calls but its read
    buffer, which a new ``fp`` resets.  (It holds on to the last stream,
    so one frame per thread stays referenced until the next.)"""
    dec: cbor2.CBORDecoder | None = getattr(_per_thread, "decoder", None)
    if dec is None:
        dec = _per_thread.decoder = _new_decoder()
    dec.fp = stream
    return dec


def check_plain(*maps: dict[Any, Any]) -> None:
    """Text keys and plain values in decoded maps (what cbor2 let through)."""
    for m in maps:
        if not TEXT.issuperset(map(type, m)):
            raise MalformedFrame("map keys must be text strings")
        if not SCALARS.issuperset(map(type, m.values())):
            _check_values(m.values())


def _check_values(values: Any) -> None:
    for value in values:
        kind = type(value)
        if kind in SCALARS:
            continue
        if kind is list:
            _check_values(value)
        elif kind is dict:
            check_plain(value)
        else:  # cbor2.undefined, CBORSimpleValue: no other type survives the decoder
            raise MalformedFrame("of the CBOR simple values only false, true and null are allowed")


def count_items(data: bytes) -> None:
    """Refuse a frame of more than MAX_ITEMS items, from their heads alone.

    String payloads are skipped by their length, so a large #send (a few
    heads and one long byte string) costs a few microseconds.  Anything
    malformed is left for the decoder to report; indefinite lengths are
    refused here already (they would need a different walk)."""
    i, n, todo, items = 0, len(data), 2, 0  # two top-level items: header, body
    while todo and i < n:
        initial = data[i]
        major, info = initial >> 5, initial & 0x1F
        i += 1
        if info < 24:
            arg = info
        elif info < 28:
            size = 1 << (info - 24)
            arg = int.from_bytes(data[i : i + size], "big")
            i += size
        elif info == 31:
            raise MalformedFrame("indefinite-length CBOR items are not allowed")
        else:
            return  # reserved: malformed, the decoder says so
        todo -= 1
        items += 1
        if items > MAX_ITEMS:
            raise MalformedFrame(f"a frame holds at most {MAX_ITEMS} CBOR items")
        if major == 2 or major == 3:
            i += arg
        elif major == 4:
            todo += arg
        elif major == 5:
            todo += 2 * arg
        elif major == 6:
            todo += 1  # the tagged item; the decoder refuses the tag


_KNOWN_FAILURES = (
    ("Duplicate map key", "a CBOR map has the same key twice"),
    ("indefinite length", "indefinite-length CBOR items are not allowed"),
    ("nesting depth", f"CBOR nested deeper than {MAX_DEPTH}"),
    ("map key must be", "map keys must be text strings"),
    ("premature end of stream", "CBOR item truncated"),
    ("utf-8", "a CBOR text string is not valid UTF-8"),
)


def refusal(exc: Exception) -> MalformedFrame:
    """The MalformedFrame for a decoder failure, quoting no more than an excerpt.

    cbor2's messages embed input (a duplicate key is quoted whole), so known
    failures get a fixed message and others a short excerpt."""
    cause = exc.__cause__
    if isinstance(cause, MalformedFrame):  # raised by our table, wrapped by cbor2
        return cause
    text = str(exc)
    head = text[:200]  # the kind of failure comes first, before any quoted input
    for needle, message in _KNOWN_FAILURES:
        if needle in head:
            return MalformedFrame(message)
    return MalformedFrame(f"invalid CBOR: {excerpt(text)}")


def _self_test() -> None:
    """Fail at import, not per frame, if this cbor2 does not refuse what we rely on."""
    # A bignum, self-describe, a duplicate key, an indefinite byte string, an int key.
    for bad in ("c24101", "d9d9f701", "a2616101616102", "5f4101ff", "a10101"):
        try:
            decoder(io.BytesIO(bytes.fromhex(bad))).decode()
        except (cbor2.CBORDecodeError, MalformedFrame):
            continue
        raise ImportError(f"cbor2 accepts {bad}: protocol.strictcbor needs cbor2 6.1 or later")
    # The reused decoder starts afresh on a new stream, also after a failure.
    stream = io.BytesIO(bytes.fromhex("0102"))
    if decoder(stream).decode() != 1 or stream.tell() != 1:
        raise ImportError("the installed cbor2 does not report its stream position")


_self_test()
