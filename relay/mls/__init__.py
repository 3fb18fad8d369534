"""The MLS delivery service (RFC 9420 / RFC 9750): KeyPackage upload, claim
and inventory, GroupInfo, and the checks on MLS messages a relay can make
without the group's secrets (:mod:`.service`). Its HTTP routes are in
:mod:`relay.edge.http.keypackages`.

May use: :mod:`relay.cluster.sharedlimits` (claim limits across nodes),
:mod:`relay.offline.blobs` (large sends go to the blob store),
:mod:`relay.base`, :mod:`storage`, :mod:`protocol`.
"""
