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
from typing import TYPE_CHECKING, Any

import cbor2
from quart import Blueprint, Response, jsonify, request

from protocol.errors import InvalidRequest, PayloadTooLarge, RelayError
from protocol.requests import MAX_MEMBERS_PER_REQUEST

from .auth import Identity, token_from_request
from .mls_ds import for_relay

if TYPE_CHECKING:
    from .app import Relay

MAX_UPLOAD_BYTES = 4 * 1024 * 1024


def request_identity(relay: Relay) -> Identity:
    """The verified identity of the current HTTP request's bearer token."""
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()]
    return relay.authenticator.verify(token_from_request(headers, request.query_string))


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


def blueprint(relay: Relay) -> Blueprint:
    bp = Blueprint("keypackages", __name__)

    @bp.post("/v1/keypackages")
    async def upload() -> Any:
        who = request_identity(relay)
        ds = for_relay(relay)
        body = await request.get_data(cache=False)
        assert isinstance(body, bytes)
        if len(body) > MAX_UPLOAD_BYTES:
            raise PayloadTooLarge(f"upload larger than {MAX_UPLOAD_BYTES} bytes")
        last_resort = request.args.get("last_resort", "").lower() in ("1", "true")
        content_type = (request.content_type or "").split(";")[0].strip().lower()
        items = _items(content_type, body, last_resort)
        if len(items) > relay.config.keypackage_max_upload:
            raise PayloadTooLarge(f"at most {relay.config.keypackage_max_upload} per upload")
        packages = []
        for i, (data, lr) in enumerate(items):
            try:
                packages.append(ds.check_key_package(data, who.user, lr))
            except RelayError as exc:
                exc.details["index"] = i
                raise
        now_ms = int(ds.clock() * 1000)
        stored = await relay.storage.put_key_packages(who.user, who.device, packages, now_ms)
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
        who = request_identity(relay)
        now = int(for_relay(relay).clock())
        counts = await relay.storage.key_package_counts(who.user, who.device, now)
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
        who = request_identity(relay)
        body = await request.get_json(force=True, silent=True)
        if not isinstance(body, dict):
            raise InvalidRequest("body must be JSON {users, cipher_suite}")
        users, suite = body.get("users"), body.get("cipher_suite")
        if (
            not isinstance(users, list)
            or not users
            or len(users) > MAX_MEMBERS_PER_REQUEST
            or not all(isinstance(u, str) and u.startswith("did:") for u in users)
        ):
            raise InvalidRequest("users must be a non-empty list of DIDs")
        if type(suite) is not int or not 0 < suite < 65536:
            raise InvalidRequest("cipher_suite must be an MLS cipher suite number")
        result = await for_relay(relay).claim(who.user, users, suite)
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
        who = request_identity(relay)
        try:
            conv = bytes.fromhex(conversation)
        except ValueError:
            raise InvalidRequest("the conversation id in the path is hex") from None
        epoch, data = await relay.storage.latest_group_info(conv, who.user)
        return Response(data, content_type="message/mls", headers={"MLS-Epoch": str(epoch)})

    return bp
