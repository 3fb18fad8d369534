"""The node's session registry (relay/edge/registry.py): one connection per
device on a node, the newer one stays; the older one's end does not
unregister the newer one."""

from __future__ import annotations

import pytest
import trio

from protocol.closecodes import CloseCode

from .harness import running_relay
from .relayclient import connect

BOB = "did:example:bob"


@pytest.mark.timeout(30)
async def test_same_device_again_on_one_node_displaces_the_older(database_url):
    with trio.fail_after(20):
        async with running_relay(database_url) as r:
            registry = r.relay.registry
            async with connect(r.ws_url, BOB, "phone") as old:
                assert registry.sessions[(BOB, "phone")].id == old.hello["session"]
                async with connect(r.ws_url, BOB, "phone") as new:
                    await old.closed.wait()
                    assert old.close_code == CloseCode.REPLACED
                    # The older session has ended (forgotten): the newer stays registered.
                    assert registry.sessions[(BOB, "phone")].id == new.hello["session"]
                    await new.ok("#listConversations")
                    assert len(registry.sessions) == 1
            with trio.fail_after(5):
                await registry.all_closed()
            assert registry.sessions == {}
