"""Structured logs: JSON lines with connection context, and nothing secret."""

from __future__ import annotations

import io
import json
import logging

import trio

from relay.base import logs as logs

from .harness import running_relay
from .relayclient import connect, make_token

ALICE, BOB = "did:example:alice-very-identifying", "did:example:bob"
CIPHERTEXT = b"TOPSECRET-CIPHERTEXT-BYTES"


async def test_connection_lines_are_json_with_context_and_no_secrets(tmp_path):
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = logs.configure("INFO", "json", stream)
    try:
        with trio.fail_after(30):
            async with running_relay(f"sqlite:///{tmp_path}/r.db") as r:
                token = make_token(ALICE, "phone")
                async with connect(r.ws_url, ALICE, "phone", token=token) as alice:
                    session = alice.hello["session"]
                    await alice.ok("#createConversation", conversation=b"c", members=[BOB])
                    await alice.send(b"c", CIPHERTEXT)
                    # A stray log call passing secrets must be scrubbed too.
                    logging.getLogger("relay.test").info(
                        "user %s sent with %s",
                        ALICE,
                        token,
                        extra={"ciphertext": CIPHERTEXT, "token": token, "peer": BOB},
                    )
                with trio.fail_after(10):
                    while "connection closed" not in stream.getvalue():  # noqa: ASYNC110
                        await trio.sleep(0.02)
    finally:
        logs.remove(handler)
        root.setLevel(level)

    text = stream.getvalue()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert lines, "nothing was logged"
    for forbidden in (token, CIPHERTEXT.decode(), ALICE, BOB, token.split(".")[1]):
        assert forbidden not in text, forbidden
    ours = [line for line in lines if line.get("session") == session]
    events = [line["event"] for line in ours]
    assert "connection opened" in events and "connection closed" in events, lines
    for line in ours:
        assert line["user"] == logs.user_hash(ALICE)
        assert line["node"] == r.relay.node_id
        assert line["device"] == "phone"
        assert line["level"] == "info"  # a normal session logs no warning or error
        assert "timestamp" in line
    [stray] = [line for line in lines if line.get("logger") == "relay.test"]
    assert stray["ciphertext"] == "<redacted>" and stray["token"] == "<redacted>"
    assert stray["peer"] == logs.short_did(BOB)
    assert "<token>" in stray["event"] and logs.short_did(ALICE) in stray["event"]


def test_debug_lines_keep_dids_but_never_tokens():
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = logs.configure("DEBUG", "json", stream)
    try:
        token = make_token(ALICE, "d")
        logging.getLogger("relay.test").debug("who %s", ALICE, extra={"authorization": token})
    finally:
        logs.remove(handler)
        root.setLevel(level)
    [line] = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert ALICE in line["event"] and line["authorization"] == "<redacted>"
