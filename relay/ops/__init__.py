"""Operating a node: metrics (:mod:`.metrics`), the status page
(:mod:`.status`), start-up checks (:mod:`.check`), the MLS inspector
(:mod:`.inspect`), graceful shutdown (:mod:`.shutdown`) and several worker
processes on one port (:mod:`.workers`). The command line is :mod:`relay.cli`.

Two layers (pyproject.toml's import-linter contract): :mod:`.metrics` and
:mod:`.status` are built by the node and so sit below it (the metrics may use
the delivery core, offline delivery, :mod:`relay.base`, :mod:`storage`; the
status pages the metrics too); :mod:`.shutdown`, :mod:`.check`,
:mod:`.inspect` and :mod:`.workers` sit above the node and may use every
part of it.
"""
