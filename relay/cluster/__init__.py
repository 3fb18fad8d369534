"""Several nodes as one service, through Redis.

* :mod:`.redisbus`, :mod:`.buswire` -- cross-node fan-out and its wire format.
* :mod:`.presence` -- connection leases: per-user limits and who is online.
* :mod:`.sharedlimits` -- rate limits shared by all nodes (Lua), with the
  same rules in process when there is no Redis.
* :mod:`.peers` -- nodes sharing their status.

May use: the delivery core, :mod:`relay.base`, :mod:`protocol`.
"""
