-- Retention and single-use tokens.  Mirrors migrations/postgresql/0003_retention_tokens.sql.

ALTER TABLE conversations ADD COLUMN commit_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE conversations ADD COLUMN prev_commit_seq INTEGER NOT NULL DEFAULT 0;

UPDATE conversations SET commit_seq = last_seq
 WHERE mls_group_id IS NOT NULL AND epoch > 0;

CREATE TABLE token_uses (
    jti        TEXT    PRIMARY KEY NOT NULL,
    user_did   TEXT    NOT NULL,
    expires_ms INTEGER NOT NULL,
    used_ms    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX token_uses_expires_ms_idx ON token_uses (expires_ms);

CREATE INDEX group_infos_created_ms_idx ON group_infos (created_ms);
