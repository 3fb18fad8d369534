"""Typed configuration from the environment, validated at start.

Names: ``PORT``, ``DATABASE_URL``, ``REDIS_URL`` (the usual platform names)
and everything else under the ``RELAY_`` prefix.  With nothing set, the relay
runs the embedded default: SQLite in ``./data``, in-process fan-out, port 3000,
and a random HS256 secret generated once into the data directory (0600) so
that ``mls-relay token`` can mint development tokens.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from protocol.errors import ConfigError
from relay.base.parsing import parse_networks, parse_providers

if TYPE_CHECKING:
    from storage.pgconn import PgTimeouts

#: Secrets published in deployment notes; never accepted outside dev mode.
WELL_KNOWN_SECRETS = frozenset(
    {
        "test_secret_for_local_development_only_change_in_production",
        "secret",
        "changeme",
        "change-me",
        "your-secret-key",
        # The deployment note of the service we replace (shared/LESSONS.md).
        "catbird_secure_password_change_in_production",
        "redis_secure_password_change_in_production",
    }
)


@dataclass(frozen=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 3000
    data_dir: str = "data"
    database_url: str = ""
    redis_url: str = ""
    service_id: str = "did:web:localhost"
    jwt_secret: str = ""
    jwks_file: str = ""
    device_claim: str = "device"
    max_token_lifetime_s: int = 86400
    dev_mode: bool = False
    node_id: str = ""
    pool_min: int = 2
    pool_max: int = 10
    max_frame: int = 1024 * 1024
    max_ciphertext: int = 256 * 1024
    outbox_limit: int = 4 * 1024 * 1024
    max_in_flight: int = 64
    commit_batch: int = 512
    #: Sends the commit queue holds (relay/delivery/committer.py): from half of it the
    #: node stops reading sockets, and a send that finds it full waits in its
    #: session.
    commit_queue: int = 4096
    #: A batch waits up to this long after its first send for more sends to
    #: join it (relay/delivery/committer.py).  0 commits at once.
    commit_linger_ms: float = 2.0
    handshake_timeout_s: float = 10.0
    shutdown_deadline_s: float = 30.0
    #: After SIGTERM the port keeps answering this long (readiness 503, upgrades
    #: and new SSE streams 503 ShuttingDown) so load balancers see the drain
    #: before connections are refused; within RELAY_SHUTDOWN_DEADLINE_S.
    drain_grace_s: float = 5.0
    memory_limit_mb: int = 0
    ws_path: str = "/v1/ws"
    #: The relay pings every connection this often; one that sends nothing
    #: (not even a pong) for two intervals is closed as dead.
    ping_interval_s: float = 30.0
    #: 0 disables.  Connections per user hold across the nodes sharing a Redis
    #: (relay/cluster/presence.py); request rates are per node (relay/base/ratelimits.py).
    connections_per_user: int = 20
    requests_per_connection: float = 200.0
    requests_per_user: float = 400.0
    #: RateLimited refusals a WebSocket may collect (refilled at that many per
    #: minute) before it is closed with 1008 RateLimitIgnored; 0: never.
    rate_limit_strikes: int = 100
    log_level: str = "INFO"
    secret_source: str = field(default="env", compare=False)
    #: "json" (one object per line, the default) or "console" (local reading).
    log_format: str = "json"
    #: Seconds between keep-alive comments on idle /v1/events streams.
    sse_keepalive_s: float = 15.0
    #: A node's connection leases in Redis expire this long after its last
    #: refresh: how long a crashed node's connections still count.
    presence_lease_ttl_s: float = 30.0
    #: Prefix of every Redis key and channel (several deployments, or tests, share a Redis).
    redis_prefix: str = "mls-relay:"
    #: Processes serving the port (``serve --workers``); more than one needs REDIS_URL.
    workers: int = 1

    # --- MLS delivery service (relay/mls/service.py, relay/edge/http/keypackages.py) ---
    #: Application messages are accepted for the current epoch and this many before it.
    epoch_window: int = 2
    #: Longest accepted KeyPackage lifetime (not_after - not_before), seconds.
    keypackage_max_lifetime_s: int = 366 * 86400  # mls-rs: 1 year
    #: Accept "eternal" lifetimes (not_after = 2^64-1) despite the maximum above.
    keypackage_allow_eternal: bool = True
    keypackage_clock_skew_s: int = 300
    #: Most KeyPackages in one upload.
    keypackage_max_upload: int = 200
    #: Claims per minute, per claimer and per target user (across nodes with
    #: Redis, relay/cluster/sharedlimits.py; per process without).
    claim_rate_per_min: int = 60
    claim_target_rate_per_min: int = 30

    # --- retention and single-use tokens (relay/offline/retention.py) ---
    #: Prune messages older than this many days (0: keep everything).  What a
    #: group still needs is never pruned (storage/retention_sql.py).
    retention_days: float = 0.0
    #: Seconds between retention runs (each also purges expired used-token ids).
    retention_interval_s: float = 3600.0
    #: A token's jti opens one WebSocket / SSE stream, once, across all nodes.
    token_single_use: bool = True

    # --- offline devices and large payloads (relay/offline/blobs.py, relay/offline/push.py) ---
    #: Where blobs live: "" (a directory under data_dir), file:///path, or
    #: s3://bucket/prefix?endpoint=https://...&region=... (keys from AWS_* env).
    blob_url: str = ""
    #: Storage model of new conversations unless #createConversation names one:
    #: "inline" (ciphertext in the database) or "blob".
    storage_model: str = "inline"
    #: Blob-model conversations: ciphertext longer than this is stored out of line.
    blob_threshold: int = 64 * 1024
    #: Largest blob accepted over HTTP.
    max_blob: int = 64 * 1024 * 1024
    #: An uploaded blob no message references is deleted after this long.
    blob_orphan_ttl_s: float = 3600.0
    #: Push providers: "name=https://host/path,other=..."; empty disables push.
    push_providers: str = ""
    #: HMAC-SHA256 key signing each webhook body (X-Relay-Signature); optional.
    push_secret: str = ""
    #: Devices waiting for a push (coalesced per device); beyond it pushes are dropped.
    push_queue: int = 10000
    #: Seconds between flushes of delivered positions (delivery state) to storage.
    delivery_flush_s: float = 1.0

    # --- the HTTP edge: connection and concurrency caps (relay/edge/gate.py, http/limits.py) ---
    #: Open connections (WebSockets, SSE, HTTP, handshakes in progress) per
    #: source address on this node; beyond it 429 TooManyConnectionsFromAddress.  0 disables.
    connections_per_address: int = 256
    #: Open connections on this node; beyond it 503 NodeBusy.  0: automatic,
    #: the file-descriptor limit (raised to its hard limit at start) less a
    #: reserve for the database, Redis, the blob store and files.  Always
    #: clamped below that limit.
    max_connections: int = 0
    #: Addresses or networks (comma-separated, e.g. "10.0.0.0/8,::1") of
    #: reverse proxies whose X-Forwarded-For names the client; empty: none
    #: (every peer is the client, X-Forwarded-For is ignored).
    trusted_proxies: str = ""
    #: Authenticated HTTP requests in progress per user on this node; 0 disables.
    http_requests_per_user: int = 8
    #: Blob uploads and downloads in progress per user, and on this node; 0 disables.
    transfers_per_user: int = 4
    transfers: int = 64
    #: New connections per second from one source address (a token bucket
    #: with this burst; IPv6 by /64, trusted proxies by X-Forwarded-For);
    #: beyond it 429 TooManyConnectionAttempts at accept.  0 disables.
    connect_rate_per_address: float = 20.0
    connect_burst_per_address: int = 40

    # --- storage quotas (storage/quotas.py; docs/OPERATIONS.md "Quotas"); 0 disables each ---
    #: Unclaimed KeyPackages one device may keep stored.
    max_keypackages_per_device: int = 1000
    #: Devices of one user that may upload KeyPackages (those that ever did:
    #: every claim for the user hands out or reports one per device).
    max_keypackage_devices_per_user: int = 100
    #: Bytes of blobs one user may keep stored (every blob it uploaded, or the
    #: relay stored for its sends, until collected).
    blob_quota_bytes: int = 1024**3
    #: Conversations one user created that still exist, plus those it deleted
    #: in the last 24 hours (deleted ids are kept for ever).
    max_conversations_per_user: int = 10000
    #: Members of one conversation (the Rust delivery service's bound).
    max_members: int = 1000

    # --- PostgreSQL bounds (storage/pgconn.py; docs/OPERATIONS.md "Database timeouts") ---
    #: Server-side statement_timeout and idle_in_transaction_session_timeout (0: none).
    db_statement_timeout_s: float = 10.0
    #: TCP keepalives and TCP_USER_TIMEOUT on both ends of each connection (0: none).
    db_tcp_timeout_s: float = 10.0
    #: A database job not done by then is abandoned: Unavailable (retryable) to
    #: its callers, its connection killed so the statement never runs later.
    db_deadline_s: float = 15.0

    @property
    def pg_timeouts(self) -> PgTimeouts:
        from storage.pgconn import PgTimeouts

        return PgTimeouts(
            statement_s=self.db_statement_timeout_s,
            tcp_s=self.db_tcp_timeout_s,
            deadline_s=self.db_deadline_s,
        )

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{Path(self.data_dir).resolve() / 'relay.db'}"


_ENV_NAMES = {"port": "PORT", "database_url": "DATABASE_URL", "redis_url": "REDIS_URL"}


def _env_name(name: str) -> str:
    return _ENV_NAMES.get(name, "RELAY_" + name.upper())


def _convert(name: str, kind: str, raw: str) -> object:
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
    except ValueError:
        raise ConfigError(f"{_env_name(name)}={raw!r} is not a valid {kind}") from None
    return raw


def from_env(env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the configuration; raises ConfigError with a clear message."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    for f in fields(Config):
        if f.name == "secret_source":
            continue
        raw = env.get(_env_name(f.name))
        if raw is not None:
            values[f.name] = _convert(f.name, str(f.type), raw)
    cfg = Config(**values)  # type: ignore[arg-type]
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    if not 0 < cfg.port < 65536 and cfg.port != 0:
        raise ConfigError(f"PORT must be 1..65535, got {cfg.port}")
    if cfg.pool_min < 0 or cfg.pool_max < max(1, cfg.pool_min):
        raise ConfigError("RELAY_POOL_MAX must be >= max(1, RELAY_POOL_MIN)")
    if cfg.max_ciphertext > cfg.max_frame:
        raise ConfigError("RELAY_MAX_CIPHERTEXT must not exceed RELAY_MAX_FRAME")
    if cfg.jwt_secret and not cfg.dev_mode:
        if _is_placeholder(cfg.jwt_secret):
            raise ConfigError(
                "RELAY_JWT_SECRET is a well-known placeholder; set a random secret "
                "(or RELAY_DEV_MODE=1 for local development)"
            )
        if len(cfg.jwt_secret.encode()) < 32:
            raise ConfigError("RELAY_JWT_SECRET must be at least 32 bytes")
    if cfg.rate_limit_strikes < 0:
        raise ConfigError("RELAY_RATE_LIMIT_STRIKES must be >= 0")
    if cfg.shutdown_deadline_s <= 0:
        raise ConfigError("RELAY_SHUTDOWN_DEADLINE_S must be > 0")
    if not 0 <= cfg.drain_grace_s <= cfg.shutdown_deadline_s:
        raise ConfigError("RELAY_DRAIN_GRACE_S must be 0..RELAY_SHUTDOWN_DEADLINE_S")
    if cfg.retention_days < 0 or cfg.retention_interval_s <= 0:
        raise ConfigError("RELAY_RETENTION_DAYS must be >= 0, RELAY_RETENTION_INTERVAL_S > 0")
    for name, url in (("DATABASE_URL", cfg.database_url), ("REDIS_URL", cfg.redis_url)):
        if not cfg.dev_mode and _is_placeholder(_url_password(url)):
            raise ConfigError(
                f"{name} uses a well-known placeholder password; set a random one "
                "(or RELAY_DEV_MODE=1 for local development)"
            )
    db = cfg.database_url
    if db and not db.startswith(("postgresql://", "postgres://", "sqlite:///")):
        raise ConfigError("DATABASE_URL must start with postgresql:// or sqlite:///")
    if cfg.storage_model not in ("inline", "blob"):
        raise ConfigError("RELAY_STORAGE_MODEL must be inline or blob")
    if cfg.blob_threshold < 0 or cfg.max_blob < 1:
        raise ConfigError("RELAY_BLOB_THRESHOLD must be >= 0 and RELAY_MAX_BLOB >= 1")
    if cfg.push_providers:
        try:
            parse_providers(cfg.push_providers)
        except ValueError as exc:
            raise ConfigError(f"RELAY_PUSH_PROVIDERS: {exc}") from None
    for name in (
        "connections_per_address",
        "max_connections",
        "http_requests_per_user",
        "transfers_per_user",
        "transfers",
        "connect_burst_per_address",
        "max_keypackages_per_device",
        "max_keypackage_devices_per_user",
        "blob_quota_bytes",
        "max_conversations_per_user",
        "max_members",
    ):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{_env_name(name)} must be >= 0 (0 disables)")
    if cfg.connect_rate_per_address < 0:
        raise ConfigError("RELAY_CONNECT_RATE_PER_ADDRESS must be >= 0 (0 disables)")
    if cfg.connect_rate_per_address and cfg.connect_burst_per_address < 1:
        raise ConfigError("RELAY_CONNECT_BURST_PER_ADDRESS must be >= 1 with a connect rate")
    if cfg.trusted_proxies:
        try:
            parse_networks(cfg.trusted_proxies)
        except ValueError as exc:
            raise ConfigError(f"RELAY_TRUSTED_PROXIES: {exc}") from None
    if cfg.commit_batch < 1 or cfg.commit_queue < 2:
        raise ConfigError("RELAY_COMMIT_BATCH must be >= 1 and RELAY_COMMIT_QUEUE >= 2")
    _validate_db_bounds(cfg)
    if cfg.workers < 1:
        raise ConfigError(f"RELAY_WORKERS must be >= 1, got {cfg.workers}")
    if cfg.workers > 1 and not cfg.redis_url:
        raise ConfigError(
            "RELAY_WORKERS / --workers > 1 needs REDIS_URL: worker processes fan out "
            "to each other through Redis"
        )
    if cfg.workers > 1 and not db.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            "RELAY_WORKERS / --workers > 1 needs a PostgreSQL DATABASE_URL: the embedded "
            "SQLite database is for one process"
        )


def _validate_db_bounds(cfg: Config) -> None:
    if cfg.db_statement_timeout_s < 0 or cfg.db_tcp_timeout_s < 0:
        raise ConfigError("RELAY_DB_STATEMENT_TIMEOUT_S and RELAY_DB_TCP_TIMEOUT_S must be >= 0")
    if not cfg.db_deadline_s > 0:
        raise ConfigError("RELAY_DB_DEADLINE_S must be > 0: every database job needs a deadline")
    if cfg.db_deadline_s < cfg.db_statement_timeout_s:
        # The server's timeout should end a slow statement cleanly first; the
        # deadline is for silence, and it kills the connection.
        raise ConfigError("RELAY_DB_DEADLINE_S must be >= RELAY_DB_STATEMENT_TIMEOUT_S")


def _is_placeholder(secret: str) -> bool:
    return bool(secret) and (secret in WELL_KNOWN_SECRETS or "change" in secret.lower())


def _url_password(url: str) -> str:
    """The password of ``scheme://user:password@host/...`` ('' when none)."""
    creds, at, _ = url.partition("://")[2].rpartition("@")
    return creds.partition(":")[2] if at else ""


def with_dev_secret(cfg: Config) -> Config:
    """Embedded default: no secret and no JWKS configured → a per-install
    random secret kept in the data directory (never a well-known one)."""
    if cfg.jwt_secret or cfg.jwks_file:
        return cfg
    path = Path(cfg.data_dir) / "jwt-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
    return replace(cfg, jwt_secret=path.read_text().strip(), secret_source=str(path))


def redacted(cfg: Config) -> dict[str, object]:
    """The effective configuration with secrets and passwords hidden."""
    out: dict[str, object] = {}
    for f in fields(Config):
        value = getattr(cfg, f.name)
        if f.name in ("jwt_secret", "push_secret") and value:
            value = "<redacted>"
        elif f.name in ("database_url", "redis_url") and value:
            value = _redact_url(str(value))
        elif f.name == "blob_url" and value:
            value = re.sub(r"(secret_key=)[^&]*", r"\1<redacted>", str(value))
        out[_env_name(f.name)] = value
    return out


def _redact_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:<redacted>@{host}"
