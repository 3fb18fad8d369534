"""S3-compatible blob store: plain HTTP through httpx, signed with AWS SigV4.

No AWS SDK: the four calls the relay needs (PUT, GET, DELETE object and HEAD
bucket) are simple enough to speak directly, and httpx runs natively on Trio.
Requests use path-style addresses (``{endpoint}/{bucket}/{key}``), which AWS,
MinIO, Cloudflare R2 and moto all accept, and every request signs the SHA-256
of its body (``x-amz-content-sha256``), so a body corrupted in transit is
refused by the server.

Time limits are Trio cancel scopes around each request, never httpx timeouts:
a request gets ``timeout`` seconds plus one second per MiB of its body.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar
from urllib.parse import parse_qsl, urlsplit

import httpx
import trio

from protocol.errors import BlobNotFound, BlobStoreError, ConfigError, InvalidRequest
from storage.blobstore import STREAM_CHUNK, BlobReader, BlobStore, validate_key
from storage.sigv4 import EMPTY_SHA256, Credentials, amz_now, canonical_request, sign_headers
from storage.sigv4 import encode as _encode

__all__ = [
    "EMPTY_SHA256",
    "Credentials",
    "S3BlobStore",
    "amz_now",
    "canonical_request",
    "sign_headers",
]

T = TypeVar("T")

#: Slowest transfer rate tolerated: each MiB of payload adds a second to the limit.
_MIN_BYTES_PER_S = 1 << 20
#: Bodies larger than this are hashed in a worker thread (hashlib drops the GIL).
_THREAD_HASH_BYTES = 256 * 1024
_DELETE_CONCURRENCY = 16
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*")
_URL_PARAMS = frozenset({"endpoint", "region", "access_key", "secret_key", "timeout"})


async def _sha256_hex(data: bytes) -> str:
    if len(data) <= _THREAD_HASH_BYTES:
        return hashlib.sha256(data).hexdigest()
    return await trio.to_thread.run_sync(lambda: hashlib.sha256(data).hexdigest())


# --- the store -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes

    def error_code(self) -> str:
        """The ``<Code>`` of an S3 XML error body ("" for HEAD replies, which have none)."""
        match = re.search(rb"<Code>([^<]{1,100})</Code>", self.body)
        return match.group(1).decode(errors="replace") if match else ""


class S3BlobStore(BlobStore):
    kind = "s3"

    def __init__(
        self,
        *,
        bucket: str,
        credentials: Credentials,
        endpoint: str = "",
        region: str = "us-east-1",
        prefix: str = "",
        timeout: float = 10.0,
    ) -> None:
        self.bucket = bucket
        self.region = region
        self.endpoint = (endpoint or f"https://s3.{region}.amazonaws.com").rstrip("/")
        self.prefix = prefix.strip("/")
        self.timeout = timeout
        self._credentials = credentials
        base = httpx.URL(self.endpoint)
        self._host = base.netloc.decode("ascii")
        self._origin = f"{base.scheme}://{self._host}"
        self._bucket_path = base.raw_path.decode("ascii").rstrip("/") + "/" + _encode(bucket)
        # timeout=None: limits are Trio cancel scopes (_within); redirects are
        # never followed, since a signature is only valid for its own URL.
        self._client = httpx.AsyncClient(timeout=None, follow_redirects=False)

    def __repr__(self) -> str:
        return f"S3BlobStore(bucket={self.bucket!r}, prefix={self.prefix!r}, {self.endpoint})"

    @classmethod
    def from_url(cls, url: str, env: Mapping[str, str]) -> S3BlobStore:
        """``s3://bucket[/prefix][?endpoint=…&region=…&timeout=…&access_key=…&secret_key=…]``.

        Credentials come from the URL or from AWS_ACCESS_KEY_ID,
        AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN; the region from the URL,
        AWS_REGION, AWS_DEFAULT_REGION or "us-east-1".
        """
        parts = urlsplit(url)
        shown = parts._replace(query="…").geturl() if parts.query else url
        bucket, prefix = parts.netloc, parts.path.strip("/")
        if not _BUCKET_RE.fullmatch(bucket):
            raise ConfigError(f"blob store URL {shown}: {bucket!r} is not an S3 bucket name")
        if prefix and not _PREFIX_RE.fullmatch(prefix):
            raise ConfigError(f"blob store URL {shown}: invalid key prefix {prefix!r}")
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(params) - _URL_PARAMS)
        if unknown:
            raise ConfigError(f"blob store URL {shown}: unknown parameter(s) {', '.join(unknown)}")
        region = params.get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        return cls(
            bucket=bucket,
            prefix=prefix,
            endpoint=_endpoint(params.get("endpoint", ""), shown),
            region=region or "us-east-1",
            credentials=_credentials(params, env, shown),
            timeout=_timeout(params.get("timeout", ""), shown),
        )

    # --- the contract ----------------------------------------------------------------

    async def put(self, key: str, data: bytes) -> None:
        reply = await self._call("PUT", self._object_path(key), body=data)
        self._check(reply, f"storing {key!r}", ok=(200,))

    async def get(self, key: str) -> bytes:
        reply = await self._call("GET", self._object_path(key))
        if reply.status == 404 and reply.error_code() != "NoSuchBucket":
            raise BlobNotFound(f"no blob {key!r}")
        self._check(reply, f"reading {key!r}", ok=(200,))
        return reply.body

    async def put_stream(self, key: str, chunks: AsyncIterator[bytes], size: int) -> None:
        """Spooled to a temporary file first (hashing as it comes): the request
        signs the body's SHA-256, which is known only at its end."""
        path = self._object_path(key)
        spool = await _Spool.create()
        try:
            await spool.fill(chunks, size)
            reply = await self._call("PUT", path, spool=spool)
        finally:
            await spool.aclose()
        self._check(reply, f"storing {key!r}", ok=(200,))

    async def open(self, key: str) -> BlobReader:
        path = self._object_path(key)
        for attempt in (1, 2):
            request = self._request("GET", path, EMPTY_SHA256, b"", 0)
            try:
                response = await self._within(self.timeout, self._client.send(request, stream=True))
                break
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                if attempt == 2:
                    raise self._unreachable(exc) from exc
            except httpx.HTTPError as exc:
                raise self._unreachable(exc) from exc
        if response.status_code == 200:
            return _S3Reader(self, response)
        try:  # an error: its XML body is small, but read at most 64 KiB of it
            body = await self._within(self.timeout, _read_at_most(response, 64 * 1024))
        finally:
            await response.aclose()
        reply = _Reply(response.status_code, body)
        if reply.status == 404 and reply.error_code() != "NoSuchBucket":
            raise BlobNotFound(f"no blob {key!r}")
        self._check(reply, f"reading {key!r}", ok=(200,))
        raise AssertionError("unreachable")

    async def delete(self, keys: Sequence[str]) -> None:
        paths = sorted({self._object_path(key) for key in keys})  # all checked before any I/O
        failures: list[BlobStoreError] = []
        limiter = trio.CapacityLimiter(_DELETE_CONCURRENCY)

        async def delete_one(path: str) -> None:
            async with limiter:
                try:
                    reply = await self._call("DELETE", path)
                    if reply.status != 404 or reply.error_code() == "NoSuchBucket":
                        self._check(reply, "deleting blobs", ok=(200, 204))
                except BlobStoreError as exc:
                    # Collected rather than raised: the others still get their
                    # chance, and callers see one BlobStoreError, not a group.
                    failures.append(exc)

        async with trio.open_nursery() as nursery:
            for path in paths:
                nursery.start_soon(delete_one, path)
        if failures:
            raise failures[0]

    async def ping(self) -> None:
        reply = await self._call("HEAD", self._bucket_path)
        if reply.status == 404:
            raise BlobStoreError(
                f"S3 bucket {self.bucket!r} does not exist at {self.endpoint}"
                " (create it, e.g. with `mls-relay check`)"
            )
        self._check(reply, "checking the bucket", ok=(200,))

    async def create_bucket(self) -> None:
        """Create the bucket unless it exists already (ours); idempotent."""
        reply = await self._call("HEAD", self._bucket_path)
        if reply.status == 200:
            return
        if reply.status != 404:
            self._check(reply, "checking the bucket", ok=(200,))
        body = b""
        if self.region not in ("us-east-1", "auto"):
            # Outside us-east-1 AWS wants the region restated in the request body.
            body = (
                b'<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                b"<LocationConstraint>%s</LocationConstraint></CreateBucketConfiguration>"
                % self.region.encode()
            )
        reply = await self._call("PUT", self._bucket_path, body=body)
        if reply.status == 409 and reply.error_code() == "BucketAlreadyOwnedByYou":
            return  # created concurrently by another node
        self._check(reply, "creating the bucket", ok=(200,))

    async def aclose(self) -> None:
        await self._client.aclose()

    # --- HTTP ------------------------------------------------------------------------

    def _object_path(self, key: str) -> str:
        name = validate_key(key)
        if self.prefix:
            name = f"{self.prefix}/{name}"
        return f"{self._bucket_path}/{_encode(name, keep_slash=True)}"

    def _request(
        self, method: str, path: str, payload_hash: str, content: Any, size: int
    ) -> httpx.Request:
        headers = sign_headers(
            credentials=self._credentials,
            region=self.region,
            service="s3",
            method=method,
            host=self._host,
            path=path,
            headers={"x-amz-content-sha256": payload_hash},
            payload_hash=payload_hash,
            amz_date=amz_now(),
        )
        if not isinstance(content, bytes):
            headers["content-length"] = str(size)  # a stream: never chunked
        return self._client.build_request(
            method, self._origin + path, headers=headers, content=content
        )

    async def _call(
        self, method: str, path: str, *, body: bytes = b"", spool: _Spool | None = None
    ) -> _Reply:
        payload_hash = spool.sha256 if spool else await _sha256_hex(body)
        size = spool.size if spool else len(body)
        for attempt in (1, 2):
            content = spool.read() if spool else body
            request = self._request(method, path, payload_hash, content, size)
            try:
                return await self._exchange(request, size)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                # A pooled keep-alive connection the server had already closed;
                # every call here is idempotent, so one more try is safe.
                if attempt == 2:
                    raise self._unreachable(exc) from exc
            except httpx.HTTPError as exc:
                raise self._unreachable(exc) from exc
        raise AssertionError("unreachable")

    async def _exchange(self, request: httpx.Request, body_size: int) -> _Reply:
        response = await self._within(
            self.timeout + body_size / _MIN_BYTES_PER_S, self._client.send(request, stream=True)
        )
        try:
            size = int(response.headers.get("content-length") or 0)
            body = await self._within(self.timeout + size / _MIN_BYTES_PER_S, response.aread())
        finally:
            await response.aclose()
        return _Reply(response.status_code, body)

    async def _within(self, seconds: float, step: Awaitable[T]) -> T:
        with trio.move_on_after(seconds):
            return await step
        raise BlobStoreError(f"S3 at {self.endpoint} did not answer within {seconds:.1f} s")

    def _unreachable(self, exc: Exception) -> BlobStoreError:
        return BlobStoreError(f"S3 at {self.endpoint} is unreachable: {exc!r}")

    def _check(self, reply: _Reply, doing: str, *, ok: tuple[int, ...]) -> None:
        if reply.status in ok:
            return
        code = reply.error_code() or f"HTTP {reply.status}"
        where = f"bucket {self.bucket!r} at {self.endpoint}"
        if reply.status == 403:
            raise BlobStoreError(
                f"S3 refused access to {where} while {doing} ({code}):"
                " check the access key, the secret key and the bucket policy"
            )
        if reply.status == 404:
            raise BlobStoreError(f"S3 {where} while {doing}: {code}")
        raise BlobStoreError(f"S3 {where} failed while {doing}: {code}")


class _Spool:
    """A streamed upload on local disk (a temporary file, gone on close), with
    its size and SHA-256 computed on the way in."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._digest = hashlib.sha256()
        self.size = 0
        self.sha256 = ""

    @classmethod
    async def create(cls) -> _Spool:
        return cls(await trio.to_thread.run_sync(tempfile.TemporaryFile))

    async def fill(self, chunks: AsyncIterator[bytes], size: int) -> None:
        buffer = bytearray()
        async for chunk in chunks:
            if self.size + len(buffer) + len(chunk) > size:
                raise InvalidRequest(f"the body holds more than {size} bytes")
            buffer += chunk
            if len(buffer) >= STREAM_CHUNK:
                await self._write(bytes(buffer))
                buffer.clear()
        await self._write(bytes(buffer))
        if self.size != size:
            raise InvalidRequest(f"the body holds {self.size} bytes, not {size}")
        self.sha256 = self._digest.hexdigest()

    async def _write(self, data: bytes) -> None:
        def write() -> None:
            self._file.write(data)
            self._digest.update(data)

        await trio.to_thread.run_sync(write)
        self.size += len(data)

    async def read(self) -> AsyncIterator[bytes]:
        """The spooled bytes from the start (each request attempt reads anew)."""
        await trio.to_thread.run_sync(self._file.seek, 0)
        while data := await trio.to_thread.run_sync(self._file.read, STREAM_CHUNK):
            yield data

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._file.close)


class _S3Reader(BlobReader):
    def __init__(self, store: S3BlobStore, response: httpx.Response) -> None:
        self._store = store
        self._response: httpx.Response | None = response
        self.size = int(response.headers.get("content-length") or 0)

    async def chunks(self) -> AsyncIterator[bytes]:
        response = self._response
        if response is None:
            return
        parts = response.aiter_raw(STREAM_CHUNK)
        while True:
            chunk = None
            with trio.move_on_after(self._store.timeout):
                try:
                    chunk = await anext(parts)
                except StopAsyncIteration:
                    return
                except httpx.HTTPError as exc:
                    raise self._store._unreachable(exc) from exc
            if chunk is None:
                raise BlobStoreError(f"S3 at {self._store.endpoint} stopped sending a blob")
            yield chunk  # outside the cancel scope: this is an async generator

    async def aclose(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            with trio.CancelScope(shield=True):
                await response.aclose()


async def _read_at_most(response: httpx.Response, limit: int) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])


def _endpoint(raw: str, shown: str) -> str:
    if not raw:
        return ""
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"blob store URL {shown}: endpoint must be http(s)://host[:port]")
    if parts.query or parts.fragment:
        raise ConfigError(f"blob store URL {shown}: the endpoint takes no query or fragment")
    return raw.rstrip("/")


def _credentials(params: Mapping[str, str], env: Mapping[str, str], shown: str) -> Credentials:
    if "access_key" in params or "secret_key" in params:
        access, secret, token = params.get("access_key"), params.get("secret_key"), ""
    else:
        access, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        token = env.get("AWS_SESSION_TOKEN", "")
    if not access or not secret:
        raise ConfigError(
            f"blob store URL {shown}: S3 needs credentials; set AWS_ACCESS_KEY_ID and"
            " AWS_SECRET_ACCESS_KEY (or access_key= and secret_key= in the URL)"
        )
    return Credentials(access, secret, token)


def _timeout(raw: str, shown: str) -> float:
    if not raw:
        return 10.0
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value < 3600:
        raise ConfigError(f"blob store URL {shown}: timeout must be seconds in (0, 3600)")
    return value
