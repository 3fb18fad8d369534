"""MLSMessage framing (RFC 9420 §6) and the byte-level entry points.

The caller always says what it expects: a bare KeyPackage starts ``0001 0001``
(version mls10, cipher suite 1) or ``0001 0002`` -- the same bytes as an
MLSMessage header for a PublicMessage/PrivateMessage -- so the framing is
decided by the endpoint or field, never by sniffing the bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from protocol.errors import MLSValidationError
from protocol.mls.framing import (
    PrivateMessage,
    PublicMessage,
    read_private_message,
    read_public_message,
    write_private_message,
    write_public_message,
)
from protocol.mls.group import (
    GroupInfo,
    Welcome,
    read_group_info,
    read_welcome,
    write_group_info,
    write_welcome,
)
from protocol.mls.leaf import KeyPackage, read_key_package, write_key_package
from protocol.mls.structs import MLS10, ContentType, WireFormat
from protocol.mls.tls import Buffer, Reader, Writer, decode_exact, encode_with

MessageBody = PublicMessage | PrivateMessage | Welcome | GroupInfo | KeyPackage

_READERS: dict[WireFormat, Callable[[Reader], MessageBody]] = {
    WireFormat.PUBLIC_MESSAGE: read_public_message,
    WireFormat.PRIVATE_MESSAGE: read_private_message,
    WireFormat.WELCOME: read_welcome,
    WireFormat.GROUP_INFO: read_group_info,
    WireFormat.KEY_PACKAGE: read_key_package,
}

# Callable[[Writer, Any], None]: each writer takes the body type its key names.
_WRITERS: dict[WireFormat, Callable[[Writer, Any], None]] = {
    WireFormat.PUBLIC_MESSAGE: write_public_message,
    WireFormat.PRIVATE_MESSAGE: write_private_message,
    WireFormat.WELCOME: write_welcome,
    WireFormat.GROUP_INFO: write_group_info,
    WireFormat.KEY_PACKAGE: write_key_package,
}


@dataclass(frozen=True, slots=True)
class MLSMessage:
    version: int
    wire_format: WireFormat
    body: MessageBody
    #: Exact input bytes of the whole message.
    raw: bytes = field(default=b"", repr=False, compare=False)

    @property
    def group_id(self) -> bytes | None:
        """Cleartext group id (PublicMessage, PrivateMessage, GroupInfo)."""
        body = self.body
        if isinstance(body, PublicMessage | PrivateMessage):
            return body.group_id
        if isinstance(body, GroupInfo):
            return body.group_context.group_id
        return None

    @property
    def epoch(self) -> int | None:
        body = self.body
        if isinstance(body, PublicMessage | PrivateMessage):
            return body.epoch
        if isinstance(body, GroupInfo):
            return body.group_context.epoch
        return None

    @property
    def content_type(self) -> ContentType | None:
        if isinstance(self.body, PublicMessage | PrivateMessage):
            return self.body.content_type
        return None


def read_mls_message(r: Reader) -> MLSMessage:
    start = r.pos
    version = r.uint16("version")
    if version != MLS10:
        # Other versions may frame everything differently: nothing more can be read.
        r.fail("version", f"unsupported protocol version {version}", at=start, unsupported=True)
    wire_format = r.enum(WireFormat, 2, "wire_format")
    with r.scope(wire_format.rfc_name.removeprefix("mls_")):
        body = _READERS[wire_format](r)
    return MLSMessage(version, wire_format, body, raw=r.span(start))


def write_mls_message(w: Writer, msg: MLSMessage) -> None:
    w.uint16(msg.version)
    w.uint16(msg.wire_format)
    _WRITERS[msg.wire_format](w, msg.body)


def parse_mls_message(
    data: Buffer, expect: WireFormat | Collection[WireFormat] | None = None
) -> MLSMessage:
    """Parse one whole MLSMessage; trailing bytes are an error.

    ``expect`` restricts the accepted wire formats; anything else raises
    :class:`~protocol.errors.MLSValidationError` (field ``wire_format``).
    Malformed input raises :class:`~protocol.errors.MLSDecodeError`.
    """
    msg = decode_exact(data, read_mls_message, "mls_message")
    if expect is not None:
        allowed = {expect} if isinstance(expect, WireFormat) else set(expect)
        if msg.wire_format not in allowed:
            names = ", ".join(sorted(wf.rfc_name for wf in allowed))
            raise MLSValidationError(
                f"expected {names}, got {msg.wire_format.rfc_name}",
                field="wire_format",
                offset=2,
            )
    return msg


def encode_mls_message(msg: MLSMessage) -> bytes:
    return encode_with(write_mls_message, msg)


def parse_key_package(data: Buffer, bare: bool = True) -> KeyPackage:
    """A KeyPackage, bare (``bare=True``) or inside an MLSMessage (``bare=False``)."""
    if bare:
        return decode_exact(data, read_key_package, "key_package")
    body = parse_mls_message(data, expect=WireFormat.KEY_PACKAGE).body
    assert isinstance(body, KeyPackage)  # guaranteed by expect
    return body
