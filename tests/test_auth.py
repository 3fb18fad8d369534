"""relay.edge.auth: JWT verification and token extraction."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from protocol.errors import AuthError, AuthRequired, ExpiredToken, InvalidToken
from relay.edge.auth import (
    MAX_DEVICE_LENGTH,
    MAX_JTI_LENGTH,
    MAX_TOKEN_LENGTH,
    AuthConfig,
    AuthConfigError,
    Authenticator,
    Identity,
    token_from_request,
)

NOW = 1_700_000_000
AUD = "mls-relay-test"
SECRET = "s" * 40
OTHER_SECRET = "o" * 40


def clock() -> float:
    return float(NOW)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def hs256_raw(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    """Build an HS256 token by hand (PyJWT refuses some of the keys used here)."""
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(payload).encode())
    sig = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + b64url(sig)


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "did:plc:alice",
        "aud": AUD,
        "iat": NOW - 10,
        "exp": NOW + 600,
        "jti": "jti-1",
        "device": "dev-1",
    }
    for name, value in overrides.items():
        if value is _DROP:
            base.pop(name, None)
        else:
            base[name] = value
    return base


_DROP = object()


# --- keys and configuration -----------------------------------------------------


class Keys:
    def __init__(self, tmp_path: Path) -> None:
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.ec_other = ec.generate_private_key(ec.SECP256R1())
        self.ed = ed25519.Ed25519PrivateKey.generate()
        ec_jwk = ECAlgorithm.to_jwk(self.ec.public_key(), as_dict=True)
        ed_jwk = OKPAlgorithm.to_jwk(self.ed.public_key(), as_dict=True)
        ec_jwk["kid"] = "ec-1"
        ed_jwk["kid"] = "ed-1"
        self.ec_jwk = ec_jwk
        self.jwks_path = tmp_path / "jwks.json"
        self.jwks_path.write_text(json.dumps({"keys": [ec_jwk, ed_jwk]}))

    def ec_pem(self) -> bytes:
        return self.ec.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


def hs_auth(**kw: Any) -> Authenticator:
    return Authenticator(AuthConfig(audience=AUD, hs256_secret=SECRET, **kw), clock=clock)


def jwks_auth(keys: Keys, **kw: Any) -> Authenticator:
    return Authenticator(AuthConfig(audience=AUD, jwks_path=str(keys.jwks_path), **kw), clock=clock)


def hs_token(payload: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers or None)


def es_token(keys: Keys, payload: dict[str, Any], kid: str = "ec-1", key: Any = None) -> str:
    return jwt.encode(payload, key or keys.ec, algorithm="ES256", headers={"kid": kid})


def ed_token(keys: Keys, payload: dict[str, Any], kid: str = "ed-1") -> str:
    return jwt.encode(payload, keys.ed, algorithm="EdDSA", headers={"kid": kid})


def refused(auth: Authenticator, token: Any, match: str, exc: type[AuthError] = InvalidToken):
    with pytest.raises(exc, match=match) as info:
        auth.verify(token)
    assert type(info.value) is exc
    return info.value


# --- valid tokens ------------------------------------------------------------------


def test_valid_hs256() -> None:
    ident = hs_auth().verify(hs_token(claims()))
    assert ident == Identity(
        user="did:plc:alice", device="dev-1", jti="jti-1", expires_at=NOW + 600, issued_at=NOW - 10
    )


def test_valid_es256(keys: Keys) -> None:
    ident = jwks_auth(keys).verify(es_token(keys, claims(sub="did:web:bob.example")))
    assert ident.user == "did:web:bob.example"
    assert ident.device == "dev-1"


def test_valid_eddsa(keys: Keys) -> None:
    ident = jwks_auth(keys).verify(ed_token(keys, claims(jti="j-ed")))
    assert ident.jti == "j-ed"
    assert ident.expires_at == NOW + 600


def test_both_configured_accepts_each_kind(keys: Keys) -> None:
    auth = Authenticator(
        AuthConfig(audience=AUD, hs256_secret=SECRET, jwks_path=str(keys.jwks_path)), clock=clock
    )
    assert auth.allowed_algorithms == {"HS256", "ES256", "EdDSA"}
    for token in (hs_token(claims()), es_token(keys, claims()), ed_token(keys, claims())):
        assert auth.verify(token).user == "did:plc:alice"


def test_custom_device_claim() -> None:
    auth = hs_auth(device_claim="client_id")
    ident = auth.verify(hs_token(claims(device=_DROP, client_id="phone")))
    assert ident.device == "phone"
    refused(auth, hs_token(claims()), "missing required claim.*client_id")


def test_within_leeway_is_accepted() -> None:
    auth = hs_auth(leeway_s=30)
    # expired 20 s ago, issued / valid from 20 s in the future: within leeway
    assert auth.verify(hs_token(claims(iat=NOW - 500, exp=NOW - 20)))
    assert auth.verify(hs_token(claims(iat=NOW + 20, exp=NOW + 600, nbf=NOW + 20)))


def test_identity_is_frozen() -> None:
    ident = hs_auth().verify(hs_token(claims()))
    with pytest.raises(AttributeError):
        ident.user = "did:plc:mallory"  # type: ignore[misc]


def test_extra_claims_do_not_change_identity() -> None:
    ident = hs_auth().verify(hs_token(claims(user="did:plc:mallory", uid="x")))
    assert ident.user == "did:plc:alice"


# --- missing token / claims ------------------------------------------------------


@pytest.mark.parametrize("token", [None, ""])
def test_missing_token(token: str | None) -> None:
    refused(hs_auth(), token, "no token", AuthRequired)


@pytest.mark.parametrize("claim", ["sub", "aud", "exp", "iat", "jti", "device"])
def test_missing_claim(claim: str) -> None:
    refused(hs_auth(), hs_token(claims(**{claim: _DROP})), f"missing required claim.*{claim}")


@pytest.mark.parametrize("claim", ["sub", "jti", "device"])
def test_null_or_empty_string_claim(claim: str) -> None:
    refused(hs_auth(), hs_token(claims(**{claim: None})), f"missing required claim.*{claim}")
    refused(hs_auth(), hs_token(claims(**{claim: ""})), claim)
    refused(hs_auth(), hs_token(claims(**{claim: 7})), claim)


@pytest.mark.parametrize("value", ["soon", True, [1]])
def test_non_numeric_exp(value: Any) -> None:
    refused(hs_auth(), hs_token(claims(exp=value)), "'exp' must be a NumericDate")


def test_infinite_exp() -> None:
    payload = json.dumps(claims()).replace(str(NOW + 600), "1e400")
    signing_input = b64url(b'{"alg":"HS256"}') + "." + b64url(payload.encode())
    sig = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    refused(hs_auth(), signing_input + "." + b64url(sig), "'exp' must be a NumericDate")


def test_garbage_token() -> None:
    refused(hs_auth(), "not-a-jwt", "malformed token")
    refused(hs_auth(), "a.b.c", "malformed token")


def test_overlong_token() -> None:
    refused(hs_auth(), "a" * (MAX_TOKEN_LENGTH + 1), "longer than")


def test_payload_not_an_object() -> None:
    token = jwt.api_jws.encode(b"[1, 2]", SECRET, algorithm="HS256")
    refused(hs_auth(), token, "malformed token")


# --- time checks -------------------------------------------------------------------


def test_expired() -> None:
    exc = refused(hs_auth(), hs_token(claims(iat=NOW - 700, exp=NOW - 31)), "expired", ExpiredToken)
    assert exc.error == "ExpiredToken"


def test_iat_in_future() -> None:
    refused(hs_auth(), hs_token(claims(iat=NOW + 31, exp=NOW + 600)), "'iat' is in the future")


def test_nbf_in_future() -> None:
    refused(hs_auth(), hs_token(claims(nbf=NOW + 31)), "'nbf' is in the future")


def test_bad_nbf_type() -> None:
    refused(hs_auth(), hs_token(claims(nbf="later")), "'nbf' must be a NumericDate")


def test_lifetime_too_long() -> None:
    auth = hs_auth(max_lifetime_s=3600)
    assert auth.verify(hs_token(claims(iat=NOW - 10, exp=NOW - 10 + 3600)))
    refused(auth, hs_token(claims(iat=NOW - 10, exp=NOW - 10 + 3601)), "lifetime.*exceeds")


def test_exp_not_after_iat() -> None:
    refused(hs_auth(), hs_token(claims(iat=NOW, exp=NOW)), "'exp' must be after 'iat'")


# --- audience / subject ----------------------------------------------------------


@pytest.mark.parametrize("aud", ["other-service", [AUD], [AUD, "other"], ""])
def test_wrong_audience(aud: Any) -> None:
    refused(hs_auth(), hs_token(claims(aud=aud)), "wrong audience")


@pytest.mark.parametrize("sub", ["alice", "did:", "DID:plc:alice", "user:did:plc:x"])
def test_sub_not_a_did(sub: str) -> None:
    refused(hs_auth(), hs_token(claims(sub=sub)), "'sub' must be a DID")


# --- claims the relay stores: text storage, Redis and the logs can hold -------------


@pytest.mark.parametrize(
    ("claim", "value", "match"),
    [
        ("sub", "did:plc:\x00alice", "'sub' must hold DIDs"),
        ("sub", "did:plc:\ud800", "'sub' must hold DIDs"),
        ("sub", "did:plc:a b", "'sub' must hold DIDs"),
        ("sub", "did:plc:" + "a" * 2048, "'sub' must hold DIDs"),
        ("device", "dev\x00", "'device' must not contain NUL"),
        ("device", "\udfff", "'device' must be valid Unicode"),
        ("device", "dev\u2028ice", "'device' must not contain control characters"),
        ("device", "d" * (MAX_DEVICE_LENGTH + 1), f"longer than {MAX_DEVICE_LENGTH}"),
        ("jti", "\x00", "'jti' must not contain NUL"),
        ("jti", "j\ud83d", "'jti' must be valid Unicode"),
        ("jti", "j" * (MAX_JTI_LENGTH + 1), f"longer than {MAX_JTI_LENGTH}"),
    ],
)
def test_stored_claims_must_be_storable_text(claim: str, value: str, match: str) -> None:
    error = refused(hs_auth(), hs_token(claims(**{claim: value})), match)
    assert error.details == {"claim": claim}


def test_the_configured_device_claim_is_the_one_checked() -> None:
    auth = hs_auth(device_claim="dev")
    payload = claims(dev="phone\x00")
    error = refused(auth, hs_token(payload), "'dev' must not contain NUL")
    assert error.details == {"claim": "dev"}


def test_stored_claims_at_their_limits_are_accepted() -> None:
    payload = claims(
        sub="did:plc:" + "a" * (2048 - 8), device="📱 " + "d" * (MAX_DEVICE_LENGTH - 2),
        jti="j" * MAX_JTI_LENGTH,
    )  # fmt: skip
    identity = hs_auth().verify(hs_token(payload))
    assert len(identity.user) == 2048 and len(identity.device) == MAX_DEVICE_LENGTH


# --- algorithms --------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none(alg: str, keys: Keys) -> None:
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims()).encode())
    for token in (f"{header}.{body}.", f"{header}.{body}.c2ln"):
        refused(hs_auth(), token, "alg 'none'")
        refused(jwks_auth(keys), token, "alg 'none'")


def test_alg_none_from_pyjwt() -> None:
    token = jwt.encode(claims(), None, algorithm="none")
    refused(hs_auth(), token, "alg 'none'")


def test_missing_alg() -> None:
    token = hs256_raw({"typ": "JWT"}, claims(), SECRET.encode())
    refused(hs_auth(), token, "no 'alg'")


@pytest.mark.parametrize("alg", ["HS384", "HS512", "RS256", "PS256", "ES384", "hs256"])
def test_other_algorithms_refused(alg: str) -> None:
    token = hs256_raw({"alg": alg, "typ": "JWT"}, claims(), SECRET.encode())
    refused(hs_auth(), token, f"algorithm '{alg}' is not allowed")


def test_hs256_refused_when_only_jwks(keys: Keys) -> None:
    refused(jwks_auth(keys), hs_token(claims()), "HS256 is not allowed: no HS256 secret")


@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
def test_asymmetric_refused_when_only_hs256(keys: Keys, alg: str) -> None:
    token = es_token(keys, claims()) if alg == "ES256" else ed_token(keys, claims())
    refused(hs_auth(), token, f"{alg} is not allowed: no JWKS")


@pytest.mark.parametrize("secret_kind", ["pem", "jwk-json", "x"])
def test_alg_confusion_public_key_as_hmac_secret(keys: Keys, secret_kind: str) -> None:
    """An HS256 token 'signed' with the public key must never verify."""
    secret = {
        "pem": keys.ec_pem(),
        "jwk-json": json.dumps(keys.ec_jwk).encode(),
        "x": base64.urlsafe_b64decode(keys.ec_jwk["x"] + "=="),
    }[secret_kind]
    token = hs256_raw({"alg": "HS256", "kid": "ec-1", "typ": "JWT"}, claims(), secret)
    # JWKS only: HS256 is not an allowed algorithm at all.
    refused(jwks_auth(keys), token, "HS256 is not allowed")
    # Both configured: HS256 is checked against the configured secret only.
    both = Authenticator(
        AuthConfig(audience=AUD, hs256_secret=SECRET, jwks_path=str(keys.jwks_path)), clock=clock
    )
    refused(both, token, "bad signature")


def test_alg_not_allowed_for_kid(keys: Keys) -> None:
    # An ES256 token naming the Ed25519 key, and an EdDSA token naming the EC key.
    refused(jwks_auth(keys), es_token(keys, claims(), kid="ed-1"), "ES256 is not allowed for key")
    refused(jwks_auth(keys), ed_token(keys, claims(), kid="ec-1"), "EdDSA is not allowed for key")


def test_unknown_and_missing_kid(keys: Keys) -> None:
    refused(jwks_auth(keys), es_token(keys, claims(), kid="nope"), "unknown key id 'nope'")
    token = jwt.encode(claims(), keys.ec, algorithm="ES256")
    refused(jwks_auth(keys), token, "no 'kid' header")


def test_crit_header_refused() -> None:
    # PyJWT understands b64=true; we accept no critical extension at all.
    token = hs256_raw({"alg": "HS256", "crit": ["b64"], "b64": True}, claims(), SECRET.encode())
    refused(hs_auth(), token, "critical extensions")
    # b64=false (detached, unencoded payload) is refused while parsing the header.
    token = hs256_raw({"alg": "HS256", "crit": ["b64"], "b64": False}, claims(), SECRET.encode())
    refused(hs_auth(), token, "malformed token header")


# --- signatures --------------------------------------------------------------------


def test_bad_signature_hs256() -> None:
    refused(hs_auth(), hs_token(claims(), secret=OTHER_SECRET), "bad signature")


def test_bad_signature_es256_other_key(keys: Keys) -> None:
    refused(jwks_auth(keys), es_token(keys, claims(), key=keys.ec_other), "bad signature")


def test_bad_signature_eddsa_other_key(keys: Keys) -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    token = jwt.encode(claims(), other, algorithm="EdDSA", headers={"kid": "ed-1"})
    refused(jwks_auth(keys), token, "bad signature")


@pytest.mark.parametrize("kind", ["hs", "es", "ed"])
def test_tampered_payload(keys: Keys, kind: str) -> None:
    auth = Authenticator(
        AuthConfig(audience=AUD, hs256_secret=SECRET, jwks_path=str(keys.jwks_path)), clock=clock
    )
    token = {"hs": hs_token, "es": lambda c: es_token(keys, c), "ed": lambda c: ed_token(keys, c)}[
        kind
    ](claims())
    header, _, sig = token.split(".")
    forged = b64url(json.dumps(claims(sub="did:plc:mallory")).encode())
    refused(auth, f"{header}.{forged}.{sig}", "bad signature")


# --- configuration -----------------------------------------------------------------


def write_jwks(tmp_path: Path, *jwks: dict[str, Any]) -> str:
    path = tmp_path / "bad-jwks.json"
    path.write_text(json.dumps({"keys": list(jwks)}))
    return str(path)


def test_config_needs_a_key_source() -> None:
    with pytest.raises(AuthConfigError, match="HS256 secret, a JWKS file"):
        Authenticator(AuthConfig(audience=AUD))


def test_short_hs256_secret_refused() -> None:
    with pytest.raises(AuthConfigError, match="at least 32 bytes"):
        Authenticator(AuthConfig(audience=AUD, hs256_secret="short"))


def test_jwks_rejects_rsa_key(tmp_path: Path) -> None:
    jwk = RSAAlgorithm.to_jwk(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(), as_dict=True
    )
    jwk["kid"] = "rsa-1"
    path = write_jwks(tmp_path, jwk)
    with pytest.raises(AuthConfigError, match=r"rsa-1.*unsupported key type kty='RSA'"):
        Authenticator(AuthConfig(audience=AUD, jwks_path=path))


def test_jwks_rejects_p384_and_oct_and_x25519(tmp_path: Path) -> None:
    p384 = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP384R1()).public_key(), as_dict=True)
    cases = [
        ({**p384, "kid": "p384"}, "crv='P-384'"),
        ({"kty": "oct", "k": b64url(b"k" * 32), "kid": "oct"}, "kty='oct'"),
        ({"kty": "OKP", "crv": "X25519", "x": b64url(b"x" * 32), "kid": "xk"}, "crv='X25519'"),
    ]
    for jwk, match in cases:
        path = write_jwks(tmp_path, jwk)
        with pytest.raises(AuthConfigError, match=f"unsupported key type.*{match}"):
            Authenticator(AuthConfig(audience=AUD, jwks_path=path))


def test_jwks_rejects_private_key_mismatched_alg_and_bad_files(tmp_path: Path, keys: Keys) -> None:
    priv = ECAlgorithm.to_jwk(keys.ec, as_dict=True)
    cases: list[tuple[Any, str]] = [
        ({"keys": [{**priv, "kid": "p"}]}, "private key material"),
        ({"keys": [{**keys.ec_jwk, "alg": "EdDSA"}]}, "declares alg='EdDSA'"),
        ({"keys": [{**keys.ec_jwk, "use": "enc"}]}, "use='enc'"),
        ({"keys": [{**keys.ec_jwk, "kid": ""}]}, "missing or empty 'kid'"),
        ({"keys": [keys.ec_jwk, keys.ec_jwk]}, "duplicate kid"),
        ({"keys": []}, "has no keys"),
        ({"nokeys": 1}, "'keys' list"),
    ]
    for doc, match in cases:
        path = tmp_path / "j.json"
        path.write_text(json.dumps(doc))
        with pytest.raises(AuthConfigError, match=match):
            Authenticator(AuthConfig(audience=AUD, jwks_path=str(path)))
    (tmp_path / "j.json").write_text("{not json")
    with pytest.raises(AuthConfigError, match="not valid JSON"):
        Authenticator(AuthConfig(audience=AUD, jwks_path=str(tmp_path / "j.json")))
    with pytest.raises(AuthConfigError, match="cannot read JWKS file"):
        Authenticator(AuthConfig(audience=AUD, jwks_path=str(tmp_path / "missing.json")))


def test_jwks_loaded_once(keys: Keys) -> None:
    auth = jwks_auth(keys)
    keys.jwks_path.unlink()
    assert auth.verify(es_token(keys, claims())).user == "did:plc:alice"


# --- token_from_request --------------------------------------------------------------


def test_token_from_authorization_header() -> None:
    headers = [(b"host", b"x"), (b"Authorization", b"Bearer abc.def.ghi")]
    assert token_from_request(headers, b"access_token=other") == "abc.def.ghi"
    assert token_from_request([(b"authorization", b"bearer  tok ")], b"") == "tok"


def test_token_from_query_string() -> None:
    # Only where asked for (the WebSocket upgrade and the SSE stream).
    q = {"from_query": True}
    assert token_from_request([], b"x=1&access_token=abc.def.ghi", **q) == "abc.def.ghi"
    assert token_from_request([], b"access_token=a%2Bb", **q) == "a+b"
    # A non-Bearer Authorization header falls back to the query parameter.
    assert token_from_request([(b"authorization", b"Basic Zm9v")], b"access_token=q", **q) == "q"
    # The other HTTP routes take the header only.
    assert token_from_request([], b"access_token=abc.def.ghi") is None


def test_no_token() -> None:
    assert token_from_request([], b"") is None
    empty = [(b"authorization", b"Bearer ")]
    assert token_from_request(empty, b"access_token=", from_query=True) is None
    assert token_from_request([(b"authorization", b"Basic Zm9v")], b"\xff", from_query=True) is None
