"""Run by tests/test_client_standalone.py with the python of a venv that holds
only mls-relay-client and its declared dependencies (not under pytest, not with
the server's venv): reports which modules are importable, then has two devices
connect, create a conversation, send, receive and acknowledge with the SDK.

Usage: python -I client_standalone_run.py WS_URL ALICE_TOKEN BOB_TOKEN
Prints one JSON object on stdout.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
from typing import Any

import trio

from mls_relay_client import Message, RelayClient

#: Modules of the server and its dependencies: none may be importable here.
SERVER_MODULES = (
    "relay",
    "storage",
    "protocol",
    "migrations",
    "psycopg",
    "hypercorn",
    "quart",
    "quart_trio",
    "coredis",
    "prometheus_client",
    "jwt",
    "structlog",
    "httpx",
)
BOB = "did:example:bob"
CONV = b"standalone-room"


async def exchange(url: str, alice_token: str, bob_token: str) -> dict[str, Any]:
    with trio.fail_after(60):
        async with RelayClient.connect(url, alice_token) as alice:
            members = await alice.create_conversation(CONV, [BOB])
            async with RelayClient.connect(url, bob_token) as bob:
                seq = await alice.send(CONV, b"sent by a standalone client")
                async for event in bob.events():
                    if isinstance(event, Message) and event.conversation == CONV:
                        return {
                            "members": members,
                            "sent_seq": seq,
                            "received": [event.seq, event.sender, event.ciphertext.decode()],
                            "acked": await bob.ack(CONV, event.seq),
                            "hello": {k: bob.hello[k] for k in ("user", "device")},
                        }
    raise AssertionError("bob's event stream ended before the message came")


def main() -> None:
    url, alice_token, bob_token = sys.argv[1:4]
    report: dict[str, Any] = {
        "importable": [m for m in SERVER_MODULES if importlib.util.find_spec(m) is not None],
        "distributions": sorted(
            d.metadata["Name"].lower() for d in importlib.metadata.distributions()
        ),
        "client_file": importlib.util.find_spec("mls_relay_client").origin,  # type: ignore[union-attr]
    }
    report.update(trio.run(exchange, url, alice_token, bob_token))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
