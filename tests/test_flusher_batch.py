"""One flush per committed batch (relay/delivery/outbox.py, ``Flusher.batch``):
the committer wraps the fan-out and the senders' #result in one batch, so a
``flush()`` asked for inside it (the hub asks after every publish) waits for
the batch's end, and each connection gets everything in one ``send``."""

from __future__ import annotations

import socket

import pytest

from relay.delivery.outbox import Flusher, Outbox

pytestmark = pytest.mark.timeout(10)


def _received(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except BlockingIOError:
        pass
    return data


def test_a_flush_inside_a_batch_waits_for_its_end() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        theirs.setblocking(False)
        flusher = Flusher()
        outbox = Outbox(ours.fileno(), flusher, 1 << 16)
        with flusher.batch():
            outbox.write(b"message;")
            flusher.flush()  # what Hub.publish does
            with flusher.batch():  # nested: still the outer batch's flush
                outbox.write(b"membership;")
                flusher.flush()
            assert _received(theirs) == b""
            outbox.write(b"result")
        # One write, in the order the frames were queued.
        assert _received(theirs) == b"message;membership;result"
        outbox.write(b"later")
        flusher.flush()  # outside a batch: at once
        assert _received(theirs) == b"later"


def test_a_batch_that_raises_still_flushes() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        theirs.setblocking(False)
        flusher = Flusher()
        outbox = Outbox(ours.fileno(), flusher, 1 << 16)
        try:
            with flusher.batch():
                outbox.write(b"answered")
                raise RuntimeError("a bug after answering")
        except RuntimeError:
            pass
        assert _received(theirs) == b"answered"
        flusher.flush()
        assert _received(theirs) == b""
