"""The foundation every part of the node uses: settings (:mod:`.config`) and
the parsers of list-valued ones (:mod:`.parsing`), logging (:mod:`.logs`),
incident ids for unexpected errors (:mod:`.incidents`) and the token buckets
of per-connection and per-user rate limits (:mod:`.ratelimits`).

May use: :mod:`protocol`, the standard library and httpx's URL parser (push
provider URLs). Nothing else of ``relay``.
"""
