"""AT Protocol tooling reads every frame the relay sends.

tests/frames-corpus/frames.json (scripts/frames_corpus.py) holds one example of
every kind of frame; each is decoded with Python ``atproto``'s
``Frame.from_bytes`` and with npm ``@atproto/xrpc-server``'s ``Frame.fromBytes``
(through node, tests/atproto-js, installed by scripts/test with npm ci), and
must come out as the relay's own decoder reads it.  A live relay session then
shows the corpus lacks no kind the relay really sends.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from atproto_subscription.frames import ErrorFrame, Frame, MessageFrame
from trio_websocket import open_websocket_url

from .conftest import in_ci
from .harness import running_relay
from .relayclient import encode, make_token

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "frames-corpus" / "frames.json"
JS = ROOT / "tests" / "atproto-js"
ALICE, BOB = "did:example:alice", "did:example:bob"


def corpus() -> list[tuple[str, bytes]]:
    return [(e["name"], bytes.fromhex(e["hex"])) for e in json.loads(CORPUS.read_text())]


def relay_decode(data: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    stream = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(stream)
    header, body = decoder.decode(), decoder.decode()
    assert stream.tell() == len(data)
    return header, body


def kind(header: dict[str, Any], body: dict[str, Any]) -> tuple[Any, ...]:
    """What distinguishes frames for a client: op, type, and the info / error name."""
    t = header.get("t")
    if t == "#info":
        return (header["op"], t, body["name"])
    if t == "#error" or header["op"] == -1:
        return (header["op"], t, body["error"])
    return (header["op"], t)


def test_the_corpus_is_what_the_script_generates():
    out = subprocess.run(
        [sys.executable, "scripts/frames_corpus.py", "--check"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr


def test_the_corpus_covers_every_error_class_and_the_stream_error():
    names = {name for name, _ in corpus()}
    from protocol import errors

    classes = [
        c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.RelayError)
    ]
    assert {f"error-{c.__name__}" for c in classes} <= names
    assert {"fatal", "error-without-id", "hello", "message", "welcome"} <= names


def python_atproto_reads(name: str, data: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """atproto's Frame.from_bytes decodes ``data`` to what the relay encoded."""
    header, body = relay_decode(data)
    frame = Frame.from_bytes(data)  # raised TypeError on op:-1 bodies with an id
    if header["op"] == 1:
        assert isinstance(frame, MessageFrame), name
        assert frame.type == header["t"] and frame.body == body, name
    else:
        assert isinstance(frame, ErrorFrame), name
        assert set(body) == {"error", "message"}, name
        assert (frame.body.error, frame.body.message) == (body["error"], body["message"])
    return header, body


def test_python_atproto_reads_every_frame():
    for name, data in corpus():
        header, body = python_atproto_reads(name, data)
        if header.get("t") == "#error":
            assert body["error"] and body["message"], name
            assert ("id" in body) == (name != "error-without-id"), name


def _js_plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bytes": value.hex()}
    if isinstance(value, list):
        return [_js_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _js_plain(v) for k, v in value.items()}
    return value


def _node() -> str:
    node = shutil.which("node")
    reason = ""
    if node is None:
        reason = "node is not installed"
    elif not (JS / "node_modules" / "@atproto" / "xrpc-server").is_dir():
        reason = f"{JS}/node_modules is missing (scripts/test runs npm ci there)"
    if reason:
        if in_ci():
            pytest.fail(reason + ": the JavaScript SDK check cannot run", pytrace=False)
        pytest.skip(reason)
    assert node is not None
    return node


@pytest.mark.timeout(60)
def test_javascript_atproto_reads_every_frame():
    node = _node()
    frames = corpus()
    out = subprocess.run(
        [node, str(JS / "decode.mjs")],
        input=json.dumps([{"name": n, "hex": d.hex()} for n, d in frames]),
        capture_output=True, text=True, timeout=45, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    decoded = {d["name"]: d for d in json.loads(out.stdout)}
    assert set(decoded) == {name for name, _ in frames}
    for name, data in frames:
        header, body = relay_decode(data)
        got = decoded[name]
        assert "failure" not in got, (name, got)
        assert (got["op"], got["t"]) == (header["op"], header.get("t")), name
        assert got["body"] == _js_plain(body), name


async def _drain(ws: Any, into: list[bytes], until: Any) -> None:
    with trio.fail_after(10):
        while True:
            data = await ws.get_message()
            into.append(data)
            if until(*relay_decode(data)):
                return


async def test_a_live_session_sends_no_kind_the_corpus_lacks(tmp_path):
    known = {kind(*relay_decode(data)) for _, data in corpus()}
    conv = b"corpus-live"
    seen: list[bytes] = []
    with trio.fail_after(40):
        async with running_relay(f"sqlite:///{tmp_path}/r.db") as r:
            headers = [(b"authorization", f"Bearer {make_token(ALICE, 'a1')}".encode())]
            bob_headers = [(b"authorization", f"Bearer {make_token(BOB, 'b1')}".encode())]
            async with (
                open_websocket_url(r.ws_url, extra_headers=headers) as a,
                open_websocket_url(r.ws_url, extra_headers=bob_headers) as b,
            ):

                def reply_to(rid: int) -> Any:
                    return lambda h, body: (
                        h.get("t") in ("#result", "#error") and body.get("id") == rid
                    )

                await _drain(a, seen, lambda h, body: h.get("t") == "#hello")
                await _drain(b, seen, lambda h, body: h.get("t") == "#hello")
                await b.send_message(encode("#subscribe", {"id": 1}))
                await _drain(b, seen, lambda h, body: body.get("name") == "CaughtUp")
                requests: list[tuple[str, dict[str, Any]]] = [
                    ("#createConversation", {"conversation": conv, "members": [BOB]}),
                    (
                        "#send",
                        {
                            "conversation": conv,
                            "ciphertext": b"x",
                            "client_message_id": uuid.uuid4().hex,
                        },
                    ),
                    ("#send", {"conversation": conv, "ciphertext": b"t", "ephemeral": True}),
                    ("#markRead", {"conversation": conv, "seq": 1}),
                    ("#listConversations", {}),
                    ("#ack", {"conversation": conv, "seq": 9}),  # FutureCursor
                    (
                        "#send",
                        {"conversation": b"nope", "ciphertext": b"x", "client_message_id": "m"},
                    ),
                    ("#nonsense", {}),
                    ("#subscribe", {}),
                ]
                for rid, (t, body) in enumerate(requests, start=10):
                    await a.send_message(encode(t, {"id": rid, **body}))
                    await _drain(a, seen, reply_to(rid))
                await a.send_message(encode("#listConversations", {}))  # no id
                await _drain(a, seen, lambda h, body: h.get("t") == "#error" and "id" not in body)
                for t in ("#membership", "#message", "#ephemeral", "#read"):
                    await _drain(b, seen, lambda h, body, t=t: h.get("t") == t)
    kinds = [kind(*relay_decode(data)) for data in seen]
    assert {k[1] for k in kinds} >= {"#hello", "#result", "#error", "#info", "#message"}
    assert set(kinds) <= known, set(kinds) - known
    for data in seen:  # and atproto's Python SDK reads each live frame as sent
        python_atproto_reads("live", data)
