"""JWKS files: the ES256 and EdDSA public keys tokens may be signed with.

Each key is bound to the one algorithm its type allows (EC P-256: ES256,
OKP Ed25519: EdDSA), whatever a token's header says; private key material,
non-signature keys and duplicate ``kid`` values are refused at start
(:class:`AuthConfigError`). Verification is :mod:`relay.edge.auth`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
from jwt.exceptions import PyJWKError, PyJWTError

from protocol.errors import RelayError

ES256 = "ES256"
EDDSA = "EdDSA"


class AuthConfigError(RelayError):
    """The authentication configuration (secret, JWKS file) is unusable."""

    error = "InternalError"
    http_status = 500


def _jwk_algorithm(jwk: Mapping[str, Any], where: str) -> str:
    """The one algorithm a JWKS key may verify, or AuthConfigError."""
    kty = jwk.get("kty")
    crv = jwk.get("crv")
    if kty == "EC" and crv == "P-256":
        alg = ES256
    elif kty == "OKP" and crv == "Ed25519":
        alg = EDDSA
    else:
        raise AuthConfigError(
            f"{where}: unsupported key type kty={kty!r} crv={crv!r}; only EC P-256 "
            "(ES256) and OKP Ed25519 (EdDSA) keys are accepted"
        )
    declared = jwk.get("alg")
    if declared is not None and declared != alg:
        raise AuthConfigError(
            f"{where}: declares alg={declared!r} but a {kty} {crv} key verifies only {alg}"
        )
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise AuthConfigError(f"{where}: use={use!r}; only signature keys (use=sig) are accepted")
    if "d" in jwk:
        raise AuthConfigError(
            f"{where}: contains private key material ('d'); publish only the public key"
        )
    return alg


def load_jwks(path: str | Path) -> dict[str, jwt.PyJWK]:
    """Read a JWKS file into ``{kid: PyJWK}``; each key bound to its one algorithm."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise AuthConfigError(f"cannot read JWKS file {str(path)!r}: {exc}") from exc
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise AuthConfigError(f"JWKS file {str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise AuthConfigError(f"JWKS file {str(path)!r} must be an object with a 'keys' list")
    keys: dict[str, jwt.PyJWK] = {}
    for i, jwk in enumerate(doc["keys"]):
        where = f"JWKS file {str(path)!r} key #{i}"
        if not isinstance(jwk, dict):
            raise AuthConfigError(f"{where}: not a JSON object")
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthConfigError(f"{where}: missing or empty 'kid'")
        where = f"{where} (kid={kid!r})"
        if kid in keys:
            raise AuthConfigError(f"{where}: duplicate kid")
        alg = _jwk_algorithm(jwk, where)
        try:
            keys[kid] = jwt.PyJWK(jwk, algorithm=alg)
        except (PyJWKError, PyJWTError, ValueError, TypeError) as exc:
            raise AuthConfigError(f"{where}: invalid key: {exc}") from exc
    if not keys:
        raise AuthConfigError(f"JWKS file {str(path)!r} has no keys")
    return keys
