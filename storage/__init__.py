"""Storage backends behind one contract (:mod:`storage.base`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from storage.base import (
    AddedMember,
    Appended,
    ConversationInfo,
    NewMessage,
    Storage,
    StoredMessage,
)

if TYPE_CHECKING:
    from storage.pgconn import PgTimeouts

__all__ = [
    "AddedMember",
    "Appended",
    "ConversationInfo",
    "NewMessage",
    "Storage",
    "StoredMessage",
    "open_storage",
]

_SQLITE_PREFIX = "sqlite:///"


def open_storage(
    url: str, *, pool_min: int = 2, pool_max: int = 10, pg_timeouts: PgTimeouts | None = None
) -> Storage:
    """Build the backend for ``url``; nothing connects until first use.

    * ``postgresql://…`` / ``postgres://…``: a libpq URL (``connect_timeout``
      in its query string overrides the 3 s default).
    * ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``
      (SQLAlchemy style: the path is everything after ``sqlite:///``).
      ``pool_max`` bounds the reader connections; there is one writer.

    ``pg_timeouts`` bounds every PostgreSQL job (storage/pgconn.py; default
    ``PgTimeouts()``); SQLite is a local file and needs none.

    Call ``await storage.migrate()`` before use.
    """
    if url.startswith(("postgresql://", "postgres://")):
        from storage.postgres import PostgresStorage

        return PostgresStorage(url, pool_min=pool_min, pool_max=pool_max, timeouts=pg_timeouts)
    if url.startswith(_SQLITE_PREFIX):
        from storage.sqlite import SqliteStorage

        return SqliteStorage(url[len(_SQLITE_PREFIX) :], readers=max(1, pool_max))
    raise ValueError(f"unsupported storage URL scheme: {url.split(':', 1)[0]!r}")
