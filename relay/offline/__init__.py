"""Offline delivery: what serves devices that are not connected.

* :mod:`.push` -- content-free wake-up pushes through providers' webhooks.
* :mod:`.blobs` -- out-of-line ciphertext: registration, store and collector
  (its HTTP routes are in :mod:`relay.edge.http.blobs`).
* :mod:`.delivery_state` -- which device has received and read what.
* :mod:`.retention` -- pruning old messages and used token ids.

May use: the delivery core, :mod:`relay.base`, :mod:`storage`, :mod:`protocol`;
not the cluster (the pusher asks who is online through a callable).
"""
