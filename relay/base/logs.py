"""Structured logs: one JSON object per line, with per-connection context.

Every module keeps using the standard ``logging`` API; :func:`configure`
routes all of it through structlog, which adds the level, a UTC timestamp,
any ``extra={...}`` fields and the context bound with
:func:`connection_context` (session id, node, a short hash of the user).

The context lives in contextvars.  Trio copies the context into each task
at spawn, so binding it at the top of a connection's task tags that
connection's lines and those of every task it starts, and nothing else.

What must never reach the logs: ciphertext, tokens, secrets, and full DIDs
at info level.  :func:`_scrub` enforces this on every line, whatever the
caller passed: sensitive keys are redacted, bytes are replaced by their
length, JWT-shaped strings are removed and DIDs are shortened to their
method plus a hash (debug lines keep DIDs, for local troubleshooting).
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO

import structlog

#: Keys whose values are never logged.
SECRET_KEYS = frozenset(
    {
        "token",
        "access_token",
        "authorization",
        "ciphertext",
        "password",
        "secret",
        "jwt_secret",
        "key_package",
    }
)

_DID = re.compile(r"\bdid:([a-z0-9]+):[A-Za-z0-9._:%\-]+")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*")
_MARK = "_mls_relay_handler"


def user_hash(did: str) -> str:
    """A short stable pseudonym for a DID: correlates lines without naming the user."""
    return hashlib.sha256(did.encode()).hexdigest()[:12]


def short_did(did: str) -> str:
    """``did:web:alice.example`` -> ``did:web:…3f1a9c2b`` (method kept, identifier hashed)."""
    match = _DID.fullmatch(did)
    method = match.group(1) if match else "?"
    return f"did:{method}:…{user_hash(did)[:8]}"


def _hide(value: str) -> str:
    value = _JWT.sub("<token>", value)
    return _DID.sub(lambda m: short_did(m.group(0)), value)


def _scrub(_logger: object, method: str, event: MutableMapping[str, Any]) -> Any:
    keep_dids = event.get("level", method) == "debug"
    for key, value in list(event.items()):
        if key.lower() in SECRET_KEYS:
            event[key] = "<redacted>"
        elif isinstance(value, bytes | bytearray | memoryview):
            event[key] = f"<{len(value)} bytes>"
        elif isinstance(value, str):
            value = _JWT.sub("<token>", value)
            event[key] = value if keep_dids else _DID.sub(lambda m: short_did(m.group(0)), value)
    return event


@contextmanager
def connection_context(session: str, node: str, user: str, device: str) -> Iterator[None]:
    """Tag every line logged by this task (and tasks it starts) with the connection."""
    with structlog.contextvars.bound_contextvars(
        session=session, node=node, user=user_hash(user), device=device[:32]
    ):
        yield


def configure(
    level: str = "INFO", fmt: str = "json", stream: TextIO | None = None
) -> logging.Handler:
    """Route stdlib logging through structlog; returns the installed handler.

    Idempotent: a handler installed by an earlier call is replaced, so tests
    (and `serve` after `check`) can reconfigure without duplicating lines."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _scrub,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _exc_scrub,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    setattr(handler, _MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Hypercorn's access log would print URLs, and ?access_token= with them.
    logging.getLogger("hypercorn.access").setLevel(logging.WARNING)
    return handler


def _exc_scrub(_logger: object, _method: str, event: MutableMapping[str, Any]) -> Any:
    # Tracebacks are rendered after _scrub ran: hide tokens and DIDs in them too.
    exc = event.get("exception")
    if isinstance(exc, str):
        event["exception"] = _hide(exc)
    return event


def remove(handler: logging.Handler) -> None:
    """Undo configure() (tests)."""
    logging.getLogger().removeHandler(handler)
