"""A terminal chat on mls-relay with the Python SDK (relay.client).

    mls-relay serve &                                   # embedded default, port 3000
    ALICE=$(mls-relay token did:example:alice --device laptop)
    BOB=$(mls-relay token did:example:bob --device phone)
    python examples/chat.py --token "$ALICE" --room demo --invite did:example:bob
    python examples/chat.py --token "$BOB" --room demo        # in another terminal

Lines typed are sent; messages from others are printed and acknowledged.
The relay only ever sees ciphertext: a real application encrypts with MLS
(RFC 9420) before send() and decrypts after receiving.  This demo sends the
text as-is, so do not use it for anything private.
"""

from __future__ import annotations

import argparse
import sys

import trio

from relay.client import Membership, Message, RelayClient, RequestFailed


async def chat(url: str, token: str, room: bytes, invite: list[str]) -> None:
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
    parser.add_argument("--token", required=True, help="from `mls-relay token <did>`")
    parser.add_argument("--room", default="demo")
    parser.add_argument("--invite", action="append", default=[], metavar="DID")
    args = parser.parse_args()
    trio.run(chat, args.url, args.token, args.room.encode(), args.invite)


if __name__ == "__main__":
    main()
