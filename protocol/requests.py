"""Client requests: typed, validated views of ``op: 1`` frames from a client.

Every request body carries ``id`` (an unsigned integer chosen by the client);
the relay answers each with exactly one ``#result`` frame or one ``#error``
frame carrying the same ``id``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import text
from .errors import InvalidRequest, PayloadTooLarge, UnknownRequest
from .frames import Frame

MAX_REQUEST_ID = 2**53 - 1
MAX_CONVERSATION_ID = 255
MAX_DID = text.MAX_DID
MAX_CLIENT_MESSAGE_ID = 128
MAX_MEMBERS_PER_REQUEST = 1000


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Sizes :func:`parse_request` accepts in one request (the node's rate
    limits are :class:`relay.base.ratelimits.RateLimits`)."""

    max_ciphertext: int = 256 * 1024


@dataclass(frozen=True, slots=True)
class Send:
    id: int
    conversation: bytes
    ciphertext: bytes
    client_message_id: str
    ephemeral: bool
    #: MLS conversations, with a commit only (docs/PROTOCOL.md, "MLS delivery service").
    welcome: bytes = b""
    group_info: bytes = b""
    removes: tuple[str, ...] = ()
    #: A blob uploaded over HTTP that holds the ciphertext (``ciphertext`` is then empty).
    blob: str = ""


@dataclass(frozen=True, slots=True)
class CreateConversation:
    id: int
    conversation: bytes
    members: tuple[str, ...]
    #: MLS group id (an MLS conversation), or None for opaque ciphertexts.
    mls_group_id: bytes | None = None
    external_join: bool = False
    #: "inline" or "blob"; "" takes the relay's default (RELAY_STORAGE_MODEL).
    storage: str = ""


@dataclass(frozen=True, slots=True)
class DeleteConversation:
    id: int
    conversation: bytes


@dataclass(frozen=True, slots=True)
class DeliveryStateRequest:
    id: int
    conversation: bytes
    seqs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class MarkRead:
    id: int
    conversation: bytes
    seq: int


@dataclass(frozen=True, slots=True)
class ReadPositions:
    id: int
    conversation: bytes


@dataclass(frozen=True, slots=True)
class RegisterPush:
    """Register this device for push (``provider`` "" removes the registration)."""

    id: int
    provider: str
    zone: str
    token: str


@dataclass(frozen=True, slots=True)
class AddMembers:
    id: int
    conversation: bytes
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RemoveMembers:
    id: int
    conversation: bytes
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Leave:
    id: int
    conversation: bytes


@dataclass(frozen=True, slots=True)
class ListConversations:
    id: int
    #: At most this many conversations in the reply (one page).
    limit: int = 500
    #: Only conversations whose id sorts after this one (the previous page's ``next``).
    after: bytes = b""


@dataclass(frozen=True, slots=True)
class Subscribe:
    id: int
    #: Explicit cursors by conversation; conversations not listed resume from
    #: the device's stored (acknowledged) cursor.
    cursors: dict[bytes, int]


@dataclass(frozen=True, slots=True)
class Ack:
    id: int
    conversation: bytes
    seq: int


@dataclass(frozen=True, slots=True)
class ClaimKeyPackages:
    id: int
    users: tuple[str, ...]
    cipher_suite: int


Request = (
    Send
    | CreateConversation
    | AddMembers
    | RemoveMembers
    | Leave
    | ListConversations
    | Subscribe
    | Ack
    | ClaimKeyPackages
    | DeleteConversation
    | DeliveryStateRequest
    | MarkRead
    | ReadPositions
    | RegisterPush
)

MAX_SEQS_PER_REQUEST = 1000
#: Conversations per #listConversations page: the default and the maximum.
MAX_LIST_PAGE = 500
MAX_CURSORS_PER_REQUEST = 10_000
#: Seqs (and cursors) are signed 64-bit in storage.
MAX_SEQ = 2**63 - 1
MAX_PUSH_FIELD = 4096
BLOB_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def request_id(frame: Frame) -> int | None:
    """The frame's request id if it has a valid one (used to address errors)."""
    value = frame.body.get("id")
    if type(value) is int and 0 <= value <= MAX_REQUEST_ID:
        return value
    return None


def parse_request(frame: Frame, limits: RequestLimits) -> Request:
    """Validate a client frame; raises InvalidRequest / UnknownRequest."""
    rid = request_id(frame)
    if rid is None:
        raise InvalidRequest("every request needs an integer id in 0..2^53-1", field="id")
    parser = _PARSERS.get(frame.t or "")
    if parser is None:
        raise UnknownRequest(f"unknown request type {text.excerpt(frame.t)}")
    return parser(rid, frame.body, limits)


def _bytes(body: dict[str, Any], key: str, max_len: int) -> bytes:
    value = body.get(key)
    if not isinstance(value, bytes) or not value:
        raise InvalidRequest(f"{key} must be a non-empty byte string", field=key)
    if len(value) > max_len:
        raise InvalidRequest(f"{key} is longer than {max_len} bytes", field=key)
    return value


def _conversation(body: dict[str, Any]) -> bytes:
    return _bytes(body, "conversation", MAX_CONVERSATION_ID)


def _did(value: object, key: str) -> str:
    return text.did(value, key)


def _members(body: dict[str, Any], key: str = "members") -> tuple[str, ...]:
    value = body.get(key)
    if not isinstance(value, list):
        raise InvalidRequest(f"{key} must be a list of DIDs", field=key)
    if len(value) > MAX_MEMBERS_PER_REQUEST:
        raise InvalidRequest(f"at most {MAX_MEMBERS_PER_REQUEST} {key} per request", field=key)
    return tuple(dict.fromkeys(_did(v, key) for v in value))


def _seq(value: object, key: str) -> int:
    # type() is int: a bool is an int in Python, and CBOR true is not a seq.
    if type(value) is not int or value < 0 or value > MAX_SEQ:
        raise InvalidRequest(f"{key} must be an integer in 0..2^63-1", field=key)
    return value


def blob_key(value: object) -> str:
    """A blob key as the relay hands them out (url-safe base64 text)."""
    if (
        not isinstance(value, str)
        or not 16 <= len(value) <= 64
        or not BLOB_KEY_CHARS.issuperset(value)
    ):
        raise InvalidRequest("blob must be a blob key returned by an upload", field="blob")
    return value


def _send(rid: int, body: dict[str, Any], limits: RequestLimits) -> Send:
    conversation = _conversation(body)
    blob = blob_key(body["blob"]) if "blob" in body else ""
    ciphertext = body.get("ciphertext", b"" if blob else None)
    # The type first: with a blob, a falsy non-bytes ([], 0, null) once passed
    # both checks below and failed an assertion (the connection closed 1011).
    if not isinstance(ciphertext, bytes):
        raise InvalidRequest("ciphertext must be a byte string", field="ciphertext")
    if blob and ciphertext:
        raise InvalidRequest("a send carries ciphertext or blob, not both")
    if not blob and not ciphertext:
        raise InvalidRequest("ciphertext must be a non-empty byte string", field="ciphertext")
    if len(ciphertext) > limits.max_ciphertext:
        raise PayloadTooLarge(f"ciphertext is larger than {limits.max_ciphertext} bytes")
    ephemeral = body.get("ephemeral", False)
    if not isinstance(ephemeral, bool):
        raise InvalidRequest("ephemeral must be a boolean")
    cmid = body.get("client_message_id", "")
    if not ephemeral:
        text.storable(cmid, "client_message_id", MAX_CLIENT_MESSAGE_ID, empty=False)
    welcome = _optional_bytes(body, "welcome", limits.max_ciphertext)
    group_info = _optional_bytes(body, "group_info", limits.max_ciphertext)
    removes = _members(body, "removes") if "removes" in body else ()
    if ephemeral and (welcome or group_info or removes or blob):
        raise InvalidRequest("welcome, group_info, removes and blob need a durable send")
    cmid_text = cmid if isinstance(cmid, str) else ""
    return Send(
        rid, conversation, ciphertext, cmid_text, ephemeral, welcome, group_info, removes, blob
    )


def _optional_bytes(body: dict[str, Any], key: str, max_len: int) -> bytes:
    if key not in body:
        return b""
    return _bytes(body, key, max_len)


def _create(rid: int, body: dict[str, Any], limits: RequestLimits) -> CreateConversation:
    conversation = _conversation(body)
    mls = body.get("mls", False)
    external_join = body.get("external_join", False)
    if not isinstance(mls, bool) or not isinstance(external_join, bool):
        raise InvalidRequest("mls and external_join must be booleans")
    group_id = None
    if mls:  # the MLS group id defaults to the conversation id
        group_id = _bytes(body, "group_id", 255) if "group_id" in body else conversation
    elif "group_id" in body or external_join:
        raise InvalidRequest("group_id and external_join need mls: true")
    storage = body.get("storage", "")
    if storage not in ("", "inline", "blob"):
        raise InvalidRequest("storage must be inline or blob")
    return CreateConversation(rid, conversation, _members(body), group_id, external_join, storage)


def _claim(rid: int, body: dict[str, Any], limits: RequestLimits) -> ClaimKeyPackages:
    suite = body.get("cipher_suite")
    if type(suite) is not int or not 0 < suite < 65536:
        raise InvalidRequest("cipher_suite must be an MLS cipher suite number")
    users = _members(body, "users")
    if not users:
        raise InvalidRequest("users must name at least one DID")
    return ClaimKeyPackages(rid, users, suite)


def _add(rid: int, body: dict[str, Any], limits: RequestLimits) -> AddMembers:
    return AddMembers(rid, _conversation(body), _members(body))


def _remove(rid: int, body: dict[str, Any], limits: RequestLimits) -> RemoveMembers:
    return RemoveMembers(rid, _conversation(body), _members(body))


def _leave(rid: int, body: dict[str, Any], limits: RequestLimits) -> Leave:
    return Leave(rid, _conversation(body))


def _list(rid: int, body: dict[str, Any], limits: RequestLimits) -> ListConversations:
    limit = body.get("limit", MAX_LIST_PAGE)
    if type(limit) is not int or not 1 <= limit <= MAX_LIST_PAGE:
        raise InvalidRequest(f"limit must be an integer in 1..{MAX_LIST_PAGE}", field="limit")
    after = body.get("after", b"")  # b"": from the first
    if not isinstance(after, bytes) or len(after) > MAX_CONVERSATION_ID:
        raise InvalidRequest(
            f"after must be a conversation id (bytes, at most {MAX_CONVERSATION_ID})", field="after"
        )
    return ListConversations(rid, limit, after)


def _subscribe(rid: int, body: dict[str, Any], limits: RequestLimits) -> Subscribe:
    raw = body.get("cursors", [])
    if not isinstance(raw, list):
        raise InvalidRequest("cursors must be a list of {conversation, seq}", field="cursors")
    if len(raw) > MAX_CURSORS_PER_REQUEST:
        raise InvalidRequest(
            f"at most {MAX_CURSORS_PER_REQUEST} cursors per #subscribe (the other"
            " conversations resume from their stored cursors)",
            field="cursors",
        )
    cursors: dict[bytes, int] = {}
    for entry in raw:
        if not isinstance(entry, dict):
            raise InvalidRequest("cursors must be a list of {conversation, seq}", field="cursors")
        conversation = _conversation(entry)
        if conversation in cursors:
            raise InvalidRequest("cursors name a conversation twice", field="cursors")
        cursors[conversation] = _seq(entry.get("seq"), "cursors[].seq")
    return Subscribe(rid, cursors)


def _ack(rid: int, body: dict[str, Any], limits: RequestLimits) -> Ack:
    return Ack(rid, _conversation(body), _seq(body.get("seq"), "seq"))


def _delete(rid: int, body: dict[str, Any], limits: RequestLimits) -> DeleteConversation:
    return DeleteConversation(rid, _conversation(body))


def _delivery_state(rid: int, body: dict[str, Any], limits: RequestLimits) -> DeliveryStateRequest:
    seqs = body.get("seqs")
    if not isinstance(seqs, list) or not 0 < len(seqs) <= MAX_SEQS_PER_REQUEST:
        raise InvalidRequest(f"seqs must list 1..{MAX_SEQS_PER_REQUEST} seqs", field="seqs")
    return DeliveryStateRequest(rid, _conversation(body), tuple(_seq(s, "seqs[]") for s in seqs))


def _mark_read(rid: int, body: dict[str, Any], limits: RequestLimits) -> MarkRead:
    return MarkRead(rid, _conversation(body), _seq(body.get("seq"), "seq"))


def _read_positions(rid: int, body: dict[str, Any], limits: RequestLimits) -> ReadPositions:
    return ReadPositions(rid, _conversation(body))


def _text(body: dict[str, Any], key: str, max_len: int) -> str:
    return text.storable(body.get(key, ""), key, max_len)


def _register_push(rid: int, body: dict[str, Any], limits: RequestLimits) -> RegisterPush:
    provider = _text(body, "provider", 64)
    token = _text(body, "token", MAX_PUSH_FIELD)
    if provider and not token:
        raise InvalidRequest("token must name the device for its push provider")
    return RegisterPush(rid, provider, _text(body, "zone", 64), token)


_PARSERS: dict[str, Callable[[int, dict[str, Any], RequestLimits], Request]] = {
    "#send": _send,
    "#createConversation": _create,
    "#addMembers": _add,
    "#removeMembers": _remove,
    "#leave": _leave,
    "#listConversations": _list,
    "#subscribe": _subscribe,
    "#ack": _ack,
    "#claimKeyPackages": _claim,
    "#deleteConversation": _delete,
    "#deliveryState": _delivery_state,
    "#markRead": _mark_read,
    "#readPositions": _read_positions,
    "#registerPush": _register_push,
}
