"""A longer mutational fuzz run of the decoders that face the network.

    .venv/bin/python scripts/fuzz.py --seconds 60 [--targets frames,sse-cursor]

Mutational targets: the frame decoder + request parser (protocol.frames/requests),
the WebSocket frame reader (protocol.websocket.ServerConnection) and the MLS
parser (protocol.mls).  Seeds are valid frames (and hostile ones) and every MLS
object in tests/vectors/ (shipped with the repository); each input is a seed
mutated by byte flips, inserts, deletions, truncations and splices.  The only
acceptable outcome is a parse or a typed RelayError.

Structured targets (scripts/fuzz_hostile.py): requests, SSE cursors, signed
token claims and HTTP claim bodies carrying NUL, lone surrogates, numbers out
of range, CBOR tags, duplicate keys and indefinite lengths.  Their oracle is
stricter: a refusal must be a RelayError with a short message, and whatever
parses must hold only text and numbers storage can hold.

Anything else is reported with the input and the run fails.  Prints inputs
per target, inputs/s, the slowest input (replayed alone afterwards) and the
peak RSS, as recorded in docs/FUZZING.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import fuzz_hostile  # noqa: E402

from protocol import events  # noqa: E402
from protocol.errors import RelayError  # noqa: E402
from protocol.frames import decode_frame, encode_frame  # noqa: E402
from protocol.mls import parse_key_package, parse_mls_message  # noqa: E402
from protocol.requests import RequestLimits, parse_request  # noqa: E402
from protocol.websocket import ServerConnection  # noqa: E402


def frame_target(data: bytes) -> None:
    parse_request(decode_frame(data), RequestLimits())


def ws_target(data: bytes) -> None:
    conn = ServerConnection(max_message=1 << 16)
    for event in conn.receive(data):
        if hasattr(event, "data"):
            frame_target(event.data)


def mls_target(data: bytes) -> None:
    parse_mls_message(data)


def kp_target(data: bytes) -> None:
    parse_key_package(data, bare=True)


def _frame_seeds() -> list[bytes]:
    conv = bytes(range(16))
    hostile_rng = random.Random(0)
    hostile = [fuzz_hostile.request_input(hostile_rng) for _ in range(60)]
    return [
        *hostile,
        encode_frame(
            "#send",
            {"id": 1, "conversation": conv, "ciphertext": b"x" * 64, "client_message_id": "m"},
        ),
        encode_frame("#subscribe", {"id": 2, "cursors": [{"conversation": conv, "seq": 5}]}),
        encode_frame(
            "#createConversation", {"id": 3, "conversation": conv, "members": ["did:example:a"]}
        ),
        events.message(conv, 9, "did:example:a", 1, b"y" * 100),
    ]


def _ws_seeds(frames: list[bytes]) -> list[bytes]:
    out = []
    for payload in frames:
        mask = b"\x01\x02\x03\x04"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        n = len(payload)
        length = bytes((0x80 | n,)) if n < 126 else b"\xfe" + n.to_bytes(2, "big")
        out.append(b"\x82" + length + mask + masked)
    return out


def _mls_seeds() -> tuple[list[bytes], list[bytes]]:
    messages: list[bytes] = []
    packages: list[bytes] = []
    vectors = ROOT / "tests" / "vectors"  # shipped with the repository

    def walk(node: object, key: str = "") -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str) and len(node) > 8 and len(node) % 2 == 0:
            try:
                raw = bytes.fromhex(node)
            except ValueError:
                return
            if raw[:2] == b"\x00\x01" and "key_package" not in key:
                messages.append(raw)
            elif "key_package" in key:
                packages.append(raw)

    for path in sorted(vectors.rglob("*.json")):
        walk(json.loads(path.read_text()))
    return messages[:400], packages[:200]


def mutate(rng: random.Random, seed: bytes, seeds: list[bytes]) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[pos % len(data)] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 2:
            del data[pos : pos + rng.randint(1, 16)]
        elif op == 3:
            del data[pos:]
        elif op == 4 and data:
            data[pos % len(data)] = rng.choice((0x00, 0xFF, 0x7F, 0x80, 0x40, 0x3F))
        else:
            other = rng.choice(seeds)
            data[pos:] = other[rng.randrange(len(other) + 1) :]
    return bytes(data)


def run(
    name: str,
    target: Callable[[bytes], None],
    seeds: list[bytes],
    seconds: float,
    rng: random.Random,
) -> dict[str, object]:
    def generate(rng: random.Random) -> bytes:
        if rng.random() < 0.95:
            return mutate(rng, rng.choice(seeds), seeds)
        return rng.randbytes(rng.randint(0, 256))

    def check(data: bytes) -> bool:
        target(data)
        return True

    return run_structured(fuzz_hostile.Target(name, generate, check), seconds, rng, strict=False)


def _show(data: Any) -> str:
    return data.hex() if isinstance(data, bytes) else repr(data)


def run_structured(
    target: fuzz_hostile.Target, seconds: float, rng: random.Random, strict: bool = True
) -> dict[str, object]:
    """Run ``target`` for ``seconds``.  ``strict``: refusals must be short too."""
    count = parsed = 0
    slowest, slowest_input = 0.0, None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(200):
            data = target.generate(rng)
            started = time.perf_counter()
            try:
                target.check(data)
                parsed += 1
            except RelayError as exc:
                if strict:
                    _finding(target.name, data, lambda exc=exc: fuzz_hostile.refusal_ok(exc))
            except Exception as exc:  # any other exception (or a Finding) is the finding
                _finding(target.name, data, exc)
            took = time.perf_counter() - started
            if took > slowest:
                slowest, slowest_input = took, data
            count += 1
    return {
        "target": target.name,
        "inputs": count,
        "parsed": parsed,
        "inputs_per_s": round(count / seconds),
        "slowest_ms": round(slowest * 1000, 2),
        "slowest_replayed_ms": _replay(target, slowest_input),
    }


def _finding(name: str, data: Any, exc: BaseException | Callable[[], None]) -> None:
    if callable(exc) and not isinstance(exc, BaseException):
        try:
            exc()
            return
        except Exception as raised:
            exc = raised
    print(json.dumps({"target": name, "crash": repr(exc)[:500], "input": _show(data)[:20000]}))
    raise SystemExit(1) from exc


def _replay(target: fuzz_hostile.Target, data: Any) -> float | None:
    """The slowest input again, alone, best of 5 (a wall-clock maximum over
    millions of inputs on a shared machine is mostly preemption and GC)."""
    if data is None:
        return None
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        with contextlib.suppress(Exception):
            target.check(data)
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 2)


MUTATIONAL = ("frames", "websocket", "mls-message", "key-package")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="per target")
    parser.add_argument("--seed", type=int, default=1)
    names = [*MUTATIONAL, *(t.name for t in fuzz_hostile.TARGETS)]
    parser.add_argument(
        "--targets", default=",".join(names), help=f"comma-separated, of: {', '.join(names)}"
    )
    args = parser.parse_args()
    chosen = args.targets.split(",")
    unknown = set(chosen) - set(names)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    rng = random.Random(args.seed)
    frames = _frame_seeds()
    messages, packages = _mls_seeds()
    mutational = {
        "frames": (frame_target, frames),
        "websocket": (ws_target, _ws_seeds(frames)),
        "mls-message": (mls_target, messages),
        "key-package": (kp_target, packages),
    }
    results = []
    for name in chosen:
        if name in mutational:
            target, seeds = mutational[name]
            results.append(run(name, target, seeds, args.seconds, rng))
        else:
            (structured,) = [t for t in fuzz_hostile.TARGETS if t.name == name]
            results.append(run_structured(structured, args.seconds, rng))
        print(json.dumps(results[-1]), flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "inputs": sum(int(str(r["inputs"])) for r in results),
                "peak_rss_mb": round(peak_mb, 1),
                "seeds_mls": len(messages),
                "seeds_key_packages": len(packages),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
