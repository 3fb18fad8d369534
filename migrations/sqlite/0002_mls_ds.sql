-- MLS delivery service.  Mirrors migrations/postgresql/0002_mls_ds.sql (the
-- epoch check lives in storage/sqlite_mls.py, under BEGIN IMMEDIATE).

ALTER TABLE conversations ADD COLUMN mls_group_id BLOB;
ALTER TABLE conversations ADD COLUMN external_join INTEGER NOT NULL DEFAULT 0;

CREATE TABLE key_packages (
    ref          BLOB    PRIMARY KEY NOT NULL,
    user_did     TEXT    NOT NULL,
    device_id    TEXT    NOT NULL,
    cipher_suite INTEGER NOT NULL,
    data         BLOB    NOT NULL,
    last_resort  INTEGER NOT NULL DEFAULT 0,
    not_after    INTEGER NOT NULL,
    uploaded_ms  INTEGER NOT NULL,
    claimed_ms   INTEGER
) WITHOUT ROWID;
CREATE INDEX key_packages_available_idx
    ON key_packages (user_did, device_id, cipher_suite, uploaded_ms)
    WHERE claimed_ms IS NULL;

CREATE TABLE key_package_claims (
    ref         BLOB    NOT NULL REFERENCES key_packages (ref) ON DELETE CASCADE,
    claimer_did TEXT    NOT NULL,
    claimed_ms  INTEGER NOT NULL,
    PRIMARY KEY (ref, claimer_did)
) WITHOUT ROWID;

CREATE TABLE welcomes (
    user_did        TEXT    NOT NULL,
    device_id       TEXT    NOT NULL,
    conversation_id BLOB    NOT NULL,
    seq             INTEGER NOT NULL,
    epoch           INTEGER NOT NULL,
    welcome         BLOB    NOT NULL,
    created_ms      INTEGER NOT NULL,
    PRIMARY KEY (user_did, device_id, conversation_id, seq)
) WITHOUT ROWID;

CREATE TABLE group_infos (
    conversation_id BLOB    NOT NULL,
    epoch           INTEGER NOT NULL,
    group_info      BLOB    NOT NULL,
    created_ms      INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, epoch)
) WITHOUT ROWID;
