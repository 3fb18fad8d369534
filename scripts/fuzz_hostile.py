"""Hostile inputs for scripts/fuzz.py: structure-aware generators and oracles.

Byte mutation of valid frames rarely produces a well-formed frame whose one
field holds a lone surrogate or 2^64-1, so these generators build such
inputs on purpose (the input classes of issue 12):

* text: NUL, lone surrogates (written as the UTF-8 bytes of the surrogate,
  as a careless encoder would), invalid and overlong UTF-8 (``c0 80``),
  control and bidi characters, text one past each length limit;
* numbers: negative, 2^53, 2^63-1, 2^63, 2^64-1, 2^64 and beyond (bignum
  tags 2/3), floats (0.0, 1.0, inf, nan), bools, null;
* CBOR structure: any tag around any value, duplicate map keys, indefinite
  lengths, text where bytes belong and the reverse, too many entries;
* SSE cursors, signed token claims and HTTP claim bodies with the same values.

Each target pairs a generator with an oracle: the input must be refused with
a typed RelayError whose message stays short, or parse into something whose
every text and number storage can hold.  Anything else is a finding.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import random
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

from protocol import ssecursor
from protocol.errors import RelayError
from protocol.frames import decode_frame
from protocol.requests import RequestLimits, parse_request
from relay.edge.auth import AuthConfig, Authenticator
from relay.edge.http.keypackages import _claim_body

#: Longest error message any refusal may carry (excerpts are 32 characters).
MAX_MESSAGE = 400


class Finding(Exception):
    """An input the relay accepted although storage could not hold it."""


# --- a CBOR writer that can write what a strict decoder must refuse -----------------


class Tag(NamedTuple):
    number: int
    value: object


class RawText(NamedTuple):
    """A text string holding exactly these bytes (not necessarily UTF-8)."""

    data: bytes


class Dup(NamedTuple):
    """A map written with these pairs as they are (a key may repeat)."""

    pairs: list[tuple[object, object]]


class Indef(NamedTuple):
    """An array, map, text or byte string written with an indefinite length."""

    value: object


def _head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for extra, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
        if n < 1 << (8 * struct.calcsize(fmt)):
            return bytes([major << 5 | extra]) + struct.pack(fmt, n)
    raise ValueError(n)


def cbor(v: object) -> bytes:
    if v is False or v is True or v is None:
        return {False: b"\xf4", True: b"\xf5", None: b"\xf6"}[v]
    if isinstance(v, int):
        if v >= 0:
            if v < 1 << 64:
                return _head(0, v)
            return cbor(Tag(2, v.to_bytes((v.bit_length() + 7) // 8, "big")))
        if -1 - v < 1 << 64:
            return _head(1, -1 - v)
        n = -1 - v
        return cbor(Tag(3, n.to_bytes((n.bit_length() + 7) // 8, "big")))
    if isinstance(v, float):
        return b"\xfb" + struct.pack(">d", v)
    if isinstance(v, bytes):
        return _head(2, len(v)) + v
    if isinstance(v, str):
        data = v.encode("utf-8", "surrogatepass")  # a lone surrogate as ED A0 80
        return _head(3, len(data)) + data
    if isinstance(v, RawText):
        return _head(3, len(v.data)) + v.data
    if isinstance(v, Tag):
        return _head(6, v.number) + cbor(v.value)
    if isinstance(v, Dup):
        return _head(5, len(v.pairs)) + b"".join(cbor(k) + cbor(x) for k, x in v.pairs)
    if isinstance(v, Indef):
        return _indefinite(v.value)
    if isinstance(v, list | tuple):
        return _head(4, len(v)) + b"".join(cbor(x) for x in v)
    if isinstance(v, dict):
        return _head(5, len(v)) + b"".join(cbor(k) + cbor(x) for k, x in v.items())
    raise TypeError(type(v))


def _indefinite(v: object) -> bytes:
    if isinstance(v, list | tuple):
        return b"\x9f" + b"".join(cbor(x) for x in v) + b"\xff"
    if isinstance(v, dict):
        return b"\xbf" + b"".join(cbor(k) + cbor(x) for k, x in v.items()) + b"\xff"
    if isinstance(v, str):
        half = len(v) // 2
        return b"\x7f" + cbor(v[:half]) + cbor(v[half:]) + b"\xff"
    if isinstance(v, bytes):
        half = len(v) // 2
        return b"\x5f" + cbor(v[:half]) + cbor(v[half:]) + b"\xff"
    return cbor(v)


# --- hostile values ---------------------------------------------------------------------

HOSTILE_TEXT: list[object] = [
    "",
    "\x00",
    "a\x00b",
    "\ud800",
    "x\udc00y",
    "\udfff\ud800",  # a reversed pair: two lone surrogates
    "did:example:\ud83d",
    "did:plc:\x00",
    "did:e:\n",
    "\x7f",
    "\x1b[31mred",
    "\u202egnp.exe",
    "\ufeff",
    "\U0010ffff",
    "c" * 129,
    "d" * 257,
    "did:" + "e" * 2045,
    "x" * 4097,
    RawText(b"\xc0\x80"),  # an overlong NUL
    RawText(b"\xed\xa0\x80"),
    RawText(b"\xff\xfe"),
    RawText(b"a\xf4\x90\x80\x80"),  # past U+10FFFF
]
HOSTILE_NUMBERS: list[object] = [
    -1,
    -(2**63),
    -(2**64),
    2**53,
    2**63 - 2,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    2**100,
    65536,
    0.0,
    -0.0,
    1.0,
    1.5,
    float("inf"),
    float("-inf"),
    float("nan"),
    True,
    False,
    None,
    Tag(2, b"\x01"),
    Tag(3, b"\x00"),
    Tag(1, 0),
    Tag(0, "2026-01-01T00:00:00Z"),
]
TAGS = [0, 1, 2, 3, 4, 5, 21, 24, 25, 28, 29, 32, 42, 256, 258, 55799, 2**64 - 1]


def hostile_value(rng: random.Random) -> object:
    kind = rng.random()
    if kind < 0.4:
        return rng.choice(HOSTILE_TEXT)
    if kind < 0.8:
        return rng.choice(HOSTILE_NUMBERS)
    return rng.choice([b"", b"\x00" * 256, [], {}, [b"x"] * 3, {"a": 1}, b"x" * 300])


def _pick(rng: random.Random, body: dict[str, Any]) -> tuple[Any, Any]:
    """A container and a key or index in it, anywhere in ``body``."""
    node: Any = body
    key: Any = rng.choice(list(body)) if body else None
    while rng.random() < 0.5 and isinstance(node[key], list | dict) and node[key]:
        node = node[key]
        key = rng.randrange(len(node)) if isinstance(node, list) else rng.choice(list(node))
    return node, key


def _structure(rng: random.Random, value: object) -> object:
    """The same value, written in a way the strict decoder must refuse."""
    choice = rng.randrange(4)
    if choice == 0:
        return Tag(rng.choice(TAGS), value)
    if choice == 1 and isinstance(value, dict) and value:
        pairs = list(value.items())
        k, _ = rng.choice(pairs)
        pairs.insert(rng.randrange(len(pairs) + 1), (k, hostile_value(rng)))
        return Dup(pairs)
    if choice == 2:
        return Indef(value)
    if choice == 3 and isinstance(value, dict) and value:
        k = rng.choice(list(value))
        return {**{x: y for x, y in value.items() if x != k}, rng.choice([1, b"k", 1.5]): value[k]}
    return Tag(rng.choice(TAGS), value)


# --- WebSocket requests --------------------------------------------------------------------


def _templates(rng: random.Random, conv: bytes | None = None) -> list[tuple[str, dict[str, Any]]]:
    conv = conv or rng.randbytes(rng.randint(1, 32))
    did = "did:example:" + rng.choice(["alice", "bob", "carol"])
    return [
        ("#send", {"id": 1, "conversation": conv, "ciphertext": b"c" * 16,
                   "client_message_id": "m-1", "ephemeral": False}),
        ("#send", {"id": 2, "conversation": conv, "ciphertext": b"", "blob": "A" * 43,
                   "client_message_id": "m-2", "removes": [did], "welcome": b"w",
                   "group_info": b"g"}),
        ("#createConversation", {"id": 3, "conversation": conv, "members": [did, did + "2"],
                                 "mls": True, "group_id": b"g", "external_join": True,
                                 "storage": "blob"}),
        ("#addMembers", {"id": 4, "conversation": conv, "members": [did]}),
        ("#removeMembers", {"id": 5, "conversation": conv, "members": [did]}),
        ("#leave", {"id": 6, "conversation": conv}),
        ("#listConversations", {"id": 7}),
        ("#subscribe", {"id": 8, "cursors": [{"conversation": conv, "seq": 5},
                                             {"conversation": conv + b"2", "seq": 0}]}),
        ("#ack", {"id": 9, "conversation": conv, "seq": 3}),
        ("#claimKeyPackages", {"id": 10, "users": [did], "cipher_suite": 1}),
        ("#deleteConversation", {"id": 11, "conversation": conv}),
        ("#deliveryState", {"id": 12, "conversation": conv, "seqs": [1, 2, 3]}),
        ("#markRead", {"id": 13, "conversation": conv, "seq": 2}),
        ("#readPositions", {"id": 14, "conversation": conv}),
        ("#registerPush", {"id": 15, "provider": "fcm", "zone": "eu", "token": "tok"}),
    ]  # fmt: skip


def request_input(rng: random.Random, conversation: bytes | None = None) -> bytes:
    """One frame: a valid request with one hostile change (or a few);
    ``conversation``: the one valid requests name (else a random id)."""
    t, body = rng.choice(_templates(rng, conversation))
    header: dict[str, Any] = {"op": 1, "t": t}
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        where = rng.random()
        if where < 0.1:
            k = rng.choice(["op", "t"])
            header[k] = hostile_value(rng) if rng.random() < 0.7 else _structure(rng, header[k])
        elif where < 0.75 and body:
            node, key = _pick(rng, body)
            node[key] = hostile_value(rng)
        elif where < 0.85 and "cursors" in body:
            body["cursors"] = [{"conversation": bytes([i % 256, i // 256]), "seq": i}
                               for i in range(rng.choice((10_001, 513, 2)))]  # fmt: skip
        else:
            node, key = _pick(rng, body)
            node[key] = _structure(rng, node[key])
    outer_header: object = header
    outer_body: object = body
    if rng.random() < 0.1:
        outer_body = _structure(rng, body)
    if rng.random() < 0.05:
        outer_header = _structure(rng, header)
    return cbor(outer_header) + cbor(outer_body)


def _leaves(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths to every field of a body (a list: its first element)."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in [(*path, k), *_leaves(v, (*path, k))]]
    if isinstance(node, list) and node:
        return [(*path, 0), *_leaves(node[0], (*path, 0))]
    return []


def every_field_input(conversation: bytes) -> list[bytes]:
    """Every request type x every field x every hostile value, one change per
    frame, as well-formed CBOR: the systematic sweep for live runs."""
    frames = []
    # Leaving and deleting last: a valid one ends the sender's membership.
    templates = sorted(
        _templates(random.Random(0), conversation),
        key=lambda tb: tb[0] in ("#leave", "#deleteConversation"),
    )
    for t, body in templates:
        for path in _leaves(body):
            for value in [*HOSTILE_TEXT, *HOSTILE_NUMBERS]:
                changed = json_copy(body)
                node = changed
                for step in path[:-1]:
                    node = node[step]
                node[path[-1]] = value
                frames.append(cbor({"op": 1, "t": t}) + cbor(_plain(changed)))
    return frames


def json_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_copy(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    """``value`` with the text a strict decoder refuses (invalid UTF-8) made valid."""
    if isinstance(value, RawText):
        return value.data.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Tag):
        return _plain(value.value)
    return value


_BOOL_FIELDS = {"ephemeral", "external_join"}
_DID_FIELDS = {"members", "removes", "users"}
_INT_MAX = {"id": 2**53 - 1, "cipher_suite": 65535}


def _check_text(value: str, name: str) -> None:
    if "\x00" in value:
        raise Finding(f"{name} holds NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Finding(f"{name} holds a lone surrogate") from None
    if name in _DID_FIELDS and not (value.isascii() and value.isprintable()):
        raise Finding(f"{name} is not printable ASCII")


def _check_value(value: object, name: str) -> None:
    if isinstance(value, bool):
        if name not in _BOOL_FIELDS:
            raise Finding(f"{name} is a bool")
    elif isinstance(value, int):
        if not 0 <= value <= _INT_MAX.get(name, 2**63 - 1):
            raise Finding(f"{name}={value} out of range")
    elif isinstance(value, float):
        raise Finding(f"{name} is a float")
    elif isinstance(value, str):
        _check_text(value, name)
    elif isinstance(value, tuple | list):
        for item in value:
            _check_value(item, name)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_value(k, name)
            _check_value(v, "seq")
    elif value is not None and not isinstance(value, bytes):
        raise Finding(f"{name} is a {type(value).__name__}")


def request_oracle(data: bytes) -> bool:
    request = parse_request(decode_frame(data), RequestLimits())
    for f in dataclasses.fields(request):  # type: ignore[arg-type]
        _check_value(getattr(request, f.name), f.name)
    return True


# --- SSE cursors --------------------------------------------------------------------------


def cursor_input(rng: random.Random) -> str:
    entries: list[Any] = [[rng.randbytes(rng.randint(1, 40)), rng.randrange(2**20)]
                          for _ in range(rng.choice((0, 1, 3, 20, 512, 513)))]  # fmt: skip
    if entries and rng.random() < 0.7:
        entry = rng.choice(entries)
        entry[rng.randrange(2)] = hostile_value(rng)
    if entries and rng.random() < 0.2:
        entries.append(list(entries[0]))  # the same conversation twice
    if entries and rng.random() < 0.1:
        rng.choice(entries).append(1)
    value: object = entries
    if rng.random() < 0.15:
        value = _structure(rng, entries)
    raw = cbor(value)
    if rng.random() < 0.15:
        raw = raw[: rng.randrange(len(raw) + 1)] + rng.randbytes(rng.randint(0, 3))
    text = "v1." + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    twist = rng.random()
    if twist < 0.03:
        text = "v2" + text[2:]
    elif twist < 0.06:
        text += "="
    elif twist < 0.09:
        text = text[:-1] + rng.choice("!é\x00\ud800 +/")
    return text


def cursor_oracle(text: str) -> bool:
    positions = ssecursor.decode(text)
    if len(positions) > ssecursor.MAX_CURSOR_ENTRIES:
        raise Finding(f"{len(positions)} cursor entries")
    for conv, seq in positions.items():
        if type(conv) is not bytes or not 1 <= len(conv) <= 255:
            raise Finding(f"cursor conversation {conv!r:.40}")
        if type(seq) is not int or not 0 <= seq <= 2**63 - 1:
            raise Finding(f"cursor seq {seq!r}")
    return True


# --- token claims --------------------------------------------------------------------------

SECRET = "fuzz-secret-" + "k" * 40
AUDIENCE = "did:web:relay.example"
NOW = 1_800_000_000
AUTH = Authenticator(
    AuthConfig(audience=AUDIENCE, hs256_secret=SECRET, max_lifetime_s=86400),
    clock=lambda: NOW,
)


def _claim_value(rng: random.Random) -> object:
    v = hostile_value(rng)
    if isinstance(v, RawText):
        return v.data.decode("utf-8", "surrogateescape")  # unpaired surrogates in JSON
    try:
        json.dumps(v)
    except TypeError:  # bytes and tags have no JSON form: a list where text belongs
        return [1]
    return v


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """An HS256-signed token, written by hand: JSON escapes for lone
    surrogates, NaN and Infinity pass through as a careless issuer's would."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def token_input(rng: random.Random) -> str:
    claims: dict[str, Any] = {"sub": "did:example:alice", "aud": AUDIENCE, "iat": NOW - 10,
                              "exp": NOW + 600, "jti": "j-1", "device": "laptop"}  # fmt: skip
    for _ in range(rng.choice((1, 1, 2))):
        key = rng.choice([*claims, "nbf"])
        if rng.random() < 0.1:
            claims.pop(key, None)
        else:
            claims[key] = _claim_value(rng)
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    if rng.random() < 0.1:
        header = {"alg": rng.choice(["none", "HS512", "hs256", "ES256", ""]), "kid": "\x00"}
    token = sign(header, claims)
    if rng.random() < 0.05:
        token = token[: rng.randrange(len(token))] + rng.choice([".", "\x00", "é", ""])
    return token


def token_oracle(token: str) -> bool:
    identity = AUTH.verify(token)
    _check_text(identity.user, "users")
    for name, value, limit in (("device", identity.device, 128), ("jti", identity.jti, 256)):
        _check_text(value, name)
        if not value or len(value) > limit or not value.isprintable():
            raise Finding(f"{name} {value!r:.40} accepted")
    if type(identity.expires_at) is not int or identity.expires_at > 2**63 - 1:
        raise Finding(f"exp {identity.expires_at!r}")
    return True


# --- HTTP claim bodies ----------------------------------------------------------------------


def claim_json_input(rng: random.Random) -> bytes:
    users: list[object] = ["did:example:bob"] * rng.choice((1, 2, 100, 101))
    suite: object = 1
    roll = rng.random()
    if roll < 0.45:
        users[rng.randrange(len(users))] = _claim_value(rng)
    elif roll < 0.8:
        suite = _claim_value(rng)
    body = json.dumps({"users": users, "cipher_suite": suite})
    twist = rng.random()
    if twist < 0.05:
        body = body[:-1] + ', "users": ["did:x:\\u0000"]}'  # a duplicate key, last wins
    elif twist < 0.1:
        body = "[" * rng.choice((1000, 100_000)) + "]" * 3
    elif twist < 0.15:
        body = body.replace("1}", rng.choice(["1e400}", "9" * 5000 + "}", "NaN}", "-0}"]))
    raw = body.encode("utf-8", "surrogatepass")
    if twist > 0.95:
        raw = raw[: rng.randrange(len(raw) + 1)] + b"\xff"
    return raw


def claim_json_oracle(raw: bytes) -> bool:
    users, suite = _claim_body(raw)
    if not 1 <= len(users) <= 100:
        raise Finding(f"{len(users)} users")
    for u in users:
        _check_text(u, "users")
    if type(suite) is not int or not 0 < suite < 65536:
        raise Finding(f"cipher_suite {suite!r}")
    return True


class Target(NamedTuple):
    name: str
    generate: Callable[[random.Random], Any]
    check: Callable[[Any], bool]


TARGETS = [
    Target("hostile-requests", request_input, request_oracle),
    Target("sse-cursor", cursor_input, cursor_oracle),
    Target("token-claims", token_input, token_oracle),
    Target("claim-json", claim_json_input, claim_json_oracle),
]


def refusal_ok(exc: RelayError) -> None:
    """A refusal must be short: error messages quote an excerpt, never the input."""
    message = str(exc)
    if len(message) > MAX_MESSAGE:
        raise Finding(f"{type(exc).__name__} message of {len(message)} characters")
    for value in exc.details.values():
        if isinstance(value, str | bytes) and len(value) > MAX_MESSAGE:
            raise Finding(f"{type(exc).__name__} detail of {len(value)} characters")
