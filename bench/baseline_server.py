"""Baseline: a minimal broadcast server on trio-websocket, no persistence.

It speaks just enough of the relay protocol for the load generator: the
``#hello`` frame, ``#createConversation``, ``#subscribe`` and ``#send``
(answered with ``#result`` after the ``#message`` event was written to every
other subscribed member).  It is the "obvious" Trio implementation: one task
per connection, ``await ws.send_message()`` per recipient, the event encoded
once per message.  Used by ``bench/run.py`` to turn absolute numbers from a
noisy, shared 2-core machine into ratios.

Run: ``python -m bench.baseline_server --port 4000`` (listens on 127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import io
import time
from typing import Any

import cbor2
import jwt
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from .loadgen import AUDIENCE, SECRET, raise_nofile

LOOPBACK = "127.0.0.1"


def _header(t: str | None, op: int = 1) -> bytes:
    return cbor2.dumps({"op": op} if op == -1 else {"t": t, "op": op})


MESSAGE = _header("#message")
RESULT = _header("#result")
HELLO = _header("#hello")
ERROR = _header("#error")  # request errors are #error frames, as the relay sends them


class Broadcast:
    def __init__(self) -> None:
        self.members: dict[bytes, list[str]] = {}
        self.seqs: dict[bytes, int] = {}
        self.live: dict[str, WebSocketConnection] = {}
        self.subscribed: set[str] = set()
        self.delivered = 0

    async def handle(self, request: WebSocketRequest) -> None:
        token = b""
        for key, value in request.headers:
            if key.lower() == b"authorization" and value.startswith(b"Bearer "):
                token = value[7:]
        try:
            claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience=AUDIENCE)
        except jwt.PyJWTError:
            await request.reject(401)
            return
        user = str(claims["sub"])
        ws = await request.accept()
        self.live[user] = ws
        try:
            await ws.send_message(
                HELLO + cbor2.dumps({"user": user, "device": claims.get("device", "")})
            )
            while True:
                data = await ws.get_message()
                if isinstance(data, bytes):
                    await self.on_frame(ws, user, data)
        except ConnectionClosed:
            pass
        finally:
            if self.live.get(user) is ws:
                del self.live[user]
                self.subscribed.discard(user)

    async def on_frame(self, ws: WebSocketConnection, user: str, data: bytes) -> None:
        stream = io.BytesIO(data)
        dec = cbor2.CBORDecoder(stream)
        header: dict[str, Any] = dec.decode()
        body: dict[str, Any] = dec.decode()
        t = header.get("t")
        rid = body.get("id")
        if t == "#send":
            conv = body["conversation"]
            members = self.members.get(conv)
            if members is None or user not in members:
                await ws.send_message(ERROR + cbor2.dumps({"error": "NotMember", "id": rid}))
                return
            seq = self.seqs[conv] = self.seqs[conv] + 1
            now = int(time.time() * 1000)
            event = MESSAGE + cbor2.dumps(
                {
                    "seq": seq,
                    "time": now,
                    "sender": user,
                    "ciphertext": body["ciphertext"],
                    "conversation": conv,
                }
            )
            for member in members:
                if member == user or member not in self.subscribed:
                    continue
                peer = self.live.get(member)
                if peer is not None:
                    try:
                        await peer.send_message(event)
                        self.delivered += 1
                    except ConnectionClosed:
                        pass
            await ws.send_message(RESULT + cbor2.dumps({"id": rid, "seq": seq, "time": now}))
        elif t == "#createConversation":
            conv = body["conversation"]
            self.members[conv] = list(dict.fromkeys([user, *body.get("members", [])]))
            self.seqs[conv] = 0
            await ws.send_message(
                RESULT + cbor2.dumps({"id": rid, "seq": 0, "members": self.members[conv]})
            )
        elif t == "#subscribe":
            self.subscribed.add(user)
            await ws.send_message(RESULT + cbor2.dumps({"id": rid}))
        else:
            await ws.send_message(
                ERROR + cbor2.dumps({"error": "InvalidRequest", "message": str(t), "id": rid})
            )


async def serve(port: int) -> None:
    app = Broadcast()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_websocket, app.handle, LOOPBACK, port, None)
        print(f"listening {port}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    raise_nofile()
    trio.run(serve, args.port)


if __name__ == "__main__":
    main()
