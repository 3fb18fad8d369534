"""MLS objects and a tiny HTTP client for the delivery-service tests.

KeyPackages are real: a vector KeyPackage (passive-client vectors give its
``signature_priv``) re-signed with a new credential identity (the user's DID)
and a fresh init_key, so each is valid, distinct and bound to a user.
Handshake/application messages the relay only reads the header of are built
with the project's own encoder when a test needs an exact epoch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from functools import cache
from typing import Any

import trio

from protocol.mls import (
    ContentType,
    Credential,
    CredentialType,
    GroupContext,
    GroupInfo,
    KeyPackage,
    Lifetime,
    MLSMessage,
    PrivateMessage,
    Welcome,
    WireFormat,
    encode_key_package,
    encode_mls_message,
    key_package_ref,
    parse_key_package,
    sign_with_label,
)
from protocol.mls.group import EncryptedGroupSecrets
from protocol.mls.leaf import write_key_package_fields, write_leaf_node_fields
from protocol.mls.structs import HPKECiphertext
from protocol.mls.tls import encode_with
from tests.vectorfiles import vector_path

KP_HEADER = b"\x00\x01\x00\x05"  # mls10, wire_format mls_key_package


def vectors(name: str) -> Any:
    return json.loads(vector_path(name).read_text())


@cache
def _base(suite: int) -> tuple[KeyPackage, bytes]:
    for entry in vectors("mlswg-subsets/passive-client-welcome.cs1-3.json"):
        if entry["cipher_suite"] == suite:
            kp = parse_key_package(bytes.fromhex(entry["key_package"]), bare=False)
            return kp, bytes.fromhex(entry["signature_priv"])
    raise LookupError(suite)


def make_key_package(
    identity: str | bytes,
    *,
    suite: int = 1,
    lifetime: tuple[int, int] | None = (0, 2**64 - 1),
    break_signature: bool = False,
) -> bytes:
    """A valid KeyPackage MLSMessage whose basic credential identity is ``identity``."""
    kp, priv = _base(suite)
    ident = identity.encode() if isinstance(identity, str) else identity
    leaf = dataclasses.replace(
        kp.leaf_node,
        credential=Credential(CredentialType.BASIC, identity=ident),
        lifetime=Lifetime(*lifetime) if lifetime else kp.leaf_node.lifetime,
    )
    tbs = encode_with(write_leaf_node_fields, leaf)
    leaf = dataclasses.replace(leaf, signature=sign_with_label(suite, priv, "LeafNodeTBS", tbs))
    new = dataclasses.replace(kp, leaf_node=leaf, init_key=os.urandom(len(kp.init_key)))
    tbs = encode_with(write_key_package_fields, new)
    sig = sign_with_label(suite, priv, "KeyPackageTBS", tbs)
    if break_signature:
        sig = bytes([sig[0] ^ 1]) + sig[1:]
    return KP_HEADER + encode_key_package(dataclasses.replace(new, signature=sig))


def ref_of(kp_message: bytes) -> bytes:
    return key_package_ref(parse_key_package(kp_message, bare=False))


def private(group: bytes, epoch: int, ctype: ContentType) -> bytes:
    """A PrivateMessage (the relay reads only its cleartext header)."""
    body = PrivateMessage(group, epoch, ctype, b"", os.urandom(12), os.urandom(24))
    return encode_mls_message(MLSMessage(1, WireFormat.PRIVATE_MESSAGE, body))


def group_info(group: bytes, epoch: int) -> bytes:
    """A GroupInfo MLSMessage for ``group`` at ``epoch`` (random secrets and signature)."""
    ctx = GroupContext(1, 1, group, epoch, os.urandom(32), os.urandom(32), ())
    info = GroupInfo(ctx, (), os.urandom(32), 0, os.urandom(64))
    return encode_mls_message(MLSMessage(1, WireFormat.GROUP_INFO, info))


def welcome(refs: list[bytes], suite: int = 1) -> bytes:
    secrets = tuple(
        EncryptedGroupSecrets(ref, HPKECiphertext(os.urandom(32), os.urandom(48))) for ref in refs
    )
    return encode_mls_message(
        MLSMessage(1, WireFormat.WELCOME, Welcome(suite, secrets, os.urandom(64)))
    )


async def http(
    port: int,
    method: str,
    path: str,
    token: str | None,
    body: bytes = b"",
    content_type: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on a fresh connection (Connection: close)."""
    head = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: close"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    if content_type:
        head.append(f"Content-Type: {content_type}")
    head.append(f"Content-Length: {len(body)}")
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    raw_head, _, payload = data.partition(b"\r\n\r\n")
    lines = raw_head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, payload


def as_json(payload: bytes) -> Any:
    return json.loads(payload)
