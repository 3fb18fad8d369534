"""GET /v1/events?cursor=: the cursor is checked before anything is allocated.

Before: a 14-character cursor holding the integer 2^26 where a conversation id
belongs, plus three 4-byte sends, made 268 MB of SSE output (RSS 456 -> 1133
MB); four such entries blocked the event loop 2.86 s; seq=inf or 2^62 gave a
500; a used token still had its cursor decoded."""

from __future__ import annotations

import base64
import struct

import cbor2
import pytest
import trio

from protocol import ssecursor
from protocol.errors import InvalidRequest
from tests.relayclient import connect, make_token

from .httpnode import Prober, check_live, during, error_of, exchange, relay_node, request

ALICE, BOB = "did:example:alice", "did:example:bob"
CONV = b"cursor-conv"


def _cursor(raw: bytes) -> str:
    return "v1." + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# --- the codec (protocol/ssecursor.py), no I/O ---------------------------------------


def test_round_trip_matches_the_old_encoding() -> None:
    positions = {b"a": 0, b"b" * 255: 2**63 - 1, b"\x00\x01": 24}
    text = ssecursor.encode(positions)
    assert ssecursor.decode(text) == positions
    # Same bytes as the general CBOR encoder gave (cursors issued before still work).
    old = cbor2.dumps([[c, s] for c, s in sorted(positions.items())])
    assert text == _cursor(old)


def test_every_truncation_and_every_trailing_byte_is_refused() -> None:
    raw = cbor2.dumps([[b"one", 5], [b"two", 70000]])
    for cut in range(1, len(raw)):
        with pytest.raises(InvalidRequest):
            ssecursor.decode(_cursor(raw[:cut]))
    with pytest.raises(InvalidRequest):
        ssecursor.decode(_cursor(raw + b"\x00"))


@pytest.mark.parametrize(
    "raw",
    [
        cbor2.dumps([[2**26, 0]]),  # an integer where the conversation id belongs
        cbor2.dumps([[2**26, 0]] * 4),
        cbor2.dumps([[b"c", 2**63]]),  # seq past 63 bits
        cbor2.dumps([[b"c", 2**64 + 1]]),  # a bignum (tag 2)
        cbor2.dumps([[b"c", float("inf")]]),
        cbor2.dumps([[b"c", 1.0]]),
        cbor2.dumps([[b"c", -1]]),
        cbor2.dumps([[b"", 1]]),
        cbor2.dumps([[b"x" * 256, 1]]),
        cbor2.dumps([[b"c", 1], [b"c", 2]]),  # the same conversation twice
        cbor2.dumps([[b"c", 1, 2]]),
        cbor2.dumps([["c", 1]]),  # text, not bytes
        cbor2.dumps(cbor2.CBORTag(55799, [[b"c", 1]])),
        b"\x9f\x82\x41c\x01\xff",  # indefinite-length list
        b"\x9b" + struct.pack(">Q", 2**62),  # a list claiming 2^62 entries
        b"\x81\x82\x5b" + struct.pack(">Q", 2**40) + b"c\x01",  # a 1 TiB byte string
        cbor2.dumps([[bytes([i % 256, i // 256]), 1] for i in range(513)]),  # too many
    ],
)
def test_malformed_cursors_are_refused(raw: bytes) -> None:
    with pytest.raises(InvalidRequest) as refused:
        ssecursor.decode(_cursor(raw))
    assert refused.value.details["field"] == "cursor"


def test_text_limits() -> None:
    for text in ("v2.gA", "v1.!!!!", "v1." + "A" * ssecursor.MAX_CURSOR_TEXT, "v1.\u00e9"):
        with pytest.raises(InvalidRequest):
            ssecursor.decode(text)
    assert ssecursor.decode("") == {}


def test_encoding_stays_within_the_limits_keeping_the_recent() -> None:
    positions = {i.to_bytes(2, "big") * 100: i for i in range(1000)}  # 200-byte ids
    text = ssecursor.encode(positions)
    assert len(text) <= ssecursor.MAX_CURSOR_TEXT
    kept = ssecursor.decode(text)
    assert 0 < len(kept) < 1000
    assert max(kept.values()) == 999 and min(kept.values()) == 1000 - len(kept)
    many = {i.to_bytes(2, "big"): i for i in range(2000)}
    assert len(ssecursor.decode(ssecursor.encode(many))) == ssecursor.MAX_CURSOR_ENTRIES


# --- against a relay process ------------------------------------------------------------


def _events_request(token: str, cursor: str) -> bytes:
    return request("GET", f"/v1/events?cursor={cursor}", token)


@pytest.mark.timeout(90)
async def test_sse_cursor_attack_allocates_nothing(tmp_path) -> None:
    with trio.fail_after(80):
        async with relay_node(tmp_path) as node:
            url = f"ws://127.0.0.1:{node.port}/v1/ws"
            async with connect(url, ALICE, "a1") as alice:
                await alice.ok("#createConversation", conversation=CONV, members=[BOB])
                for i in range(3):
                    await alice.send(CONV, b"%04d" % i)
            before = node.rss_mb()
            prober = Prober(node.port)
            attacks = [
                (cbor2.dumps([[2**26, 0]]), 400, "InvalidRequest"),
                (cbor2.dumps([[2**26 + i, 0] for i in range(4)]), 400, "InvalidRequest"),
                (cbor2.dumps([[CONV, 2**64 - 1]]), 400, "InvalidRequest"),
                (cbor2.dumps([[CONV, float("inf")]]), 400, "InvalidRequest"),
                # In range but past the end: refused as on the WebSocket, not clamped.
                (cbor2.dumps([[CONV, 2**62]]), 400, "FutureCursor"),
            ]

            async def attack() -> list[tuple[int, str]]:
                answers = []
                for raw, _, _ in attacks * 3:
                    token = make_token(BOB, "sse")
                    answers.append(
                        error_of(await exchange(node.port, _events_request(token, _cursor(raw))))
                    )
                return answers

            answers = await during(prober, attack)
            assert answers == [(status, error) for _, status, error in attacks * 3]
            growth = node.rss_mb() - before
            print(
                f"SSE cursor attack: {len(answers)} refused, RSS +{growth:.1f} MB, "
                f"/health/live worst {prober.worst_ms:.1f} ms of {len(prober.latencies)}"
            )
            assert growth < 20, f"RSS grew {growth:.0f} MB"
            check_live(prober, min_samples=1)  # the attack blocked the loop 2.8 s
            assert "Traceback" not in node.log_text()

            # A used token is refused before its cursor is looked at.
            token = make_token(BOB, "sse")
            good = ssecursor.encode({CONV: 1})
            with trio.fail_after(10):
                stream = await trio.open_tcp_stream("127.0.0.1", node.port)
                async with stream:
                    await stream.send_all(_events_request(token, good))
                    assert (await stream.receive_some(100)).startswith(b"HTTP/1.1 200")
                    replay = _events_request(token, _cursor(cbor2.dumps([[2**26, 0]])))
                    assert error_of(await exchange(node.port, replay)) == (401, "TokenReplayed")
