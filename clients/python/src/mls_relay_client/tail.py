"""``mls-relay tail`` / ``mls-relay-tail``: print a device's events as JSON lines.

Connects with a token (``--token`` or ``RELAY_TOKEN``), subscribes from the
device's stored cursor and prints every event as it arrives: one JSON object
per line, ``type`` plus the event's fields, byte strings hex-encoded.  It
never acknowledges unless ``--ack`` is given, so tailing a device does not
move the cursor its real client resumes from.  Uses the SDK, so it survives
relay restarts the same way an application does.

The server's CLI (``mls-relay tail``) calls :func:`add_arguments` and
:func:`main` with its configured port and path; ``mls-relay-tail`` (this
distribution's script, :func:`run`) reads ``PORT`` and defaults to ``/v1/ws``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

import trio

from .client import Message, RelayClient, RequestFailed

#: The relay's default WebSocket path (docs/PROTOCOL.md), for mls-relay-tail.
DEFAULT_WS_PATH = "/v1/ws"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="WebSocket URL (default ws://127.0.0.1:$PORT/v1/ws)")
    parser.add_argument("--token", help="bearer token (default $RELAY_TOKEN)")
    parser.add_argument("--ack", action="store_true", help="acknowledge each message printed")
    parser.add_argument("--count", type=int, default=0, help="exit after N messages")


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def event_line(event: Any) -> str:
    body = {"type": type(event).__name__.lower(), **dataclasses.asdict(event)}
    if isinstance(event, Message) and not event.blob:
        del body["blob"], body["size"]  # inline ciphertext: lines as before blobs existed
    return json.dumps(_jsonable(body), sort_keys=False)


async def tail(url: str, token: str, *, ack: bool, count: int) -> None:
    async with RelayClient.connect(url, token) as client:
        print(json.dumps({"type": "connected", **_jsonable(client.hello)}), flush=True)
        seen = 0
        async for event in client.events():
            print(event_line(event), flush=True)
            if isinstance(event, Message):
                seen += 1
                if ack:
                    await client.ack(event.conversation, event.seq)
                if count and seen >= count:
                    return


def main(args: argparse.Namespace, port: int, ws_path: str) -> int:
    token = args.token or os.environ.get("RELAY_TOKEN", "")
    if not token:
        print("mls-relay tail: needs --token or RELAY_TOKEN", file=sys.stderr)
        return 2
    url = args.url or f"ws://127.0.0.1:{port}{ws_path}"
    try:
        trio.run(lambda: tail(url, token, ack=args.ack, count=args.count))
    except RequestFailed as exc:
        print(f"mls-relay tail: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def run(argv: list[str] | None = None) -> int:
    """``mls-relay-tail``: the same command without the server installed."""
    parser = argparse.ArgumentParser(
        prog="mls-relay-tail", description="print a device's events as JSON lines (debugging)"
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        port = int(os.environ.get("PORT", "3000"))
    except ValueError:
        port = 3000
    return main(args, port, DEFAULT_WS_PATH)
