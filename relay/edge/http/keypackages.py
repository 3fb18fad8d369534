"""HTTP routes of the MLS delivery service (a Quart blueprint on the relay's port).

* ``POST /v1/keypackages`` -- upload: ``Content-Type: message/mls`` for one
  KeyPackage MLSMessage (``?last_resort=true`` marks it), or
  ``application/cbor`` for a list whose items are byte strings or
  ``{key_package: bytes, last_resort: bool}``.  All or nothing.
* ``GET /v1/keypackages/count`` -- the calling device's inventory.
* ``POST /v1/keypackages/claim`` -- JSON ``{users: [did], cipher_suite}``.
* ``GET /v1/conversations/<hex id>/groupinfo`` -- the newest GroupInfo.

Every route needs the relay's bearer token.  Errors are JSON ``{error,
message, ...}``; KeyPackage failures also name ``check`` and ``index``.
"""

from __future__ import annotations

import base64
import json
import time
from typing import TYPE_CHECKING, Any

import cbor2
import trio
from quart import Blueprint, Response, jsonify, request

from protocol import text
from protocol.errors import (
    InvalidRequest,
    PayloadTooLarge,
    RelayError,
    TooManyDevices,
    TooManyKeyPackages,
)
from relay.cluster.sharedlimits import MAX_USERS_PER_CLAIM
from relay.edge.auth import Identity, token_from_request
from relay.edge.http.body import read_body

if TYPE_CHECKING:
    from relay.edge.auth import Authenticator
    from relay.edge.http.limits import HttpLimits
    from relay.mls.service import DeliveryService
    from storage.base import NewKeyPackage, Storage

#: Largest KeyPackage upload body: 200 KeyPackages of 5 KiB each (classic
#: suites make ~300-byte ones).  Read whole (the CBOR list is parsed at once),
#: so kept small: it is what each upload in progress may hold.
MAX_UPLOAD_BYTES = 1024 * 1024
#: Largest claim body: MAX_USERS_PER_CLAIM DIDs of text.MAX_DID characters.
MAX_CLAIM_BYTES = 256 * 1024
#: KeyPackage validation runs at most this long before letting others run...
VALIDATE_SLICE_S = 0.002
#: ...for this long.
VALIDATE_PAUSE_S = 0.001


def request_identity(authenticator: Authenticator) -> Identity:
    """The verified identity of the current HTTP request's bearer token."""
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()]
    return authenticator.verify(token_from_request(headers, request.query_string))


def _items(content_type: str, body: bytes, last_resort: bool) -> list[tuple[bytes, bool]]:
    if content_type == "message/mls":
        return [(body, last_resort)]
    if content_type != "application/cbor":
        raise InvalidRequest("Content-Type must be message/mls or application/cbor")
    try:
        value = cbor2.loads(body)
    except Exception:
        raise InvalidRequest("body is not valid CBOR", check="structure") from None
    if not isinstance(value, list) or not value:
        raise InvalidRequest("a CBOR upload is a non-empty list of KeyPackages")
    items: list[tuple[bytes, bool]] = []
    for i, item in enumerate(value):
        if isinstance(item, dict):
            data, lr = item.get("key_package"), item.get("last_resort", False)
        else:
            data, lr = item, False
        if not isinstance(data, bytes) or not isinstance(lr, bool):
            raise InvalidRequest("items are bytes or {key_package: bytes, last_resort}", index=i)
        items.append((data, lr))
    if sum(lr for _, lr in items) > 1:
        raise InvalidRequest("at most one last-resort KeyPackage per upload")
    return items


async def _validate(
    ds: DeliveryService, turn: trio.Lock, items: list[tuple[bytes, bool]], user: str
) -> list[NewKeyPackage]:
    """Check every KeyPackage without stalling the node: signature checks cost
    ~0.4 ms each (84 ms for 200, once run inline while every socket of the
    node waited).  One upload validates at a time per node, in slices of at
    most VALIDATE_SLICE_S, sleeping between slices so that the event loop
    serves everyone else.  ``turn``: the node's one lock for validations."""
    packages: list[NewKeyPackage] = []
    async with turn:
        started = time.perf_counter()
        for i, (data, lr) in enumerate(items):
            if time.perf_counter() - started > VALIDATE_SLICE_S:
                await trio.sleep(VALIDATE_PAUSE_S)
                started = time.perf_counter()
            try:
                packages.append(ds.check_key_package(data, user, lr))
            except RelayError as exc:
                exc.details["index"] = i
                raise
    return packages


async def _check_room(
    ds: DeliveryService, storage: Storage, limit: int, max_devices: int, who: Identity, items: int
) -> None:
    """Refuse an upload that cannot fit the device's KeyPackage quota before
    its signatures are checked (the costly part).  Every item counts here,
    even one already stored; the storing transaction counts exactly
    (storage/quotas.py) and is what makes the bound hold under concurrency."""
    await _check_device(storage, max_devices, who)
    if not limit:
        return
    now = int(ds.clock())
    counts = await storage.key_package_counts(who.user, who.device, now)
    stored = sum(c.available + int(c.last_resort) for c in counts)
    if stored + items > limit:
        raise TooManyKeyPackages(
            f"a device keeps at most {limit} unclaimed KeyPackages; it has {stored}",
            limit=limit,
            used=stored,
        )


async def _check_device(storage: Storage, limit: int, who: Identity) -> None:
    """A new device beyond the user's device bound, refused before validation
    too (the storing transaction checks again, race-free)."""
    if not limit:
        return
    known, devices = await storage.key_package_devices(who.user, who.device)
    if not known and devices >= limit:
        raise TooManyDevices(
            f"a user may upload KeyPackages from at most {limit} devices",
            limit=limit,
            used=devices,
        )


def _claim_body(raw: bytes) -> tuple[list[str], int]:
    """``{users: [did], cipher_suite}`` from JSON text, every failure a 400."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        # Not UTF-8, not JSON, or nested past the parser's depth: all the client's.
        raise InvalidRequest("body must be JSON {users, cipher_suite}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("body must be JSON {users, cipher_suite}")
    users, suite = body.get("users"), body.get("cipher_suite")
    if not isinstance(users, list) or not users or len(users) > MAX_USERS_PER_CLAIM:
        raise InvalidRequest(f"users must list 1..{MAX_USERS_PER_CLAIM} DIDs", field="users")
    dids = [text.did(u, "users") for u in users]
    if type(suite) is not int or not 0 < suite < 65536:
        raise InvalidRequest("cipher_suite must be an MLS cipher suite number")
    return dids, suite


def blueprint(
    ds: DeliveryService,
    storage: Storage,
    limits: HttpLimits,
    *,
    max_upload: int,
    max_per_device: int,
    max_devices: int,
    idle_timeout: float,
) -> Blueprint:
    """``max_upload``: KeyPackages per upload; ``max_per_device``: unclaimed
    ones a device keeps; ``max_devices``: devices of a user holding some (0:
    no cap, both); ``idle_timeout``: longest wait for body bytes."""
    bp = Blueprint("keypackages", __name__)
    timeout = idle_timeout
    #: One upload validates at a time on this node (see _validate).
    turn = trio.Lock()

    @bp.post("/v1/keypackages")
    async def upload() -> Any:
        who = limits.admit()  # the token and the user's request slot, before any byte is read
        body = await read_body(MAX_UPLOAD_BYTES, timeout)
        last_resort = request.args.get("last_resort", "").lower() in ("1", "true")
        content_type = (request.content_type or "").split(";")[0].strip().lower()
        items = _items(content_type, body, last_resort)
        del body
        if len(items) > max_upload:
            raise PayloadTooLarge(f"at most {max_upload} per upload")
        await _check_room(ds, storage, max_per_device, max_devices, who, len(items))
        packages = await _validate(ds, turn, items, who.user)
        now_ms = int(ds.clock() * 1000)
        stored = await storage.put_key_packages(
            who.user,
            who.device,
            packages,
            now_ms,
            max_stored=max_per_device,
            max_devices=max_devices,
        )
        return jsonify(
            {
                "stored": sum(stored),
                "key_packages": [
                    {"ref": kp.ref.hex(), "new": new, "last_resort": kp.last_resort}
                    for kp, new in zip(packages, stored, strict=True)
                ],
            }
        )

    @bp.get("/v1/keypackages/count")
    async def count() -> Any:
        who = limits.admit()
        now = int(ds.clock())
        counts = await storage.key_package_counts(who.user, who.device, now)
        return jsonify(
            {
                "user": who.user,
                "device": who.device,
                "available": sum(c.available for c in counts),
                "cipher_suites": [
                    {
                        "cipher_suite": c.cipher_suite,
                        "available": c.available,
                        "last_resort": c.last_resort,
                    }
                    for c in counts
                ],
            }
        )

    @bp.post("/v1/keypackages/claim")
    async def claim() -> Any:
        who = limits.admit()
        users, suite = _claim_body(await read_body(MAX_CLAIM_BYTES, timeout))
        result = await ds.claim(who.user, users, suite)
        return jsonify(
            {
                "key_packages": [
                    {
                        "user": c.user,
                        "device": c.device,
                        "ref": c.ref.hex(),
                        "last_resort": c.last_resort,
                        "key_package": base64.b64encode(c.data).decode(),
                    }
                    for c in result.claimed
                ],
                "missing": [{"user": u, "device": d} for u, d in result.missing],
            }
        )

    @bp.get("/v1/conversations/<conversation>/groupinfo")
    async def group_info(conversation: str) -> Any:
        who = limits.admit()
        try:
            conv = bytes.fromhex(conversation)
        except ValueError:
            raise InvalidRequest("the conversation id in the path is hex") from None
        epoch, data = await storage.latest_group_info(conv, who.user)
        return Response(data, content_type="message/mls", headers={"MLS-Epoch": str(epoch)})

    return bp
