"""#listConversations in pages over a real relay, on both backends: the
order, ``next``, an old client that sends no ``limit``, and the page's cost
charged before it is read (issue 12)."""

from __future__ import annotations

import trio

from .harness import running_relay
from .relayclient import connect

ALICE = "did:example:alice"
N = 502  # more than one default page (500)


async def _own(r, n: int) -> list[bytes]:
    ids = [b"page-%04d" % i for i in range(n)]
    for i, conv in enumerate(ids):
        await r.relay.storage.create_conversation(conv, ALICE, [], i)
    return ids


async def test_pages_follow_next_in_id_order(database_url):
    with trio.fail_after(60):
        async with running_relay(database_url) as r:
            ids = await _own(r, N)
            async with connect(r.ws_url, ALICE, "a1") as c:
                first = await c.ok("#listConversations")  # an old client: no limit
                assert [x["conversation"] for x in first["conversations"]] == ids[:500]
                assert first["next"] == ids[499]
                rest = await c.ok("#listConversations", after=first["next"])
                assert [x["conversation"] for x in rest["conversations"]] == ids[500:]
                assert "next" not in rest
                seen, after = [], b""
                while True:
                    body = await c.ok("#listConversations", limit=200, after=after)
                    seen += [x["conversation"] for x in body["conversations"]]
                    if "next" not in body:
                        break
                    after = body["next"]
                assert seen == ids


async def test_a_page_is_charged_by_its_limit_before_it_is_read(tmp_path):
    """Burst 10: of three pipelined full pages (5 each) two get in, the third
    is refused before any is answered; a short page costs one (refunded)."""
    with trio.fail_after(60):
        async with running_relay(
            f"sqlite:///{tmp_path}/r.db", requests_per_connection=5, requests_per_user=1000
        ) as r:
            await _own(r, N)
            async with connect(r.ws_url, ALICE, "a1") as c:
                replies: list = []

                async def ask() -> None:
                    replies.append(await c.request("#listConversations"))

                async with trio.open_nursery() as nursery:
                    for _ in range(3):
                        nursery.start_soon(ask)
                assert sorted(x.ok for x in replies) == [False, True, True], replies
                assert [x.body["error"] for x in replies if not x.ok] == ["RateLimited"]
            async with connect(r.ws_url, ALICE, "a2") as c:
                # The last page (2 rows) is charged 5 and gives 4 back: five in a
                # row stay above the 5 a page needs (without the refund: two).
                tail = {"after": b"page-0499"}
                answered = [await c.request("#listConversations", **tail) for _ in range(5)]
                assert all(x.ok for x in answered), [x.body for x in answered if not x.ok]
