"""Findings of scripts/fuzz.py's hostile targets (docs/FUZZING.md), against relays."""

from __future__ import annotations

import pytest
import trio

from tests.relayclient import connect

from .httpnode import relay_node

ALICE, BOB = "did:example:alice", "did:example:bob"
CONV = b"fuzz-findings"


@pytest.mark.timeout(60)
async def test_a_send_with_a_blob_and_a_ciphertext_of_another_type_is_invalid(tmp_path) -> None:
    """Before: with a blob key, a falsy ciphertext that is not bytes ([], 0,
    false, null) passed the parser's checks and failed an assertion: the
    connection closed with 1011 instead of one InvalidRequest."""
    with trio.fail_after(50):
        async with relay_node(tmp_path) as node:
            url = f"ws://127.0.0.1:{node.port}/v1/ws"
            async with connect(url, ALICE, "a1") as alice:
                await alice.ok(
                    "#createConversation", conversation=CONV, members=[BOB], storage="blob"
                )
                for ciphertext in ([], 0, False, None, {}, 0.0, ""):
                    reply = await alice.request(
                        "#send",
                        conversation=CONV,
                        blob="A" * 43,
                        ciphertext=ciphertext,
                        client_message_id="m",
                    )
                    assert not reply.ok, ciphertext
                    assert reply.body["error"] == "InvalidRequest", reply.body
                    assert reply.body["field"] == "ciphertext", reply.body
                assert (await alice.request("#listConversations")).ok
            assert "Traceback" not in node.log_text()
