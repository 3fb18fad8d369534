"""The edge: everything that faces a client's socket.

* :mod:`.gate` -- connection caps per address and per node, the accept loop.
* :mod:`.connrate` -- new connections per address per second.
* :mod:`.server` -- reads each request head; WebSocket upgrades stay on the
  relay's own hot path, everything else goes to the HTTP app.
* :mod:`.auth` -- bearer tokens (HS256 / JWKS) and their claims.
* :mod:`.parts` -- what sessions, SSE streams and the upgrade use of the node.
* :mod:`.session` -- one WebSocket connection (:mod:`.liveness`: its read
  pauses and liveness checks); :mod:`.reader` reads all of a
  node's sockets from one task; :mod:`.handlers` answers requests;
  :mod:`.registry` holds the node's sessions by device (displacement, the
  heartbeat and token-expiry sweep).
* :mod:`.sse` -- the Server-Sent Events stream (the same events over HTTP).
* :mod:`.http` -- the HTTP app: bodies, per-user limits and the routes.

May use: the delivery core, the MLS service, offline delivery, the
cluster, the metrics (:mod:`relay.ops.metrics`), :mod:`relay.base`,
:mod:`storage`, :mod:`protocol`.
"""
