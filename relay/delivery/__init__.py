"""The delivery core: what every message goes through.

* :mod:`.committer` -- group commit: batches sends into one storage
  transaction, acknowledges only what is durably committed, splits a batch
  that fails on one item, and is supervised.
* :mod:`.hub` -- which connection watches which conversation on this node;
  hands each committed message to its subscribers.
* :mod:`.streams` -- one connection's subscriptions: the replay/live seam
  that gives every event once, in order.
* :mod:`.fanout` -- in-process fan-out (the cluster's Redis bus implements
  the same interface in :mod:`relay.cluster.redisbus`).
* :mod:`.outbox` -- a connection's byte-bounded send queue and the flusher
  that sends once per connection per batch.
* :mod:`.connection` -- the interface of one client connection (a
  WebSocket session or an SSE stream) that everything else depends on.

May use: :mod:`relay.base`, :mod:`storage`, :mod:`protocol`.
"""
