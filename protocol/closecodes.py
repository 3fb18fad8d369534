"""WebSocket close codes and close reasons: their one definition.

docs/PROTOCOL.md ("Close codes") lists them for clients.  A close caused by a
refusal (:class:`protocol.errors.ProtocolError` and its subclasses) carries the
error's ``close_code`` and its error name as the reason; the closes the relay
decides on its own (a slow reader, an expired token, a restart...) carry a
:class:`CloseReason`, which SSE streams also name in their last ``info``
event.  Both enums are ``int``/``str`` subclasses, so they go on the wire as
the plain values they stand for.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

__all__ = ["CloseCode", "CloseReason"]


class CloseCode(IntEnum):
    NORMAL = 1000
    #: PingTimeout: the client stopped answering pings.
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    #: A close reason that is not UTF-8.
    INVALID_PAYLOAD = 1007
    #: RateLimitIgnored.
    POLICY_VIOLATION = 1008
    TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    CONSUMER_TOO_SLOW = 4008
    MALFORMED_FRAME = 4400
    TOKEN_EXPIRED = 4401
    REPLACED = 4409


class CloseReason(StrEnum):
    PING_TIMEOUT = "PingTimeout"
    INTERNAL_ERROR = "InternalError"
    SERVICE_RESTART = "ServiceRestart"
    CONSUMER_TOO_SLOW = "ConsumerTooSlow"
    TOKEN_EXPIRED = "TokenExpired"
    REPLACED = "ReplacedByNewConnection"
