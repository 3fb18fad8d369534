"""Blob stores (storage/blobstore.py, storage/s3.py) against real backends:
a directory on disk and moto's S3 server with authentication enforced, so the
S3 runs also prove our SigV4 signatures (moto recomputes them with botocore)."""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from protocol.errors import BlobNotFound, BlobStoreError, InvalidRequest
from relay.base.config import ConfigError
from storage.blobstore import MAX_KEY_LENGTH, BlobStore, FileBlobStore, open_blob_store
from storage.s3 import EMPTY_SHA256, Credentials, S3BlobStore, canonical_request, sign_headers

from . import s3server
from .nodes import free_port
from .s3server import S3Server, new_bucket

# The moto fixtures, made visible here (tests/conftest.py does not load tests.s3server).
s3_endpoint = s3server.s3_endpoint
s3_server = s3server.s3_server

MiB = 1 << 20


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(params=["file", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "file":
        yield f"file://{tmp_path}/blobs"
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        # A prefix, as deployments sharing a bucket would use.
        yield server.blob_url(new_bucket(), "relay/blobs")


@pytest.fixture
async def store(store_url: str, tmp_path: Path) -> AsyncIterator[BlobStore]:
    blobs = open_blob_store(store_url, str(tmp_path))
    try:
        if isinstance(blobs, S3BlobStore):
            await blobs.create_bucket()
        yield blobs
    finally:
        await blobs.aclose()


@asynccontextmanager
async def open_s3(url: str) -> AsyncIterator[S3BlobStore]:
    blobs = open_blob_store(url, "unused")
    assert isinstance(blobs, S3BlobStore)
    try:
        yield blobs
    finally:
        await blobs.aclose()


# --- the contract, on both backends ---------------------------------------------------


async def test_put_get_roundtrip(store: BlobStore, store_url: str) -> None:
    assert store.kind == ("s3" if store_url.startswith("s3:") else "file")
    await store.put("00ff/abc_DEF-1", b"ciphertext")
    assert await store.get("00ff/abc_DEF-1") == b"ciphertext"
    await store.ping()


async def test_overwrite_replaces(store: BlobStore) -> None:
    await store.put("conv/blob", b"first version, longer")
    await store.put("conv/blob", b"second")
    assert await store.get("conv/blob") == b"second"


async def test_empty_blob(store: BlobStore) -> None:
    await store.put("conv/empty", b"")
    assert await store.get("conv/empty") == b""


async def test_get_missing_is_blob_not_found(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        await store.get("conv/never-stored")
    await store.put("conv/x", b"1")
    with pytest.raises(BlobNotFound):
        await store.get("other/x")


async def test_delete_is_idempotent(store: BlobStore) -> None:
    await store.put("conv/a", b"a")
    await store.put("conv/b", b"b")
    await store.delete(["conv/a", "conv/missing", "conv/a", "nowhere/at-all"])
    with pytest.raises(BlobNotFound):
        await store.get("conv/a")
    assert await store.get("conv/b") == b"b"
    await store.delete(["conv/a"])
    await store.delete([])
    # A deleted key can be written again (its directory may have been removed).
    await store.delete(["conv/b"])
    await store.put("conv/b", b"again")
    assert await store.get("conv/b") == b"again"


async def test_twenty_mib_blob(store: BlobStore) -> None:
    data = os.urandom(20 * MiB)
    await store.put("big/one", data)
    got = await store.get("big/one")
    assert len(got) == len(data)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


async def test_every_byte_value(store: BlobStore) -> None:
    data = bytes(range(256)) * 17 + b"\r\n\x00" + bytes(range(255, -1, -1))
    await store.put("bin/all-bytes", data)
    assert await store.get("bin/all-bytes") == data


BAD_KEYS = [
    "",
    "../x",
    "a/../b",
    "/abs",
    "a//b",
    "a/",
    ".hidden",
    "a.b",
    "a b",
    "a\\b",
    "a\x00b",
    "a/b\n",
    "ü",
    "x" * (MAX_KEY_LENGTH + 1),
    "/".join(["y" * 100] * 6),  # each segment fine, too long in all
    "z" * 201,  # one segment longer than a file name may be
]


def _tree(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


@pytest.mark.parametrize("key", BAD_KEYS, ids=range(len(BAD_KEYS)))
async def test_invalid_keys_are_refused(store: BlobStore, key: str, tmp_path: Path) -> None:
    before = _tree(tmp_path)
    with pytest.raises(InvalidRequest):
        await store.put(key, b"x")
    with pytest.raises(InvalidRequest):
        await store.get(key)
    with pytest.raises(InvalidRequest):
        await store.delete(["fine/key", key])
    assert _tree(tmp_path) == before  # nothing written anywhere


async def test_longest_valid_key(store: BlobStore) -> None:
    key = "/".join(["k" * 200, "k" * 200, "k" * 110])
    assert len(key) == MAX_KEY_LENGTH
    await store.put(key, b"long")
    assert await store.get(key) == b"long"


async def test_twenty_concurrent_puts(store: BlobStore) -> None:
    blobs = {f"conv{i % 3}/blob-{i}": os.urandom(1000 + i * 4096) for i in range(20)}
    async with trio.open_nursery() as nursery:
        for key, data in blobs.items():
            nursery.start_soon(store.put, key, data)
    for key, data in blobs.items():
        assert await store.get(key) == data
    await store.delete(list(blobs))
    for key in blobs:
        with pytest.raises(BlobNotFound):
            await store.get(key)


# --- file store ------------------------------------------------------------------------


async def test_file_layout_and_permissions(tmp_path: Path) -> None:
    blobs = open_blob_store("", str(tmp_path / "data"))
    assert isinstance(blobs, FileBlobStore)
    assert blobs.root == tmp_path / "data" / "blobs"
    await blobs.put("c0ffee/k1", b"secret")
    conv = blobs.root / "c0ffee"
    assert stat.S_IMODE(blobs.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(conv.stat().st_mode) == 0o700
    assert stat.S_IMODE((conv / "k1").stat().st_mode) == 0o600
    assert [p.name for p in conv.iterdir()] == ["k1"]  # no temporary file left behind
    await blobs.delete(["c0ffee/k1"])
    assert not conv.exists()  # an emptied conversation directory goes too
    assert blobs.root.is_dir()


async def test_file_store_errors_are_blob_store_errors(tmp_path: Path) -> None:
    # The root is a regular file: nothing can be stored, and that is an outage.
    (tmp_path / "blobs").write_bytes(b"not a directory")
    blobs = open_blob_store(f"file://{tmp_path}/blobs", str(tmp_path))
    with pytest.raises(BlobStoreError):
        await blobs.put("conv/k", b"x")
    with pytest.raises(BlobStoreError):
        await blobs.ping()


async def test_file_ping_creates_the_directory(tmp_path: Path) -> None:
    blobs = open_blob_store(f"file://{tmp_path}/a/b", str(tmp_path))
    await blobs.ping()
    assert (tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []


# --- S3 store ------------------------------------------------------------------------


async def test_s3_create_bucket_is_idempotent(s3_server: S3Server) -> None:
    async with open_s3(s3_server.blob_url(new_bucket())) as blobs:
        with pytest.raises(BlobStoreError, match="does not exist"):
            await blobs.ping()
        with pytest.raises(BlobStoreError):  # no bucket is an outage, not a missing blob
            await blobs.get("conv/k")
        await blobs.create_bucket()
        await blobs.create_bucket()
        await blobs.ping()
        await blobs.put("conv/k", b"v")
        await blobs.create_bucket()  # keeps what the bucket holds
        assert await blobs.get("conv/k") == b"v"


async def test_s3_prefixes_keep_stores_apart(s3_server: S3Server) -> None:
    bucket = new_bucket()
    async with (
        open_s3(s3_server.blob_url(bucket, "one")) as one,
        open_s3(s3_server.blob_url(bucket, "two/deeper")) as two,
    ):
        await one.create_bucket()
        await one.put("conv/k", b"1")
        with pytest.raises(BlobNotFound):
            await two.get("conv/k")
        await two.put("conv/k", b"2")
        assert await one.get("conv/k") == b"1"


async def test_s3_wrong_credentials(s3_server: S3Server) -> None:
    # moto enforces authentication on this server (tests/s3server.py).
    bucket = new_bucket()
    async with open_s3(s3_server.blob_url(bucket)) as good:
        await good.create_bucket()
        await good.put("conv/k", b"v")
    wrong_secret = S3Server(s3_server.endpoint, s3_server.access_key, "not-the-secret")
    wrong_key = S3Server(s3_server.endpoint, "AKIAWRONGWRONGWRONG0", s3_server.secret_key)
    for server in (wrong_secret, wrong_key):
        async with open_s3(server.blob_url(bucket)) as bad:
            with pytest.raises(BlobStoreError, match="refused access"):
                await bad.get("conv/k")
            with pytest.raises(BlobStoreError, match="refused access"):
                await bad.put("conv/k", b"overwritten?")
            with pytest.raises(BlobStoreError, match="refused access"):
                await bad.ping()
    async with open_s3(s3_server.blob_url(bucket)) as good:
        assert await good.get("conv/k") == b"v"


async def test_s3_open_server_fixture(s3_endpoint: str) -> None:
    # The fixture other test modules use: any credentials are accepted.
    url = f"s3://{new_bucket()}?endpoint={s3_endpoint}&access_key=any&secret_key=thing"
    async with open_s3(url) as blobs:
        await blobs.create_bucket()
        await blobs.put("conv/k", b"v")
        assert await blobs.get("conv/k") == b"v"
        for key in BAD_KEYS:  # checked without a prefix too
            with pytest.raises(InvalidRequest):
                await blobs.get(key)


async def test_s3_nothing_listening_fails_fast() -> None:
    port = free_port()  # bound and released: nothing listens there now
    url = f"s3://bucket?endpoint=http://127.0.0.1:{port}&access_key=a&secret_key=b"
    start = time.monotonic()
    async with open_s3(url) as blobs:
        with pytest.raises(BlobStoreError, match="unreachable"):
            await blobs.ping()
        with pytest.raises(BlobStoreError):
            await blobs.put("conv/k", b"x")
        with pytest.raises(BlobStoreError):
            await blobs.get("conv/k")
        with pytest.raises(BlobStoreError):
            await blobs.delete(["conv/k", "conv/j"])
    assert time.monotonic() - start < 5


async def _serve_tcp(
    handler: Callable[[trio.SocketStream], Awaitable[None]], nursery: trio.Nursery
) -> int:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def test_s3_silent_server_times_out() -> None:
    async def accept_and_say_nothing(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        port = await _serve_tcp(accept_and_say_nothing, nursery)
        url = f"s3://bucket?endpoint=http://127.0.0.1:{port}&access_key=a&secret_key=b&timeout=0.5"
        async with open_s3(url) as blobs:
            start = time.monotonic()
            with pytest.raises(BlobStoreError, match="did not answer"):
                await blobs.get("conv/k")
            assert time.monotonic() - start < 3
        nursery.cancel_scope.cancel()


async def test_s3_server_errors_are_retryable() -> None:
    async def overloaded(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some()
        body = b"<Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>"
        head = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n" % len(body)
        await stream.send_all(head + body)

    async with trio.open_nursery() as nursery:
        port = await _serve_tcp(overloaded, nursery)
        url = f"s3://bucket?endpoint=http://127.0.0.1:{port}&access_key=a&secret_key=b"
        async with open_s3(url) as blobs:
            with pytest.raises(BlobStoreError, match="SlowDown") as caught:
                await blobs.get("conv/k")
            assert caught.value.retryable and caught.value.http_status == 503
        nursery.cancel_scope.cancel()


# --- URLs and configuration ------------------------------------------------------------


async def test_open_blob_store_urls(tmp_path: Path) -> None:
    for url, root in [("", "data/blobs"), ("file:///srv/blobs", "/srv/blobs")]:
        blobs = open_blob_store(url, "data")
        assert isinstance(blobs, FileBlobStore)
        assert blobs.root == Path(root)
    env = {
        "AWS_ACCESS_KEY_ID": "AKID",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "AWS_REGION": "eu-west-1",
    }
    async with _open("s3://my-bucket", env) as blobs:
        assert (blobs.bucket, blobs.prefix, blobs.region) == ("my-bucket", "", "eu-west-1")
        assert blobs.endpoint == "https://s3.eu-west-1.amazonaws.com"
        assert "s3cr3t" not in repr(blobs)
    url = "s3://my-bucket/a/b/?endpoint=http://127.0.0.1:9000/&region=auto&timeout=2.5"
    async with _open(url, env) as blobs:
        assert (blobs.prefix, blobs.region, blobs.timeout) == ("a/b", "auto", 2.5)
        assert blobs.endpoint == "http://127.0.0.1:9000"


@asynccontextmanager
async def _open(url: str, env: dict[str, str]) -> AsyncIterator[S3BlobStore]:
    blobs = open_blob_store(url, "data", env=env)
    assert isinstance(blobs, S3BlobStore)
    try:
        yield blobs
    finally:
        await blobs.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "ftp://host/x",
        "blobs/relative",
        "file:relative/path",
        "file://host/srv/blobs",
        "s3://Bad_Bucket",
        "s3://bucket/../x",
        "s3://bucket?endpoint=ftp://x",
        "s3://bucket?endpoit=http://x",  # a typo is an error, not silently ignored
        "s3://bucket?timeout=-1",
        "s3://bucket?access_key=only-half",
        "s3://bucket",  # no credentials anywhere
    ],
)
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        open_blob_store(url, "data", env={})


# --- Signature Version 4: published AWS examples ---------------------------------------

# The AWS SigV4 test suite's example credentials, and Amazon S3's.
SUITE = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
S3_DOCS = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
S3_HOST = "examplebucket.s3.amazonaws.com"


def _signature(headers: dict[str, str]) -> str:
    return headers["authorization"].rsplit("Signature=", 1)[1]


def test_sigv4_suite_get_vanilla() -> None:
    headers = sign_headers(
        credentials=SUITE,
        region="us-east-1",
        service="service",
        method="GET",
        host="example.amazonaws.com",
        path="/",
        amz_date="20150830T123600Z",
    )
    assert headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=host;x-amz-date, "
        "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    )


def test_sigv4_suite_query_order() -> None:
    headers = sign_headers(
        credentials=SUITE,
        region="us-east-1",
        service="service",
        method="GET",
        host="example.amazonaws.com",
        path="/",
        query=[("Param2", "value2"), ("Param1", "value1")],
        amz_date="20150830T123600Z",
    )
    assert _signature(headers) == "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"


def _s3_docs(
    method: str, path: str, query: list[tuple[str, str]], extra: dict[str, str], payload: str
) -> dict[str, str]:
    return sign_headers(
        credentials=S3_DOCS,
        region="us-east-1",
        service="s3",
        method=method,
        host=S3_HOST,
        path=path,
        query=query,
        headers={**extra, "x-amz-content-sha256": payload},
        payload_hash=payload,
        amz_date="20130524T000000Z",
    )


def test_sigv4_s3_docs_get_object() -> None:
    headers = _s3_docs("GET", "/test.txt", [], {"Range": "bytes=0-9"}, EMPTY_SHA256)
    assert headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )
    # The hash of the canonical request, as printed in the same example.
    request, _ = canonical_request(
        "GET", "/test.txt", [], {k: v for k, v in headers.items() if k != "authorization"},
        EMPTY_SHA256,
    )  # fmt: skip
    assert hashlib.sha256(request.encode()).hexdigest() == (
        "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972"
    )


def test_sigv4_s3_docs_put_object() -> None:
    payload = hashlib.sha256(b"Welcome to Amazon S3.").hexdigest()
    assert payload == "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"
    extra = {"Date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"}
    headers = _s3_docs("PUT", "/test%24file.text", [], extra, payload)
    assert _signature(headers) == "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"


def test_sigv4_s3_docs_bucket_queries() -> None:
    lifecycle = _s3_docs("GET", "/", [("lifecycle", "")], {}, EMPTY_SHA256)
    assert _signature(lifecycle) == (
        "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"
    )
    listing = _s3_docs("GET", "/", [("prefix", "J"), ("max-keys", "2")], {}, EMPTY_SHA256)
    assert _signature(listing) == (
        "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
    )


def test_sigv4_session_token_is_signed() -> None:
    temporary = Credentials("ASIAEXAMPLE", "secret", session_token="the-token")
    headers = sign_headers(
        credentials=temporary,
        region="us-east-1",
        service="s3",
        method="GET",
        host=S3_HOST,
        path="/k",
        amz_date="20130524T000000Z",
    )
    assert headers["x-amz-security-token"] == "the-token"
    assert "SignedHeaders=host;x-amz-date;x-amz-security-token," in headers["authorization"]
