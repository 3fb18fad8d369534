"""Write (or check) tests/frames-corpus/frames.json: one example of every kind
of frame the relay sends, encoded by the relay's own encoders.

    .venv/bin/python scripts/frames_corpus.py          # regenerate
    .venv/bin/python scripts/frames_corpus.py --check  # exit 1 if stale

Kinds: every event (``#hello``, ``#message`` inline and blob, ``#ephemeral``,
``#read``, ``#membership``, ``#welcome``, ``#info`` CaughtUp / OutdatedCursor /
the SSE end reasons), ``#result`` replies (sends, MLS sends, nested results),
one ``#error`` reply per error class of protocol/errors.py (with the details
the relay attaches, with and without ``id``), and the ``op: -1`` frame.
tests/test_frames_corpus.py decodes every entry with Python ``atproto`` and
npm ``@atproto/xrpc-server`` and checks that a live relay session sends no
kind the corpus lacks.  Deterministic: the same code gives the same file.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protocol import errors, events  # noqa: E402

OUT = ROOT / "tests" / "frames-corpus" / "frames.json"
CONV = bytes.fromhex("c0ffee")
ALICE, BOB = "did:example:alice", "did:example:bob"
TIME = 1795810170000

#: Details the relay attaches to some errors (see where each is raised).
DETAILS: dict[str, dict[str, Any]] = {
    "FutureCursor": {"conversation": CONV, "last_seq": 41},
    "NotMember": {"conversation": CONV},
    "RateLimited": {"retry_after_ms": 250},
    "TooManyConnections": {"retry_after_ms": 1000},
    "InternalError": {"incident": "0123456789abcdef"},
    "StaleCommit": {"epoch": 3},
    "FutureEpoch": {"epoch": 3},
    "StaleEpoch": {"epoch": 3},
    "WrongGroup": {"epoch": 3},
    "EpochError": {"epoch": 3},
    "UnknownKeyPackage": {"ref": bytes(range(32))},
    "MalformedMLS": {"field": "mls_message.wire_format", "offset": 2},
    "UnsupportedMLS": {"field": "key_package.leaf_node.credential", "offset": 40},
    "InvalidMLS": {"field": "ciphertext", "check": "signature"},
    "CredentialMismatch": {"check": "credential", "field": "identity"},
}


def error_classes() -> list[type[errors.RelayError]]:
    found = [
        obj
        for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, errors.RelayError)
    ]
    return sorted(found, key=lambda c: c.__name__)


def entries() -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = [
        ("hello", events.hello(ALICE, "d1", "mls-relay/0.1.0", "0123456789abcdef", "node-1")),
        ("message", events.message(CONV, 42, ALICE, TIME, bytes.fromhex("deadbeef"))),
        (
            "message-blob",
            events.message(CONV, 43, ALICE, TIME, b"", "q5Lr0c4n3M2Xw9v1cT0fZx8A", 5000),
        ),
        ("ephemeral", events.ephemeral(CONV, ALICE, TIME, b"typing")),
        ("read", events.read(CONV, BOB, 42)),
        ("membership", events.membership(CONV, ALICE, [BOB], [], 42)),
        ("welcome", events.welcome(CONV, 44, 4, bytes.fromhex("00010003"))),
        ("info-CaughtUp", events.info("CaughtUp", "replay complete; live from here")),
        (
            "info-OutdatedCursor",
            events.info(
                "OutdatedCursor",
                "cursor is older than retained history",
                conversation=CONV,
                first_seq=10,
            ),
        ),
    ]
    for reason in ("ServiceRestart", "ConsumerTooSlow", "TokenExpired", "InternalError"):
        message = "stream closed; resume with Last-Event-ID"  # the SSE stream's last event
        out.append((f"info-{reason}", events.info(reason, message)))
    out += [
        ("result-send", events.send_result(7, 42, TIME)),
        ("result-send-mls", events.send_result(7, 42, TIME, epoch=4)),
        ("result-send-blob", events.send_result(7, 43, TIME, blob="q5Lr0c4n3M2Xw9v1cT0fZx8A")),
        ("result-empty", events.result(9)),
        ("result-create", events.result(1, members=[ALICE, BOB], seq=0)),
        ("result-subscribe", events.result(2, conversations=3)),
        (
            "result-list",
            events.result(
                3,
                conversations=[
                    {"conversation": CONV, "last_seq": 42, "joined_seq": 0, "first_seq": 1}
                ],
            ),
        ),
        (
            "result-list-page",  # a page with more after it: pass next as after
            events.result(
                4,
                conversations=[
                    {"conversation": CONV, "last_seq": 42, "joined_seq": 0, "first_seq": 1}
                ],
                next=CONV,
            ),
        ),
        (
            "result-claim",
            events.result(
                5,
                key_packages=[
                    {
                        "user": BOB,
                        "device": "b1",
                        "ref": bytes(32),
                        "key_package": bytes.fromhex("00010005"),
                        "last_resort": False,
                    }
                ],
                missing=[{"user": "did:example:carol", "device": None}],
            ),
        ),
    ]
    for cls in error_classes():
        exc = cls(f"example {cls.error}", **DETAILS.get(cls.error, {}))
        out.append((f"error-{cls.__name__}", events.error(exc, 7)))
    out.append(("error-without-id", events.error(errors.InvalidRequest("request needs an id"))))
    out.append(("fatal", events.fatal("ServiceRestart", "node shutting down")))
    return out


def render() -> str:
    items = [{"name": name, "hex": data.hex()} for name, data in entries()]
    return json.dumps(items, indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is stale: run scripts/frames_corpus.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {len(json.loads(text))} frames to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
