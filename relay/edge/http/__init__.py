"""The HTTP surface on the relay's port (Quart on Hypercorn).

* :mod:`.frontend` -- the app, health and readiness, and the hand-off from
  the relay's own request-head reader to Hypercorn.
* :mod:`.body` -- bodies read as a bounded stream, never whole.
* :mod:`.limits` -- per-user concurrent requests and transfers.
* :mod:`.keypackages`, :mod:`.blobs` -- the MLS and blob routes.

May use what :mod:`relay.edge` may use.
"""
