"""JWT authentication of clients.

A client proves who it is with a JWT, sent as ``Authorization: Bearer <token>``
or, because browsers cannot set headers on a WebSocket handshake, as the
``access_token`` query parameter.  :class:`Authenticator` verifies the token
and returns an :class:`Identity`; everything in that identity comes from the
verified token and nothing else.

Keys:

* ``HS256`` with a shared secret (``AuthConfig.hs256_secret``), and/or
* ``ES256`` (EC P-256) and ``EdDSA`` (OKP Ed25519) public keys from a JWKS file
  (``AuthConfig.jwks_path``) loaded once at start, selected by the token's
  ``kid`` header.

Which algorithm may verify a token is decided by *our* configuration, never by
the token: an ``HS256`` token is only ever checked against the configured
secret, and an asymmetric token only against the JWKS key its ``kid`` names,
with that key's single algorithm.  A public key is therefore never used as an
HMAC secret (the classic algorithm-confusion attack), and ``alg: none`` is
never accepted.

Every refusal raises :class:`protocol.errors.InvalidToken` or
:class:`protocol.errors.ExpiredToken` with a message that names the failed
check.  A bad configuration raises :class:`AuthConfigError` at start.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import jwt
from jwt.exceptions import (
    DecodeError,
    InvalidAlgorithmError,
    InvalidKeyError,
    InvalidSignatureError,
    PyJWTError,
)

from protocol import text
from protocol.errors import AuthRequired, ExpiredToken, InvalidRequest, InvalidToken
from relay.edge.jwks import EDDSA as _EDDSA
from relay.edge.jwks import ES256 as _ES256
from relay.edge.jwks import AuthConfigError, load_jwks

__all__ = [
    "MAX_DEVICE_LENGTH",
    "MAX_JTI_LENGTH",
    "MAX_TOKEN_LENGTH",
    "MIN_HS256_SECRET_BYTES",
    "AuthConfig",
    "AuthConfigError",
    "Authenticator",
    "Identity",
    "token_from_request",
]

#: Longest token accepted; anything longer is refused before it is parsed.
MAX_TOKEN_LENGTH = 8192

#: Longest device id (the device claim) and token id (``jti``) accepted.
MAX_DEVICE_LENGTH = 128
MAX_JTI_LENGTH = 256

#: Shortest HS256 secret accepted (RFC 7518 §3.2: at least the hash size).
MIN_HS256_SECRET_BYTES = 32

_HS256 = "HS256"


@dataclass(frozen=True)
class Identity:
    """Who a verified token says the client is."""

    #: The DID from the ``sub`` claim.
    user: str
    #: The device identifier from the device claim.
    device: str
    #: The token's unique id (``jti``).
    jti: str
    #: ``exp``, seconds since the epoch.
    expires_at: int
    #: ``iat``, seconds since the epoch.
    issued_at: int


@dataclass(frozen=True)
class AuthConfig:
    #: Required value of the ``aud`` claim.
    audience: str
    #: Shared secret for HS256 tokens; ``None`` refuses HS256 tokens.
    hs256_secret: str | None = None
    #: Path of a JWKS file with ES256 / EdDSA public keys; ``None`` refuses them.
    jwks_path: str | None = None
    #: Name of the claim carrying the device id.
    device_claim: str = "device"
    #: Longest accepted ``exp - iat``.
    max_lifetime_s: int = 3600
    #: Clock skew tolerated on ``exp``, ``nbf`` and ``iat``.
    leeway_s: int = 30


# --- verification -------------------------------------------------------------


def _int_claim(payload: Mapping[str, Any], name: str) -> int:
    value = payload[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidToken(f"claim {name!r} must be a NumericDate (seconds since the epoch)")
    return int(value)


def _str_claim(payload: Mapping[str, Any], name: str) -> str:
    value = payload[name]
    if not isinstance(value, str) or not value:
        raise InvalidToken(f"claim {name!r} must be a non-empty string")
    return value


def _storable_claims(sub: str, device: str, jti: str, device_claim: str) -> None:
    """The claims the relay stores and keys on (user, device, token id) must be
    text storage, Redis and the logs can hold, checked before anything is
    registered: a NUL or a lone surrogate there failed every later write that
    carried it (delivery state, lease release, the token's own ``jti``)."""
    for name, value, check in (
        ("sub", sub, lambda v, f: text.did(v, f)),
        (device_claim, device, lambda v, f: text.printable(v, f, MAX_DEVICE_LENGTH)),
        ("jti", jti, lambda v, f: text.printable(v, f, MAX_JTI_LENGTH)),
    ):
        try:
            check(value, f"claim {name!r}")
        except InvalidRequest as exc:
            raise InvalidToken(exc.message, claim=name) from None


class Authenticator:
    """Verifies client JWTs against an :class:`AuthConfig`.

    ``clock`` returns the current time in seconds since the epoch; tests may
    replace it.
    """

    def __init__(self, config: AuthConfig, *, clock: Callable[[], float] = time.time) -> None:
        if not config.audience:
            raise AuthConfigError("AuthConfig.audience must be set")
        if not config.device_claim:
            raise AuthConfigError("AuthConfig.device_claim must be set")
        if config.max_lifetime_s <= 0:
            raise AuthConfigError("AuthConfig.max_lifetime_s must be positive")
        if config.leeway_s < 0:
            raise AuthConfigError("AuthConfig.leeway_s must not be negative")
        if config.hs256_secret is None and config.jwks_path is None:
            raise AuthConfigError("configure an HS256 secret, a JWKS file, or both")
        self._config = config
        self._clock = clock
        self._secret: bytes | None = None
        if config.hs256_secret is not None:
            secret = config.hs256_secret.encode("utf-8")
            if len(secret) < MIN_HS256_SECRET_BYTES:
                raise AuthConfigError(
                    f"the HS256 secret must be at least {MIN_HS256_SECRET_BYTES} bytes"
                )
            self._secret = secret
        self._jwks: dict[str, jwt.PyJWK] = (
            load_jwks(config.jwks_path) if config.jwks_path is not None else {}
        )
        self._required = ("sub", "aud", "exp", "iat", "jti", config.device_claim)

    @property
    def config(self) -> AuthConfig:
        return self._config

    @property
    def allowed_algorithms(self) -> frozenset[str]:
        algs = {jwk.algorithm_name for jwk in self._jwks.values()}
        if self._secret is not None:
            algs.add(_HS256)
        return frozenset(algs)

    def verify(self, token: str | None) -> Identity:
        """Verify ``token`` and return the identity it proves.

        Raises :class:`InvalidToken` or :class:`ExpiredToken`.
        """
        if not token:
            raise AuthRequired("no token: send Authorization: Bearer <token>")
        if not isinstance(token, str):
            raise InvalidToken("token must be a string")
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken(f"token longer than {MAX_TOKEN_LENGTH} characters")

        key, alg = self._select_key(token)
        payload = self._decode(token, key, alg)
        return self._check_claims(payload)

    # -- internals -------------------------------------------------------------

    def _select_key(self, token: str) -> tuple[bytes | jwt.PyJWK, str]:
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError as exc:
            raise InvalidToken(f"malformed token header: {exc}") from exc
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise InvalidToken("token header has no 'alg'")
        if alg.lower() == "none":
            raise InvalidToken("unsigned tokens (alg 'none') are not accepted")
        if "crit" in header or "b64" in header:
            raise InvalidToken("token header uses critical extensions, which are not accepted")
        if alg == _HS256:
            if self._secret is None:
                raise InvalidToken("algorithm HS256 is not allowed: no HS256 secret is configured")
            return self._secret, alg
        if alg in (_ES256, _EDDSA):
            if not self._jwks:
                raise InvalidToken(f"algorithm {alg} is not allowed: no JWKS is configured")
            kid = header.get("kid")
            if not isinstance(kid, str) or not kid:
                raise InvalidToken(f"{alg} token has no 'kid' header")
            jwk = self._jwks.get(kid)
            if jwk is None:
                raise InvalidToken(f"unknown key id {text.excerpt(kid)}")
            if jwk.algorithm_name != alg:
                raise InvalidToken(
                    f"algorithm {alg} is not allowed for key {kid!r} "
                    f"(it verifies only {jwk.algorithm_name})"
                )
            return jwk, alg
        raise InvalidToken(
            f"algorithm {text.excerpt(alg)} is not allowed (allowed: "
            f"{', '.join(sorted(self.allowed_algorithms))})"
        )

    def _decode(self, token: str, key: bytes | jwt.PyJWK, alg: str) -> dict[str, Any]:
        # Signature only: the claims are checked by _check_claims, against our
        # own clock and with messages that name the failed check.
        options: Any = {
            "verify_signature": True,
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": False,
            "verify_iss": False,
            "verify_sub": False,
            "verify_jti": False,
            "require": [],
            "enforce_minimum_key_length": True,
        }
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return jwt.decode(token, key, algorithms=[alg], options=options)
        except InvalidSignatureError as exc:
            raise InvalidToken("bad signature") from exc
        except (InvalidAlgorithmError, InvalidKeyError) as exc:
            raise InvalidToken(f"algorithm {alg} is not allowed for this key: {exc}") from exc
        except DecodeError as exc:
            raise InvalidToken(f"malformed token: {exc}") from exc
        except PyJWTError as exc:
            raise InvalidToken(f"token rejected: {exc}") from exc

    def _check_claims(self, payload: Mapping[str, Any]) -> Identity:
        cfg = self._config
        missing = [name for name in self._required if payload.get(name) is None]
        if missing:
            raise InvalidToken(f"missing required claim(s): {', '.join(missing)}")

        sub = _str_claim(payload, "sub")
        if not sub.startswith("did:") or len(sub) <= len("did:"):
            raise InvalidToken("claim 'sub' must be a DID (start with 'did:')")
        aud = payload["aud"]
        if not isinstance(aud, str) or aud != cfg.audience:
            raise InvalidToken(f"wrong audience: 'aud' must be {cfg.audience!r}")
        jti = _str_claim(payload, "jti")
        device = _str_claim(payload, cfg.device_claim)
        _storable_claims(sub, device, jti, cfg.device_claim)
        exp = _int_claim(payload, "exp")
        iat = _int_claim(payload, "iat")

        now = self._clock()
        leeway = cfg.leeway_s
        if iat > now + leeway:
            raise InvalidToken("token not yet valid: 'iat' is in the future")
        if payload.get("nbf") is not None:
            nbf = _int_claim(payload, "nbf")
            if nbf > now + leeway:
                raise InvalidToken("token not yet valid: 'nbf' is in the future")
        if exp <= iat:
            raise InvalidToken("'exp' must be after 'iat'")
        if exp - iat > cfg.max_lifetime_s:
            raise InvalidToken(
                f"token lifetime (exp - iat = {exp - iat}s) exceeds the maximum of "
                f"{cfg.max_lifetime_s}s"
            )
        if exp <= now - leeway:
            raise ExpiredToken("token expired ('exp' is in the past)")

        return Identity(user=sub, device=device, jti=jti, expires_at=exp, issued_at=iat)


# --- extracting the token from a request ---------------------------------------


def token_from_request(
    headers: list[tuple[bytes, bytes]], query_string: bytes, *, from_query: bool = False
) -> str | None:
    """The bearer token of an HTTP / WebSocket handshake request, or ``None``.

    ``Authorization: Bearer <token>`` wins.  With ``from_query`` (the WebSocket
    upgrade and the SSE stream only: browsers cannot set headers on a
    WebSocket or an EventSource) the ``access_token`` query parameter is the
    fallback.  The other HTTP routes take the header only: a token in a URL
    ends up in access logs, browser history and Referer headers.
    """
    for name, value in headers:
        if name.lower() != b"authorization":
            continue
        try:
            text = value.decode("ascii").strip()
        except UnicodeDecodeError:
            continue
        scheme, _, credentials = text.partition(" ")
        if scheme.lower() == "bearer":
            credentials = credentials.strip()
            if credentials:
                return credentials
    if not from_query:
        return None
    try:
        query = query_string.decode("ascii")
    except UnicodeDecodeError:
        return None
    values = parse_qs(query, keep_blank_values=False).get("access_token")
    if values and values[0]:
        return values[0]
    return None
