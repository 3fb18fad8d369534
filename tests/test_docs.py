"""docs/PROTOCOL.md stays true: its hex examples are what the relay speaks."""

from __future__ import annotations

import re
from pathlib import Path

from protocol import events
from protocol.errors import NotMember
from protocol.frames import decode_frame

DOC = Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md"
HEX = re.compile(r"^[0-9a-f]+$")


def _examples() -> list[bytes]:
    text = DOC.read_text().split("## Examples (hex)", 1)[1].split("\n## ", 1)[0]
    frames: list[bytes] = []
    for block in re.split(r"\n\s*\n", text):
        hex_parts = [
            line.split()[0]
            for line in block.splitlines()
            if line.startswith("    ") and HEX.match(line.split()[0])
        ]
        if hex_parts:
            frames.append(bytes.fromhex("".join(hex_parts)))
    return frames


def test_every_hex_example_decodes_to_a_frame():
    frames = [decode_frame(f) for f in _examples()]
    assert [f.t for f in frames] == [
        "#send",
        "#result",
        "#message",
        "#error",
        "#subscribe",
        "#info",
        "#ack",
        None,
    ]
    assert frames[0].body["ciphertext"] == bytes.fromhex("deadbeef")


def test_examples_match_the_encoder_byte_for_byte():
    examples = _examples()
    assert examples[1] == events.result(7, seq=42, time=1795810170000)
    assert examples[2] == events.message(
        bytes.fromhex("c0ffee"), 42, "did:example:alice", 1795810170000, bytes.fromhex("deadbeef")
    )
    assert examples[3] == events.error(NotMember("not a member of this conversation"), 7)
    assert examples[5] == events.info("CaughtUp", "replay complete; live from here")
    assert examples[7] == events.fatal("ServiceRestart", "node shutting down")
