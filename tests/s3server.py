"""A real S3 server for tests: moto's, as a subprocess on a free loopback port.

Two session fixtures, each its own moto process:

* ``s3_endpoint``: the endpoint URL (``http://127.0.0.1:PORT``) of a server
  that accepts any credentials (moto's default: it checks no signatures);
* ``s3_server``: an :class:`S3Server` whose moto enforces authentication: only
  its own access key, with a valid SigV4 signature, gets in (moto recomputes
  every signature with botocore), so tests against it also test our signer.

To use them in a test module, bind them to module names (pytest finds
fixtures among a module's globals; a plain import of the same names would be
flagged by ruff as redefined when used as parameters)::

    from tests import s3server
    s3_endpoint = s3server.s3_endpoint

or list ``"tests.s3server"`` in ``pytest_plugins`` in tests/conftest.py.
Buckets are not removed between tests: give each test its own bucket
(:func:`new_bucket`).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO
from urllib.parse import quote, urlencode

import pytest

from storage.s3 import Credentials, amz_now, sign_headers

from .nodes import free_port

#: Bounded wait for moto to answer (it imports a lot on start).
START_TIMEOUT_S = 30.0
#: urllib without proxies: moto is on loopback, whatever http_proxy says.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_IAM_POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
)


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str = "test-access-key"
    secret_key: str = field(default="test-secret-key", repr=False)

    def blob_url(self, bucket: str, prefix: str = "") -> str:
        """An ``s3://`` URL for ``open_blob_store`` with this server's credentials."""
        query = urlencode(
            {
                "endpoint": self.endpoint,
                "access_key": self.access_key,
                "secret_key": self.secret_key,
            }
        )
        return f"s3://{bucket}/{prefix}?{query}"


def new_bucket() -> str:
    return f"test-{secrets.token_hex(6)}"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Endpoint URL of a moto S3 server that accepts any credentials."""
    with run_moto() as server:
        yield server.endpoint


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server that checks credentials and signatures, with its one valid key."""
    with run_moto(enforce_auth=True) as server:
        yield server


@contextmanager
def run_moto(*, enforce_auth: bool = False) -> Iterator[S3Server]:
    """Start ``python -m moto.server`` on a free port; stop it on exit."""
    with tempfile.TemporaryFile() as log:
        proc, endpoint = _start(log)
        try:
            server = S3Server(endpoint)
            if enforce_auth:
                server = _enforce_auth(endpoint)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _start(log: IO[bytes]) -> tuple[subprocess.Popen[bytes], str]:
    # free_port() only proposes a port; another process may take it first, in
    # which case moto exits at once and we try another one.
    for _ in range(3):
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        endpoint = f"http://127.0.0.1:{port}"
        if _wait_until_up(proc, endpoint):
            return proc, endpoint
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            break  # it runs but never answered: another try will not help
    log.seek(0)
    output = log.read().decode(errors="replace")[-2000:]
    pytest.fail(f"moto S3 server did not start within {START_TIMEOUT_S:.0f} s:\n{output}")


def _wait_until_up(proc: subprocess.Popen[bytes], endpoint: str) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            # moto's own API, not an AWS action: it does not count as a request.
            with _LOCAL.open(f"{endpoint}/moto-api/data.json", timeout=2):
                return True
        except (OSError, urllib.error.URLError):
            time.sleep(0.1)
    return False


def _enforce_auth(endpoint: str) -> S3Server:
    """Create an IAM user allowed s3:*, and its access key, then turn authentication on.

    Until then moto checks nothing, so these IAM calls are signed with a
    throwaway key (the signature only tells moto which service is meant).
    """
    _iam(endpoint, "CreateUser", UserName="relay")
    _iam(
        endpoint,
        "PutUserPolicy",
        UserName="relay",
        PolicyName="s3-all",
        PolicyDocument=_IAM_POLICY,
    )
    created = _iam(endpoint, "CreateAccessKey", UserName="relay")
    access_key = _xml_text(created, "AccessKeyId")
    secret_key = _xml_text(created, "SecretAccessKey")
    # From now on every request must be signed by a key moto knows.
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=b"0",
        # Not urllib's default form type: moto reads the raw body, which Flask
        # leaves empty for a form.
        headers={"content-type": "text/plain"},
        method="POST",
    )
    with _LOCAL.open(request, timeout=10) as reply:
        reply.read()
    return S3Server(endpoint, access_key, secret_key)


def _iam(endpoint: str, action: str, **params: str) -> str:
    body = urlencode({"Action": action, "Version": "2010-05-08", **params}, quote_via=quote)
    data = body.encode()
    headers = sign_headers(
        credentials=Credentials("AKIDSETUPONLY", "setup-only"),
        region="us-east-1",
        service="iam",
        method="POST",
        host=endpoint.removeprefix("http://"),
        path="/",
        headers={"content-type": "application/x-www-form-urlencoded; charset=utf-8"},
        payload_hash=hashlib.sha256(data).hexdigest(),
        amz_date=amz_now(),
    )
    request = urllib.request.Request(f"{endpoint}/", data=data, headers=headers, method="POST")
    with _LOCAL.open(request, timeout=10) as reply:
        return str(reply.read().decode())


def _xml_text(xml: str, tag: str) -> str:
    match = re.search(rf"<{tag}>([^<]+)</{tag}>", xml)
    if match is None:
        raise AssertionError(f"no <{tag}> in moto's reply: {xml[:500]}")
    return match.group(1)
