"""The one error tree of mls-relay.

Every failure a client, an operator or a test can observe is a subclass of
:class:`RelayError`.  Each class carries the wire name (``error``) that the
edges translate it into: a ``#error`` frame body on the WebSocket, a JSON
``{error, message}`` body over HTTP.  Storage backends, the session logic and
the protocol codec raise these; only the edges translate them.
"""

from __future__ import annotations

import secrets

from .closecodes import CloseCode


class RelayError(Exception):
    """Base of every error mls-relay reports."""

    #: Name sent on the wire (``{"error": ...}``).
    error: str = "InternalError"
    #: HTTP status used when this error reaches the HTTP edge.
    http_status: int = 500
    #: Whether the same request may succeed if retried unchanged.
    retryable: bool = False

    def __init__(self, message: str = "", **details: object) -> None:
        super().__init__(message or self.error)
        self.message = message or self.error
        self.details = details

    def to_body(self) -> dict[str, object]:
        body: dict[str, object] = {"error": self.error, "message": self.message}
        body.update(self.details)
        return body


# --- framing / protocol -----------------------------------------------------


class ProtocolError(RelayError):
    """The peer broke the wire protocol; the connection is closed."""

    error = "ProtocolError"
    http_status = 400
    close_code = CloseCode.PROTOCOL_ERROR


class MalformedFrame(ProtocolError):
    error = "MalformedFrame"
    close_code = CloseCode.MALFORMED_FRAME


class FrameTooLarge(ProtocolError):
    error = "FrameTooLarge"
    close_code = CloseCode.TOO_BIG


class UnsupportedWebSocketVersion(ProtocolError):
    """An upgrade asking for another WebSocket version than 13: answered 400
    with ``Sec-WebSocket-Version: 13`` (RFC 6455 §4.2.2)."""

    error = "UnsupportedWebSocketVersion"


class InvalidFramePayload(ProtocolError):
    """Data inconsistent with its frame type (a close reason that is not UTF-8)."""

    error = "InvalidFramePayload"
    close_code = CloseCode.INVALID_PAYLOAD


class InvalidRequest(RelayError):
    """A well-framed request whose fields are wrong; the connection stays up."""

    error = "InvalidRequest"
    http_status = 400


class UnknownRequest(InvalidRequest):
    error = "UnknownRequest"


class AlreadySubscribed(InvalidRequest):
    """A second ``#subscribe`` on one connection, also one sent while the first
    is still being set up (pipelined): one subscription per connection."""

    error = "AlreadySubscribed"


# --- authentication / authorization -----------------------------------------


class AuthError(RelayError):
    error = "AuthRequired"
    http_status = 401


class AuthRequired(AuthError):
    """No credentials at all: no token, an empty one, or another scheme than Bearer."""

    error = "AuthRequired"


class InvalidToken(AuthError):
    error = "InvalidToken"


class ExpiredToken(AuthError):
    error = "ExpiredToken"


class NotMember(RelayError):
    error = "NotMember"
    http_status = 403


class Forbidden(RelayError):
    error = "Forbidden"
    http_status = 403


# --- conversations / messages -----------------------------------------------


class ConversationNotFound(RelayError):
    error = "ConversationNotFound"
    http_status = 404


class ConversationExists(RelayError):
    error = "ConversationExists"
    http_status = 409


class FutureCursor(RelayError):
    error = "FutureCursor"
    http_status = 400


class OutdatedCursor(RelayError):
    """Not sent as an error: announced as ``#info`` before a partial replay."""

    error = "OutdatedCursor"


class PayloadTooLarge(InvalidRequest):
    error = "PayloadTooLarge"
    http_status = 413


class RequestTimeout(InvalidRequest):
    """An HTTP request body that did not arrive in time (idle, or too slow)."""

    error = "RequestTimeout"
    http_status = 408


class LengthRequired(InvalidRequest):
    """An HTTP upload without Content-Length where the relay needs the size first."""

    error = "LengthRequired"
    http_status = 411


# --- capacity / availability --------------------------------------------------


class Unavailable(RelayError):
    """A dependency (database) is unreachable; retry later."""

    error = "Unavailable"
    http_status = 503
    retryable = True


class RateLimited(RelayError):
    error = "RateLimited"
    http_status = 429
    retryable = True


class TooManyConnections(RateLimited):
    """The user holds RELAY_CONNECTIONS_PER_USER connections (WebSockets and
    SSE streams, across nodes) already."""

    error = "TooManyConnections"


class TooManyRequests(RateLimited):
    """The user has RELAY_HTTP_REQUESTS_PER_USER HTTP requests (or
    RELAY_TRANSFERS_PER_USER blob transfers) in progress on this node already."""

    error = "TooManyRequests"


class TooManyConnectionsFromAddress(RateLimited):
    """The source address holds RELAY_CONNECTIONS_PER_ADDRESS connections
    (open or still in their handshake) on this node already."""

    error = "TooManyConnectionsFromAddress"


class NodeBusy(Unavailable):
    """This node is at a node-wide cap (RELAY_MAX_CONNECTIONS, RELAY_TRANSFERS);
    retry later or connect to another node."""

    error = "NodeBusy"


class RateLimitIgnored(ProtocolError):
    """The client kept sending after RateLimited replies (more than
    RELAY_RATE_LIMIT_STRIKES of them in about a minute): the WebSocket is
    closed with 1008 (policy violation)."""

    error = "RateLimitIgnored"
    http_status = 429
    close_code = CloseCode.POLICY_VIOLATION


class TooManyConnectionAttempts(RateLimited):
    """The source address opened new connections faster than
    RELAY_CONNECT_RATE_PER_ADDRESS per second (after a burst of
    RELAY_CONNECT_BURST_PER_ADDRESS); ``retry_after_ms`` says when one more fits."""

    error = "TooManyConnectionAttempts"


class MessageTimeout(ProtocolError):
    """A WebSocket message begun and not finished in time: more than
    RELAY_HANDSHAKE_TIMEOUT_S plus RELAY_MAX_FRAME at 64 KiB/s while the
    relay waited on the client (a byte now and then would otherwise hold a
    connection and its message buffer forever).  Closed with 1008."""

    error = "MessageTimeout"
    http_status = 408
    close_code = CloseCode.POLICY_VIOLATION


class ShuttingDown(Unavailable):
    error = "ShuttingDown"


class ConfigError(RelayError):
    """A setting the operator gave is invalid; the process refuses to start.

    Defined here, not in relay/base/config.py, because storage validates its own
    settings (blob store URLs) and storage never imports the server."""

    error = "ConfigError"


class StorageError(RelayError):
    """The store failed in a way that is not an outage: a database error we did
    not expect (a constraint the edge should have checked first), a damaged blob."""

    error = "InternalError"


class InternalBug(RelayError):
    """The relay's own code broke a rule it relies on (a driver answering with a
    wrong number of rows, a state that cannot happen): a bug, not a storage
    failure.  Like every InternalError it reaches the client as an Incident."""

    error = "InternalError"


# --- MLS wire format (protocol/mls) -------------------------------------------


class MLSDecodeError(InvalidRequest):
    """Bytes that do not parse as the MLS (RFC 9420) structure the caller expected.

    ``details`` carry ``field`` (a dotted path such as ``key_package.leaf_node.credential``)
    and ``offset`` (byte offset into the input) when they are known.
    """

    error = "MalformedMLS"


class MLSUnsupportedError(MLSDecodeError):
    """Well-formed up to a value this parser cannot read past.

    MLS selects some bodies by a type code and gives them no length prefix (credential
    types, proposal types, ...), so an unknown code ends the parse.
    """

    error = "UnsupportedMLS"


class MLSValidationError(InvalidRequest):
    """An MLS object that parses but fails a check (signature, version, source, ...)."""

    error = "InvalidMLS"


class MLSUnsupportedCipherSuite(MLSValidationError):
    """The cipher suite has no hash/signature implementation here, so nothing can be checked."""

    error = "UnsupportedCipherSuite"


# --- MLS delivery service (epochs, key packages, welcomes) --------------------------


class EpochError(RelayError):
    """A handshake or application message does not fit the conversation's epoch.

    ``details`` carry ``epoch`` (the conversation's current epoch).
    """

    error = "EpochError"
    http_status = 409


class StaleCommit(EpochError):
    """Another commit for this epoch already won; process it and retry."""

    error = "StaleCommit"


class FutureEpoch(EpochError):
    error = "FutureEpoch"


class StaleEpoch(EpochError):
    """A proposal for a past epoch, or an application message older than the window."""

    error = "StaleEpoch"


class WrongGroup(InvalidRequest):
    """The MLS header's group_id is not the conversation's."""

    error = "WrongGroup"


class NotMLSConversation(InvalidRequest):
    error = "NotMLSConversation"


class UnknownKeyPackage(InvalidRequest):
    """A Welcome names a KeyPackageRef the committer never claimed through the relay."""

    error = "UnknownKeyPackage"


class CredentialMismatch(Forbidden):
    """A KeyPackage's credential identity is not the uploading user's DID."""

    error = "CredentialMismatch"


# --- single-use tokens (relay/offline/retention.py) ------------------------------------------


class TokenReplayed(InvalidToken):
    """The token's ``jti`` already opened a connection (on any node): mint a fresh token."""

    error = "TokenReplayed"


# --- blobs, delivery state, push (relay/offline/) ---


class BlobNotFound(RelayError):
    """No such blob, or not one the caller may read (existence is not revealed)."""

    error = "BlobNotFound"
    http_status = 404


class BlobsDisabled(InvalidRequest):
    """The conversation's storage model is ``inline``: it takes no blobs."""

    error = "BlobsDisabled"
    http_status = 409


class BlobStoreError(Unavailable):
    """The blob store (filesystem or S3) failed or is unreachable; retry later."""

    error = "BlobStoreUnavailable"


class UnknownPushProvider(InvalidRequest):
    """The push provider named at registration is not configured on the relay."""

    error = "UnknownPushProvider"


# --- storage quotas (storage/quotas.py) ------------------------------------------------


class QuotaExceeded(RelayError):
    """What a user may keep stored is bounded; this request would pass a bound.
    Nothing of the request is stored.  ``details`` carry ``limit`` (the bound)
    and, where it is counted, ``used``.

    403, not 429 (waiting does not help: something must be claimed, deleted or
    collected first) and not 507 (a 5xx is what load balancers count as a
    failing node, and any user could produce them at will)."""

    error = "QuotaExceeded"
    http_status = 403


class TooManyKeyPackages(QuotaExceeded):
    """The device would hold more than RELAY_MAX_KEYPACKAGES_PER_DEVICE
    unclaimed KeyPackages; the whole upload is refused."""

    error = "TooManyKeyPackages"


class TooManyDevices(QuotaExceeded):
    """The user already has RELAY_MAX_KEYPACKAGE_DEVICES_PER_USER devices that
    uploaded KeyPackages; a new device's upload is refused."""

    error = "TooManyDevices"


class BlobQuotaExceeded(QuotaExceeded):
    """The user's stored blobs plus this one would pass RELAY_BLOB_QUOTA_BYTES."""

    error = "BlobQuotaExceeded"


class TooManyConversations(QuotaExceeded):
    """The user already created RELAY_MAX_CONVERSATIONS_PER_USER conversations
    that still exist or that it deleted in the last 24 hours."""

    error = "TooManyConversations"


class TooManyMembers(QuotaExceeded):
    """The conversation would have more than RELAY_MAX_MEMBERS members."""

    error = "TooManyMembers"


# --- incidents (relay/base/incidents.py) ---------------------------------------------------


def new_incident_id() -> str:
    """A short random id that ties one InternalError reply to one log line."""
    return secrets.token_hex(8)


class Incident(RelayError):
    """An unexpected failure on the relay's side: a bug, or data storage refused
    that the edge should have refused first.  The reply carries ``incident``, the
    id of the one log line that describes it (with the exception), so a user's
    report can be matched with the operator's log.

    Retryable: the relay cannot tell a passing fault from a lasting one, and
    resending a ``#send`` with the same ``client_message_id`` is idempotent."""

    error = "InternalError"
    http_status = 500
    retryable = True

    def __init__(self, message: str = "", incident: str = "", **details: object) -> None:
        incident = incident or new_incident_id()
        super().__init__(message or f"internal error (incident {incident}); retry later", **details)
        self.details["incident"] = incident

    @property
    def incident(self) -> str:
        return str(self.details["incident"])
