"""The MLS delivery service (RFC 9420 §16) around the relay's ordered streams.

Framing is decided by the conversation, never by sniffing: a conversation
created with ``mls: true`` has an MLS group id, and every durable ``#send`` in
it must carry one MLSMessage (PublicMessage or PrivateMessage) in
``ciphertext``.  This module reads the cleartext header (group_id, epoch,
content type, sender type), refuses application data in a PublicMessage, and
hands storage a :class:`~storage.base.NewMessage` whose epoch check runs in
the append transaction.  It also validates KeyPackage uploads and rate-limits
claims (in-process token buckets; cross-node limits are future work).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from protocol.errors import (
    CredentialMismatch,
    InvalidRequest,
    MLSDecodeError,
    MLSUnsupportedCipherSuite,
    MLSValidationError,
    NotMLSConversation,
    RateLimited,
    RelayError,
)
from protocol.mls import (
    ContentType,
    CredentialType,
    GroupInfo,
    KeyPackagePolicy,
    PublicMessage,
    SenderType,
    Welcome,
    WireFormat,
    key_package_ref,
    parse_key_package,
    parse_mls_message,
    validate_handshake_framing,
    validate_key_package,
)
from protocol.requests import Send
from storage.base import ClaimResult, NewKeyPackage, NewMessage

if TYPE_CHECKING:
    from .app import Relay

ETERNAL = 2**64 - 1
_KINDS = {
    ContentType.APPLICATION: "application",
    ContentType.PROPOSAL: "proposal",
    ContentType.COMMIT: "commit",
}


class TokenBuckets:
    """Per-key token buckets: ``rate`` tokens per second, at most ``burst``."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, n: float = 1.0) -> float:
        """Take ``n`` tokens: 0.0 when allowed, else seconds until they would be."""
        now = self.clock()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < n:
            self._buckets[key] = (tokens, now)
            return (n - tokens) / self.rate if self.rate > 0 else float("inf")
        self._buckets[key] = (tokens - n, now)
        if len(self._buckets) > 10_000:  # forget full buckets: they hold no state
            full = [k for k, (t, a) in self._buckets.items() if t + (now - a) * self.rate >= n]
            for k in full:
                del self._buckets[k]
        return 0.0


def _check_name(exc: RelayError) -> str:
    """The failing check, named for clients (``check`` in the error body)."""
    if isinstance(exc, MLSUnsupportedCipherSuite):
        return "cipher_suite"
    if isinstance(exc, CredentialMismatch):
        return "credential"
    if isinstance(exc, MLSDecodeError):
        return "structure"
    field = str(exc.details.get("field", ""))
    for name in ("signature", "lifetime", "version", "leaf_node_source", "init_key"):
        if name in field:
            return name
    return "structure" if field == "wire_format" else "key_package"


class DeliveryService:
    """One per relay (see :func:`for_relay`)."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        cfg = relay.config
        #: Seconds since the epoch; tests replace it (KeyPackage lifetimes, claims).
        self.clock: Callable[[], float] = time.time
        #: conversation -> MLS group id (None: opaque).  Immutable once created,
        #: so only existing conversations are cached and never invalidated.
        self._groups: dict[bytes, bytes | None] = {}
        self.claimer_limits = TokenBuckets(cfg.claim_rate_per_min / 60, cfg.claim_rate_per_min)
        self.target_limits = TokenBuckets(
            cfg.claim_target_rate_per_min / 60, cfg.claim_target_rate_per_min
        )

    # --- sends --------------------------------------------------------------

    async def group_of(self, conversation: bytes) -> bytes | None:
        if conversation in self._groups:
            return self._groups[conversation]
        exists, group = await self.relay.storage.mls_group(conversation)
        if exists:
            if len(self._groups) >= 200_000:
                self._groups.clear()  # a bound, not an LRU: refilling costs one read each
            self._groups[conversation] = group
        return group

    async def new_message(self, req: Send, user: str, device: str, now_ms: int) -> NewMessage:
        """The NewMessage for a durable send; raises for a malformed MLS send."""
        return self._build(req, user, device, now_ms, await self.group_of(req.conversation))

    def new_message_nowait(
        self, req: Send, user: str, device: str, now_ms: int
    ) -> NewMessage | None:
        """Like new_message without I/O: None if the group state is not cached."""
        if req.conversation not in self._groups:
            return None
        return self._build(req, user, device, now_ms, self._groups[req.conversation])

    def _build(
        self, req: Send, user: str, device: str, now_ms: int, group: bytes | None
    ) -> NewMessage:
        base = NewMessage(
            req.conversation, user, device, req.client_message_id, req.ciphertext, now_ms
        )
        if group is None:
            if req.welcome or req.group_info or req.removes:
                raise NotMLSConversation("welcome, group_info and removes need an MLS conversation")
            return base
        return mls_message(base, req, self.relay.config.epoch_window)

    # --- key packages -----------------------------------------------------------

    def check_key_package(self, data: bytes, user: str, last_resort: bool) -> NewKeyPackage:
        """Validate one uploaded KeyPackage (an MLSMessage); errors name the check."""
        cfg = self.relay.config
        try:
            kp = parse_key_package(data, bare=False)
            validate_key_package(
                kp,
                now=int(self.clock()),
                policy=KeyPackagePolicy(clock_skew=cfg.keypackage_clock_skew_s),
            )
            lifetime = kp.leaf_node.lifetime
            assert lifetime is not None  # key_package leaves always carry one
            eternal = lifetime.not_after == ETERNAL and cfg.keypackage_allow_eternal
            if (
                lifetime.not_after - lifetime.not_before > cfg.keypackage_max_lifetime_s
                and not eternal
            ):
                raise MLSValidationError(
                    "lifetime longer than the relay accepts",
                    field="key_package.leaf_node.lifetime",
                    max_lifetime_s=cfg.keypackage_max_lifetime_s,
                )
            cred = kp.leaf_node.credential
            if cred.credential_type is not CredentialType.BASIC or cred.identity != user.encode():
                raise CredentialMismatch(
                    "the credential identity must be your DID (basic credential)",
                    field="key_package.leaf_node.credential",
                )
        except RelayError as exc:
            exc.details.setdefault("check", _check_name(exc))
            raise
        return NewKeyPackage(
            key_package_ref(kp), kp.cipher_suite, data, lifetime.not_after, last_resort
        )

    async def claim(self, claimer: str, users: Sequence[str], cipher_suite: int) -> ClaimResult:
        wait = self.claimer_limits.take(claimer)
        if wait:
            raise RateLimited("too many claims", retry_after_ms=int(wait * 1000) + 1)
        for user in dict.fromkeys(users):
            wait = self.target_limits.take(user)
            if wait:
                raise RateLimited(
                    "too many claims for this user", user=user, retry_after_ms=int(wait * 1000) + 1
                )
        now = self.clock()
        return await self.relay.storage.claim_key_packages(
            claimer, users, cipher_suite, int(now), int(now * 1000)
        )


def mls_message(base: NewMessage, req: Send, window: int) -> NewMessage:
    """Read the MLSMessage header of a send into an MLS NewMessage (sans I/O)."""
    msg = parse_mls_message(
        req.ciphertext, expect=(WireFormat.PUBLIC_MESSAGE, WireFormat.PRIVATE_MESSAGE)
    )
    validate_handshake_framing(msg)  # RFC 9420 §6: no application data in a PublicMessage
    assert msg.content_type is not None and msg.group_id is not None and msg.epoch is not None
    kind = _KINDS[msg.content_type]
    body = msg.body
    if isinstance(body, PublicMessage) and body.sender.sender_type is SenderType.NEW_MEMBER_COMMIT:
        kind = "external_commit"
    is_commit = kind in ("commit", "external_commit")
    if not is_commit and (req.welcome or req.group_info or req.removes):
        raise InvalidRequest("welcome, group_info and removes go with a commit only")
    refs: tuple[bytes, ...] = ()
    if req.welcome:
        welcome = parse_mls_message(req.welcome, expect=WireFormat.WELCOME).body
        assert isinstance(welcome, Welcome)
        refs = welcome.new_members
    if req.group_info:
        info = parse_mls_message(req.group_info, expect=WireFormat.GROUP_INFO).body
        assert isinstance(info, GroupInfo)
        ctx = info.group_context
        if ctx.group_id != msg.group_id or ctx.epoch != msg.epoch + 1:
            raise MLSValidationError(
                "group_info must be for this group and the epoch the commit creates",
                field="group_info",
            )
    return NewMessage(
        base.conversation,
        base.sender,
        base.device,
        base.client_message_id,
        base.ciphertext,
        base.created_ms,
        kind=kind,
        epoch=msg.epoch,
        group_id=msg.group_id,
        welcome=req.welcome,
        welcome_refs=refs,
        group_info=req.group_info,
        removes=req.removes,
        epoch_window=window,
    )


_SERVICES: weakref.WeakKeyDictionary[Relay, DeliveryService] = weakref.WeakKeyDictionary()


def for_relay(relay: Relay) -> DeliveryService:
    """The relay's delivery service (created on first use; no wiring in app.py)."""
    service = _SERVICES.get(relay)
    if service is None:
        service = _SERVICES[relay] = DeliveryService(relay)
    return service
