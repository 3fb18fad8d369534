"""AWS Signature Version 4 for the S3 blob store (storage/s3.py): canonical
requests, the derived signing key and the signed headers, without an SDK.
Pure functions of their inputs (the clock is :func:`amz_now`), so the
signatures are checked against AWS's documented examples in the tests.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_ALGORITHM = "AWS4-HMAC-SHA256"


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str = field(repr=False)
    session_token: str = field(default="", repr=False)


# --- Signature Version 4 -------------------------------------------------------------


def encode(text: str, *, keep_slash: bool = False) -> str:
    # SigV4 URI encoding: everything but A-Z a-z 0-9 - _ . ~ as %XX (upper case),
    # which is exactly what quote() does with no extra safe characters.
    return quote(text, safe="/" if keep_slash else "")


def canonical_query(query: Sequence[tuple[str, str]]) -> str:
    # Sorted by encoded name, then value (not as "name=value" strings: "a-b" < "a=").
    pairs = sorted((encode(k), encode(v)) for k, v in query)
    return "&".join(f"{k}={v}" for k, v in pairs)


def canonical_request(
    method: str,
    path: str,
    query: Sequence[tuple[str, str]],
    headers: Mapping[str, str],
    payload_hash: str,
) -> tuple[str, str]:
    """The canonical request and its signed-headers list; ``path`` is already encoded."""
    canon = {name.strip().lower(): " ".join(value.split()) for name, value in headers.items()}
    names = sorted(canon)
    lines = [
        method,
        path or "/",
        canonical_query(query),
        *(f"{name}:{canon[name]}" for name in names),
        "",  # the header block ends with a newline of its own
        ";".join(names),
        payload_hash,
    ]
    return "\n".join(lines), ";".join(names)


@functools.lru_cache(maxsize=16)
def _signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    # Derived once per day and scope rather than four HMACs per request.
    key = ("AWS4" + secret_key).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def sign_headers(
    *,
    credentials: Credentials,
    region: str,
    service: str,
    method: str,
    host: str,
    path: str,
    query: Sequence[tuple[str, str]] = (),
    headers: Mapping[str, str] | None = None,
    payload_hash: str = EMPTY_SHA256,
    amz_date: str,
) -> dict[str, str]:
    """Every header to send: ``headers`` plus host, x-amz-date, the session token
    (if any) and ``authorization``, all but the last one signed."""
    signed = {**(headers or {}), "host": host, "x-amz-date": amz_date}
    if credentials.session_token:
        signed["x-amz-security-token"] = credentials.session_token
    request, signed_names = canonical_request(method, path, query, signed, payload_hash)
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    digest = hashlib.sha256(request.encode()).hexdigest()
    to_sign = f"{_ALGORITHM}\n{amz_date}\n{scope}\n{digest}"
    key = _signing_key(credentials.secret_key, amz_date[:8], region, service)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    signed["authorization"] = (
        f"{_ALGORITHM} Credential={credentials.access_key}/{scope}, "
        f"SignedHeaders={signed_names}, Signature={signature}"
    )
    return signed


def amz_now() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
