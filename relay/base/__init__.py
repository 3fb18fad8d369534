"""The foundation every part of the node uses: settings (:mod:`.config`),
logging (:mod:`.logs`), incident ids for unexpected errors (:mod:`.incidents`)
and the token buckets of per-connection and per-user rate limits
(:mod:`.ratelimits`).

May use: :mod:`protocol` and the standard library. Nothing else of ``relay``.
"""
