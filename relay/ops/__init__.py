"""Operating a node: metrics (:mod:`.metrics`), the status page
(:mod:`.status`), start-up checks (:mod:`.check`), the MLS inspector
(:mod:`.inspect`), graceful shutdown (:mod:`.shutdown`) and several worker
processes on one port (:mod:`.workers`). The command line is :mod:`relay.cli`.

May use every other part of the node.
"""
