-- mls-relay initial schema (SQLite).  Mirrors migrations/postgresql/0001_init.sql.

CREATE TABLE conversations (
    id          BLOB    PRIMARY KEY NOT NULL,
    creator     TEXT    NOT NULL,
    created_ms  INTEGER NOT NULL,
    -- Highest seq handed out; the ONLY source of new seqs (never MAX(seq)+1).
    last_seq    INTEGER NOT NULL DEFAULT 0,
    -- Lowest retained seq; last_seq + 1 once everything was pruned.
    first_seq   INTEGER NOT NULL DEFAULT 1,
    -- Reserved for MLS epoch tracking.
    epoch       INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE members (
    conversation_id BLOB    NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_did        TEXT    NOT NULL,
    joined_seq      INTEGER NOT NULL,
    added_ms        INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, user_did)
) WITHOUT ROWID;
CREATE INDEX members_user_did_idx ON members (user_did);

-- Messages do not reference members: removing a member keeps what it sent.
CREATE TABLE messages (
    conversation_id   BLOB    NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq               INTEGER NOT NULL,
    sender_did        TEXT    NOT NULL,
    sender_device     TEXT    NOT NULL,
    client_message_id TEXT    NOT NULL,
    ciphertext        BLOB    NOT NULL,
    created_ms        INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, seq),
    UNIQUE (conversation_id, sender_did, sender_device, client_message_id)
) WITHOUT ROWID;
-- prune_messages scans by age.
CREATE INDEX messages_created_ms_idx ON messages (created_ms);

CREATE TABLE cursors (
    user_did        TEXT    NOT NULL,
    device_id       TEXT    NOT NULL,
    conversation_id BLOB    NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             INTEGER NOT NULL,
    updated_ms      INTEGER NOT NULL,
    PRIMARY KEY (user_did, device_id, conversation_id)
) WITHOUT ROWID;
