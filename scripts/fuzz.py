"""A longer mutational fuzz run of the decoders that face the network.

    .venv/bin/python scripts/fuzz.py --seconds 60

Targets: the frame decoder + request parser (protocol.frames/requests), the
WebSocket frame reader (protocol.websocket.ServerConnection) and the MLS
parser (protocol.mls).  Seeds are valid frames and every MLS object in
tests/vectors/ (shipped with the repository); each input is a seed mutated by byte flips, inserts,
deletions, truncations and splices.  The only acceptable outcome is a parse
or a typed RelayError: anything else is reported with the input (hex) and
the run fails.  Prints inputs per target, inputs/s, slowest input and the
peak RSS, as recorded in docs/FUZZING.md.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protocol import events  # noqa: E402
from protocol.errors import RelayError  # noqa: E402
from protocol.frames import decode_frame, encode_frame  # noqa: E402
from protocol.mls import parse_key_package, parse_mls_message  # noqa: E402
from protocol.requests import Limits, parse_request  # noqa: E402
from protocol.websocket import ServerConnection  # noqa: E402


def frame_target(data: bytes) -> None:
    parse_request(decode_frame(data), Limits())


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
    return [
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
        out.append(bytes((0x82, 0x80 | len(payload))) + mask + masked)
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
    count = parsed = 0
    slowest = 0.0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(200):
            data = (
                mutate(rng, rng.choice(seeds), seeds)
                if rng.random() < 0.95
                else rng.randbytes(rng.randint(0, 256))
            )
            started = time.perf_counter()
            try:
                target(data)
                parsed += 1
            except RelayError:
                pass
            except Exception as exc:  # any other exception is the finding
                print(json.dumps({"target": name, "crash": repr(exc), "input": data.hex()}))
                raise SystemExit(1) from exc
            slowest = max(slowest, time.perf_counter() - started)
            count += 1
    return {
        "target": name,
        "inputs": count,
        "parsed": parsed,
        "inputs_per_s": round(count / seconds),
        "slowest_ms": round(slowest * 1000, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="per target")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    frames = _frame_seeds()
    messages, packages = _mls_seeds()
    results = [
        run("frames", frame_target, frames, args.seconds, rng),
        run("websocket", ws_target, _ws_seeds(frames), args.seconds, rng),
        run("mls-message", mls_target, messages, args.seconds, rng),
        run("key-package", kp_target, packages, args.seconds, rng),
    ]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for r in results:
        print(json.dumps(r))
    print(
        json.dumps(
            {
                "peak_rss_mb": round(peak_mb, 1),
                "seeds_mls": len(messages),
                "seeds_key_packages": len(packages),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
