"""Blob storage on a real S3-compatible server (moto, started by tests/s3server.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from protocol.errors import BlobNotFound
from relay.offline.blobs import store_path
from storage.blobstore import open_blob_store
from storage.s3 import S3BlobStore

from .harness import running_relay
from .mls_helpers import as_json, http
from .relayclient import connect, make_token
from .s3server import S3Server, new_bucket
from .test_cli import clean_env, run_cli

ALICE, BOB = "did:example:alice", "did:example:bob"
CONV = b"s3-conv"


async def test_blob_conversation_on_s3(database_url: str, s3_server: S3Server) -> None:
    url = s3_server.blob_url(new_bucket(), "relay")
    store = open_blob_store(url, "unused")
    assert isinstance(store, S3BlobStore)
    big, uploaded = os.urandom(70_000), os.urandom(2 * 1024 * 1024)
    with trio.fail_after(40):
        await store.create_bucket()
        async with (
            running_relay(database_url, blob_url=url) as r,
            connect(r.ws_url, ALICE, "a1") as alice,
            connect(r.ws_url, BOB, "b1", subscribe=True) as bob,
        ):
            await alice.ok("#createConversation", conversation=CONV, members=[BOB], storage="blob")
            sent = await alice.ok(
                "#send", conversation=CONV, ciphertext=big, client_message_id="big"
            )
            base = f"/v1/conversations/{CONV.hex()}/blobs"
            status, _, body = await http(r.port, "POST", base, make_token(ALICE, "a1"), uploaded)
            assert status == 201, body
            key2 = as_json(body)["blob"]
            await alice.ok("#send", conversation=CONV, blob=key2, client_message_id="up")
            first, second = await bob.messages(2)
            assert (first["blob"], second["blob"]) == (sent["blob"], key2)
            for key, data in ((sent["blob"], big), (key2, uploaded)):
                assert await store.get(store_path(CONV, key)) == data
                status, _, body = await http(r.port, "GET", f"{base}/{key}", make_token(BOB, "b"))
                assert (status, body) == (200, data)
            await alice.ok("#deleteConversation", conversation=CONV)
            await r.relay.blobs.settled()  # the delete woke the collector
            for key in (sent["blob"], key2):
                with pytest.raises(BlobNotFound):
                    await store.get(store_path(CONV, key))
        await store.aclose()


async def test_check_reaches_the_blob_store_and_hides_its_secret(
    tmp_path: Path, s3_server: S3Server
) -> None:
    url = s3_server.blob_url(new_bucket())
    store = open_blob_store(url, "unused")
    assert isinstance(store, S3BlobStore)
    await store.create_bucket()
    await store.aclose()
    env = clean_env(tmp_path, DATABASE_URL=f"sqlite:///{tmp_path}/c.db", RELAY_BLOB_URL=url)
    result = await trio.to_thread.run_sync(run_cli, ["check"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "blobs: ok" in result.stdout
    assert s3_server.secret_key not in result.stdout
    missing = clean_env(
        tmp_path, DATABASE_URL=f"sqlite:///{tmp_path}/c.db",
        RELAY_BLOB_URL=s3_server.blob_url("no-such-bucket-here"),
    )  # fmt: skip
    result = await trio.to_thread.run_sync(run_cli, ["check"], missing)
    assert result.returncode == 1 and "blobs: FAILED" in result.stdout
