"""A terminal chat on mls-relay with the Python SDK (mls_relay_client).

    mls-relay serve &                                   # embedded default, port 3000
    python examples/chat.py --user did:example:alice --device laptop \
        --secret-file data/jwt-secret --room demo --invite did:example:bob
    python examples/chat.py --user did:example:bob --device phone \
        --secret-file data/jwt-secret --room demo          # in another terminal

Tokens are single-use (RELAY_TOKEN_SINGLE_USE, the default): each connection,
reconnects included, needs a fresh one, so the client is given a token
*provider*.  Here it mints development tokens with the relay's HS256 secret;
a real application asks its identity service.  ``--token "$(mls-relay token
did:example:alice)"`` also works, for one connection only (or with
RELAY_TOKEN_SINGLE_USE=0 on the relay).

Lines typed are sent; messages from others are printed and acknowledged.
The relay only ever sees ciphertext: a real application encrypts with MLS
(RFC 9420) before send() and decrypts after receiving.  This demo sends the
text as-is, so do not use it for anything private.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import jwt
import trio

from mls_relay_client import Membership, Message, RelayClient, RequestFailed


def token_minter(secret: str, user: str, device: str, audience: str) -> Callable[[], str]:
    """A provider of fresh development tokens (a new jti on every call)."""

    def mint() -> str:
        now = int(time.time())
        claims = {"sub": user, "aud": audience, "iat": now, "exp": now + 3600,
                  "jti": uuid.uuid4().hex, "device": device}  # fmt: skip
        return jwt.encode(claims, secret, algorithm="HS256")

    return mint


async def chat(url: str, token: str | Callable[[], str], room: bytes, invite: list[str]) -> None:
    async with RelayClient.connect(url, token) as client:
        me = client.hello["user"]
        try:
            await client.create_conversation(room, invite)
            print(f"* created {room.decode()} with {', '.join(invite) or 'nobody else'}")
        except RequestFailed as exc:
            if exc.error != "ConversationExists":
                raise
            if invite:
                await client.add_members(room, invite)

        async def read_stdin() -> None:
            while line := await trio.to_thread.run_sync(sys.stdin.readline):
                if line.strip():
                    # Sent again automatically (same client_message_id) after a reconnect.
                    await client.send(room, line.rstrip("\n").encode())
            nursery.cancel_scope.cancel()  # end of input: quit

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_stdin)
            async for event in client.events():
                if isinstance(event, Message) and event.conversation == room:
                    if event.sender != me:
                        print(f"<{event.sender}> {event.ciphertext.decode(errors='replace')}")
                    await client.ack(room, event.seq)
                elif isinstance(event, Membership) and event.conversation == room:
                    print(f"* {event.actor}: +{list(event.added)} -{list(event.removed)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:3000/v1/ws")
    parser.add_argument("--token", help="one token, from `mls-relay token <did>`")
    parser.add_argument("--user", help="your DID; tokens are minted with --secret-file")
    parser.add_argument("--device", default="dev1")
    parser.add_argument("--secret-file", help="the relay's HS256 secret (data/jwt-secret)")
    parser.add_argument("--audience", default="did:web:localhost", help="RELAY_SERVICE_ID")
    parser.add_argument("--room", default="demo")
    parser.add_argument("--invite", action="append", default=[], metavar="DID")
    args = parser.parse_args()
    token: str | Callable[[], str]
    if args.user and args.secret_file:
        secret = Path(args.secret_file).read_text().strip()
        token = token_minter(secret, args.user, args.device, args.audience)
    elif args.token:
        token = args.token
    else:
        parser.error("give --user and --secret-file (fresh tokens), or --token")
    trio.run(chat, args.url, token, args.room.encode(), args.invite)


if __name__ == "__main__":
    main()
