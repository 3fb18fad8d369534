"""The hostile fuzz targets of scripts/fuzz_hostile.py, a few thousand inputs
each with fixed seeds, in every suite run (docs/FUZZING.md): a refusal must
be a RelayError with a short message, and whatever parses must hold only
text and numbers storage can hold."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import fuzz_hostile

from protocol.errors import RelayError

INPUTS = 1000


@pytest.mark.parametrize("target", fuzz_hostile.TARGETS, ids=lambda t: t.name)
def test_hostile_inputs_are_refused_or_storable(target: fuzz_hostile.Target) -> None:
    rng = random.Random(20261202)
    parsed = refused = 0
    for _ in range(INPUTS):
        data = target.generate(rng)
        try:
            target.check(data)
            parsed += 1
        except RelayError as exc:
            fuzz_hostile.refusal_ok(exc)
            refused += 1
    # Both outcomes occur: the generator keeps valid inputs valid often enough.
    assert parsed > 10 and refused > INPUTS // 2, (parsed, refused)


def test_the_writer_writes_what_the_strict_decoder_refuses() -> None:
    cbor = fuzz_hostile.cbor
    assert cbor(2**64) == bytes.fromhex("c249010000000000000000")
    assert cbor("\ud800") == bytes.fromhex("63eda080")
    assert cbor(fuzz_hostile.Dup([("a", 1), ("a", 2)])) == bytes.fromhex("a2616101616102")
    assert cbor(fuzz_hostile.Indef([1])) == bytes.fromhex("9f01ff")
    assert cbor(fuzz_hostile.Tag(55799, {})) == bytes.fromhex("d9d9f7a0")
