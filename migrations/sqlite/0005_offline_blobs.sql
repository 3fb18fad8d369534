-- Offline devices and large payloads (SQLite).  Mirrors migrations/postgresql/0005_offline_blobs.sql.
-- registrations, blob storage (relay/delivery.py, relay/push.py, relay/blobs.py).

-- How a conversation keeps ciphertext: 'inline' (in messages) or 'blob' (large
-- ciphertext in the blob store, the message holding its key).  Set at creation.
ALTER TABLE conversations ADD COLUMN storage_model TEXT NOT NULL DEFAULT 'inline';

-- A message whose ciphertext lives in the blob store: ciphertext is empty and
-- these name the blob.  Added in the append transaction (never half-stored).
ALTER TABLE messages ADD COLUMN blob_key TEXT;
ALTER TABLE messages ADD COLUMN blob_size INTEGER;
CREATE INDEX messages_blob_idx ON messages (conversation_id, blob_key)
    WHERE blob_key IS NOT NULL;

-- Every blob ever written, registered BEFORE its bytes go to the store: the
-- collector (storage/offline_sql.py) can then always find and delete what a
-- crash or an abandoned upload left behind.  No foreign key: a deleted
-- conversation's rows must outlive it until its blobs are gone.
CREATE TABLE blobs (
    conversation_id BLOB  NOT NULL,
    blob_key        TEXT   NOT NULL,
    uploader_did    TEXT   NOT NULL,
    uploader_device TEXT   NOT NULL,
    size            INTEGER NOT NULL,
    created_ms      INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, blob_key)
);
CREATE INDEX blobs_created_ms_idx ON blobs (created_ms);

-- Devices the relay has seen, with their push registration (none: NULL provider).
CREATE TABLE devices (
    user_did      TEXT   NOT NULL,
    device_id     TEXT   NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL,
    push_provider TEXT,
    push_zone     TEXT   NOT NULL DEFAULT '',
    push_token    TEXT,
    PRIMARY KEY (user_did, device_id)
);
CREATE INDEX devices_push_idx ON devices (user_did) WHERE push_provider IS NOT NULL;

-- Highest seq handed to a device's connection, per conversation (flushed in
-- batches; acknowledged positions stay in cursors).  No foreign key, here and
-- in read_positions: checking one takes a KEY SHARE lock on the conversation
-- row, which conflicts with the FOR UPDATE every append takes -- a batch of
-- delivered positions stalled all sends for its whole transaction.  Deleting
-- a conversation deletes these rows explicitly (storage/offline_sql.py).
CREATE TABLE deliveries (
    user_did        TEXT   NOT NULL,
    device_id       TEXT   NOT NULL,
    conversation_id BLOB  NOT NULL,
    seq             INTEGER NOT NULL,
    updated_ms      INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, user_did, device_id)
);

-- A member's published read position (per user: shared by its devices).
CREATE TABLE read_positions (
    conversation_id BLOB  NOT NULL,
    user_did        TEXT   NOT NULL,
    seq             INTEGER NOT NULL,
    updated_ms      INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, user_did)
);

-- Ids of deleted conversations are never reused: every node caches a
-- conversation's kind (MLS or not, storage model) as immutable.
CREATE TABLE deleted_conversations (
    id         BLOB  PRIMARY KEY,
    deleted_ms INTEGER NOT NULL
);
