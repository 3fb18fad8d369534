"""Text a client or a token supplies, checked before anything stores or uses it.

Every text field that reaches storage passes through here first: PostgreSQL
refuses NUL in ``text`` columns and both backends refuse lone surrogates
(they cannot be encoded as UTF-8), and an item they refuse inside a group
commit would fail the whole batch.  So such text is refused at the edge, as
:class:`~protocol.errors.InvalidRequest` naming the field, and storage only
ever sees text it can hold.

No I/O, no Trio: plain functions, cheap enough for the hot path (a send's
``client_message_id`` is checked here on every send).
"""

from __future__ import annotations

from .errors import InvalidRequest

#: Longest DID accepted anywhere (AT Protocol's limit is 2 KiB).
MAX_DID = 2048
#: Longest excerpt of client input an error message may quote.
MAX_EXCERPT = 32


def storable(value: object, field: str, max_len: int, *, empty: bool = True) -> str:
    """``value`` if it is text storage can hold, at most ``max_len`` characters.

    Refused: non-text, NUL, lone surrogates, more than ``max_len`` characters,
    and the empty string unless ``empty``."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{field} must be text", field=field)
    if len(value) > max_len:
        raise InvalidRequest(f"{field} is longer than {max_len} characters", field=field)
    if not value and not empty:
        raise InvalidRequest(f"{field} must not be empty", field=field)
    if not value.isascii() or "\x00" in value:
        _check_unicode(value, field)
    return value


def _check_unicode(value: str, field: str) -> None:
    if "\x00" in value:
        raise InvalidRequest(f"{field} must not contain NUL", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            f"{field} must be valid Unicode (no lone surrogates)", field=field
        ) from None


def printable(value: object, field: str, max_len: int) -> str:
    """An identifier (a device id, a token id): non-empty text storage can hold,
    at most ``max_len`` characters, without control characters (it appears in
    logs and push requests).  Any printable Unicode is accepted."""
    storable(value, field, max_len, empty=False)
    assert isinstance(value, str)
    if not value.isprintable():
        raise InvalidRequest(f"{field} must not contain control characters", field=field)
    return value


def did(value: object, field: str) -> str:
    """A DID: ``did:`` then printable ASCII without spaces, at most MAX_DID characters.

    DIDs are ASCII by definition (W3C DID syntax, AT Protocol's DID rules), so
    this one check also keeps NUL, surrogates and control characters out."""
    if (
        not isinstance(value, str)
        or not 4 < len(value) <= MAX_DID
        or not value.startswith("did:")
        or not value.isascii()
        or not value.isprintable()
        or " " in value
    ):
        raise InvalidRequest(
            f"{field} must hold DIDs ('did:' then printable ASCII, at most {MAX_DID})",
            field=field,
        )
    return value


def excerpt(value: object) -> str:
    """A short, printable quotation of client input for an error message."""
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    if not text.isprintable():
        text = "".join(c if c.isprintable() else "?" for c in text)
    if len(text) > MAX_EXCERPT:
        return repr(text[:MAX_EXCERPT]) + "…"
    return repr(text)
