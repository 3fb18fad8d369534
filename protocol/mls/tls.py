"""RFC 9420 §2.1 TLS presentation language: a bounded reader and a writer.

MLS uses fixed-width big-endian integers, a variable-length integer (varint,
§2.1.2) that prefixes every ``opaque x<V>`` and every vector ``T x<V>`` with its
length in *bytes*, and ``optional<T>`` (a presence byte, then ``T``).

The :class:`Reader` never trusts a declared length: it compares it with the bytes
actually left before slicing, so malicious lengths cost nothing and every
failure is an :class:`~protocol.errors.MLSDecodeError` carrying the field path
and the byte offset.  Slicing a memoryview is O(1); bytes are only copied for
values the caller keeps, so memory stays proportional to the input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from enum import IntEnum
from typing import NoReturn, TypeVar

from protocol.errors import MLSDecodeError, MLSUnsupportedError, MLSValidationError

T = TypeVar("T")
E = TypeVar("E", bound=IntEnum)

Buffer = bytes | bytearray | memoryview

#: Largest value a varint can carry: 30 bits (the 4-byte form).
VARINT_MAX = (1 << 30) - 1
# Smallest value each form may carry: anything smaller must use a shorter form.
_VARINT_MIN = {1: 0, 2: 0x40, 4: 0x4000}


def encode_varint(value: int) -> bytes:
    """Minimal RFC 9420 varint; the only encoding :class:`Reader` accepts back."""
    if value < 0 or value > VARINT_MAX:
        raise MLSValidationError(f"varint out of range: {value}", field="varint")
    if value < 0x40:
        return bytes([value])
    if value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    return (value | 0x8000_0000).to_bytes(4, "big")


class Reader:
    """Cursor over a memoryview window ``[pos, end)`` with bounds-checked reads.

    Sub-readers made by :meth:`sub` share the buffer and the field path, so
    offsets in errors are always absolute offsets into the original input.
    """

    __slots__ = ("_buf", "_end", "_path", "_pos")

    def __init__(
        self,
        data: Buffer,
        *,
        _window: tuple[int, int] | None = None,
        _path: list[str] | None = None,
    ) -> None:
        buf = memoryview(data)
        if buf.format != "B" or buf.ndim != 1:
            buf = buf.cast("B")
        self._buf = buf
        self._pos, self._end = _window if _window is not None else (0, len(buf))
        self._path = _path if _path is not None else []

    # --- position ---------------------------------------------------------

    @property
    def pos(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def at_end(self) -> bool:
        return self._pos >= self._end

    def span(self, start: int) -> bytes:
        """Exact input bytes from ``start`` to the cursor (TBS and raw spans)."""
        return bytes(self._buf[start : self._pos])

    # --- errors -----------------------------------------------------------

    def field_path(self, field: str = "") -> str:
        return ".".join([*self._path, field] if field else self._path) or "<input>"

    def fail(
        self, field: str, reason: str, *, at: int | None = None, unsupported: bool = False
    ) -> NoReturn:
        offset = self._pos if at is None else at
        path = self.field_path(field)
        cls = MLSUnsupportedError if unsupported else MLSDecodeError
        raise cls(f"{path}: {reason} at offset {offset}", field=path, offset=offset)

    @contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Name the structure being read so errors say ``welcome.secrets[2].new_member``."""
        self._path.append(name)
        try:
            yield
        finally:
            self._path.pop()

    # --- primitives -------------------------------------------------------

    def take(self, n: int, field: str) -> memoryview:
        if n > self.remaining:
            self.fail(field, f"truncated: needs {n} bytes, {self.remaining} left")
        view = self._buf[self._pos : self._pos + n]
        self._pos += n
        return view

    def uint(self, size: int, field: str) -> int:
        return int.from_bytes(self.take(size, field), "big")

    def uint8(self, field: str) -> int:
        return self.uint(1, field)

    def uint16(self, field: str) -> int:
        return self.uint(2, field)

    def uint32(self, field: str) -> int:
        return self.uint(4, field)

    def uint64(self, field: str) -> int:
        return self.uint(8, field)

    def enum(self, cls: type[E], size: int, field: str) -> E:
        """A select discriminator: unknown values end the parse (no length to skip)."""
        start = self._pos
        value = self.uint(size, field)
        try:
            return cls(value)
        except ValueError:
            reserved = value == 0
            self.fail(
                field,
                f"{'reserved' if reserved else 'unknown'} {field} {value}",
                at=start,
                unsupported=not reserved,
            )

    def varint(self, field: str) -> int:
        start = self._pos
        first = self.take(1, field)[0]
        prefix = first >> 6
        if prefix == 3:
            self.fail(field, "invalid varint prefix 0b11", at=start)
        size = 1 << prefix
        if size - 1 > self.remaining:  # report the varint's own offset
            self.fail(field, f"truncated varint: needs {size} bytes", at=start)
        value = first & 0x3F
        for byte in self.take(size - 1, field):
            value = (value << 8) | byte
        if value < _VARINT_MIN[size]:
            self.fail(field, f"non-minimal varint ({size} bytes for {value})", at=start)
        return value

    def opaque(self, field: str) -> bytes:
        """``opaque field<V>``: varint length, then that many bytes."""
        return bytes(self.take(self.varint(field), field))

    # --- composites -------------------------------------------------------

    def sub(self, field: str) -> Reader:
        """Consume a varint-prefixed block and return a reader confined to it."""
        length = self.varint(field)
        if length > self.remaining:
            self.fail(field, f"truncated: needs {length} bytes, {self.remaining} left")
        window = (self._pos, self._pos + length)
        self._pos += length
        return Reader(self._buf, _window=window, _path=self._path)

    def vector(self, field: str, item: Callable[[Reader], T]) -> tuple[T, ...]:
        """``T field<V>``: items until the byte length is used up, exactly."""
        inner = self.sub(field)
        out: list[T] = []
        while not inner.at_end():
            before = inner.pos
            with inner.scope(f"{field}[{len(out)}]"):
                out.append(item(inner))
            if inner.pos == before:  # a zero-width item would loop forever
                inner.fail(field, "vector item consumed no bytes")
        return tuple(out)

    def optional(self, field: str, item: Callable[[Reader], T]) -> T | None:
        start = self._pos
        present = self.uint8(field)
        if present == 0:
            return None
        if present != 1:
            self.fail(field, f"optional presence byte must be 0 or 1, got {present}", at=start)
        with self.scope(field):
            return item(self)

    def finish(self, what: str = "") -> None:
        """Reject trailing bytes where a whole object (or block) was expected."""
        if self.remaining:
            self.fail(what, f"{self.remaining} trailing bytes")


class Writer:
    """Builds the canonical encoding that :class:`Reader` parses."""

    __slots__ = ("_out",)

    def __init__(self) -> None:
        self._out = bytearray()

    def getvalue(self) -> bytes:
        return bytes(self._out)

    def raw(self, data: Buffer) -> None:
        self._out += data

    def uint(self, size: int, value: int) -> None:
        if value < 0 or value >= 1 << (8 * size):
            raise MLSValidationError(f"uint{8 * size} out of range: {value}", field="uint")
        self._out += value.to_bytes(size, "big")

    def uint8(self, value: int) -> None:
        self.uint(1, value)

    def uint16(self, value: int) -> None:
        self.uint(2, value)

    def uint32(self, value: int) -> None:
        self.uint(4, value)

    def uint64(self, value: int) -> None:
        self.uint(8, value)

    def varint(self, value: int) -> None:
        self._out += encode_varint(value)

    def opaque(self, data: Buffer) -> None:
        self.varint(len(data))
        self._out += data

    def vector(self, items: Iterable[T], write: Callable[[Writer, T], None]) -> None:
        inner = Writer()
        for item in items:
            write(inner, item)
        self.opaque(inner._out)

    def optional(self, item: T | None, write: Callable[[Writer, T], None]) -> None:
        if item is None:
            self.uint8(0)
        else:
            self.uint8(1)
            write(self, item)


def decode_exact(data: Buffer, read: Callable[[Reader], T], what: str) -> T:
    """Parse one whole ``what`` from ``data``; trailing bytes are an error."""
    reader = Reader(data)
    with reader.scope(what):
        value = read(reader)
    reader.finish(what)
    return value


def encode_with(write: Callable[[Writer, T], None], value: T) -> bytes:
    writer = Writer()
    write(writer, value)
    return writer.getvalue()
