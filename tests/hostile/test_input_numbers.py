"""Every client-supplied number is validated before use (issue 12 point 4,
WebSocket requests and MLS headers): type (a bool is an int in Python, and
is refused), range (seqs and epochs fit storage's signed 64 bits), entry
counts.  The SSE cursor is the http-edge tests' (tests/hostile/test_http_*).
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from protocol.errors import InvalidRequest
from protocol.frames import Frame
from protocol.mls import ContentType
from protocol.requests import (
    MAX_CURSORS_PER_REQUEST,
    MAX_SEQ,
    RequestLimits,
    Subscribe,
    parse_request,
)
from relay.mls.service import MAX_EPOCH

from ..harness import running_relay
from ..mls_helpers import private
from ..relayclient import connect

C = b"conv"

#: (request type, body, the field the refusal names)
BAD_NUMBERS: list[tuple[str, dict[str, Any], str | None]] = [
    ("#ack", {"conversation": C, "seq": True}, "seq"),
    ("#ack", {"conversation": C, "seq": 1.0}, "seq"),
    ("#ack", {"conversation": C, "seq": -1}, "seq"),
    ("#ack", {"conversation": C, "seq": MAX_SEQ + 1}, "seq"),
    ("#ack", {"conversation": C, "seq": 2**64 - 1}, "seq"),
    ("#ack", {"conversation": C, "seq": "1"}, "seq"),
    ("#markRead", {"conversation": C, "seq": False}, "seq"),
    ("#markRead", {"conversation": C, "seq": 2**63}, "seq"),
    ("#deliveryState", {"conversation": C, "seqs": [1, True]}, "seqs[]"),
    ("#deliveryState", {"conversation": C, "seqs": [2**63]}, "seqs[]"),
    ("#deliveryState", {"conversation": C, "seqs": list(range(1001))}, "seqs"),
    ("#subscribe", {"cursors": [{"conversation": C, "seq": True}]}, "cursors[].seq"),
    ("#subscribe", {"cursors": [{"conversation": C, "seq": 2**63}]}, "cursors[].seq"),
    ("#subscribe", {"cursors": [{"conversation": C, "seq": 1.5}]}, "cursors[].seq"),
    ("#subscribe", {"cursors": [{"conversation": C, "seq": 1}] * 2}, "cursors"),
    ("#subscribe", {"cursors": {"conversation": C}}, "cursors"),
    ("#subscribe", {"cursors": [
        {"conversation": i.to_bytes(4, "big"), "seq": 0}
        for i in range(MAX_CURSORS_PER_REQUEST + 1)
    ]}, "cursors"),
]  # fmt: skip


@pytest.mark.parametrize(("t", "body", "field"), BAD_NUMBERS, ids=lambda v: str(v)[:40])
def test_bad_numbers_are_refused_naming_the_field(
    t: str, body: dict[str, Any], field: str | None
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_request(Frame(1, t, {"id": 1, **body}), RequestLimits())
    assert type(refused.value) is InvalidRequest
    assert refused.value.details.get("field") == field, refused.value


@pytest.mark.parametrize("rid", [True, False, -1, 2**53, 1.0, "1", None])
def test_request_ids_are_integers_below_2_to_53(rid: Any) -> None:
    with pytest.raises(InvalidRequest, match="integer id"):
        parse_request(Frame(1, "#listConversations", {"id": rid}), RequestLimits())


@pytest.mark.parametrize("suite", [True, 0, 65536, -1, 1.0])
def test_cipher_suites_are_uint16_numbers(suite: Any) -> None:
    body = {"id": 1, "users": ["did:plc:a"], "cipher_suite": suite}
    with pytest.raises(InvalidRequest, match="cipher_suite"):
        parse_request(Frame(1, "#claimKeyPackages", body), RequestLimits())


def test_the_largest_values_are_accepted() -> None:
    cursors = [{"conversation": i.to_bytes(4, "big"), "seq": MAX_SEQ} for i in range(10_000)]
    parsed = parse_request(
        Frame(1, "#subscribe", {"id": 2**53 - 1, "cursors": cursors}), RequestLimits()
    )
    assert isinstance(parsed, Subscribe) and len(parsed.cursors) == MAX_CURSORS_PER_REQUEST


@pytest.mark.timeout(60)
async def test_a_relay_answers_bad_numbers_and_stays_usable(database_url):
    """Over a real connection: each bad number gets InvalidRequest naming the
    field (the same connection goes on), the largest seq reaches storage as a
    clean FutureCursor, and MLS header epochs above MAX_EPOCH are refused."""
    alice = "did:example:alice"
    with trio.fail_after(40):
        async with running_relay(database_url) as r, connect(r.ws_url, alice) as client:
            await client.ok("#createConversation", conversation=C, members=[])
            for t, body, field in BAD_NUMBERS:
                reply = await client.request(t, **body)
                assert not reply.ok and reply.body["error"] == "InvalidRequest", (t, reply.body)
                assert reply.body.get("field") == field, (t, reply.body)
            reply = await client.request("#ack", conversation=C, seq=MAX_SEQ)
            assert reply.body["error"] == "FutureCursor", reply.body
            group = b"mls-numbers"
            await client.ok("#createConversation", conversation=group, members=[], mls=True)
            for epoch in (MAX_EPOCH + 1, 2**64 - 1):
                reply = await client.request(
                    "#send",
                    conversation=group,
                    ciphertext=private(group, epoch, ContentType.COMMIT),
                    client_message_id=f"e{epoch}",
                )
                assert reply.body["error"] == "InvalidMLS", reply.body
                assert reply.body["field"] == "epoch"
            reply = await client.request(  # in range: storage's own epoch check answers
                "#send",
                conversation=group,
                ciphertext=private(group, MAX_EPOCH, ContentType.COMMIT),
                client_message_id="in-range",
            )
            assert reply.body["error"] == "FutureEpoch", reply.body
            body = await client.ok("#subscribe", cursors=[{"conversation": C, "seq": 0}])
            assert body["conversations"] == 2
