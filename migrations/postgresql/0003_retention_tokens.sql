-- Retention that never breaks a group, and single-use tokens.

-- The seq of the commit that produced the current epoch, and of the one before
-- it (0: none).  Set by the append path under the conversation row lock.
-- Retention keeps every message with seq > prev_commit_seq: the current epoch,
-- its commit, and the previous epoch in which that commit and the proposals it
-- may reference were sent (see storage/retention_sql.py).
ALTER TABLE conversations ADD COLUMN commit_seq bigint NOT NULL DEFAULT 0;
ALTER TABLE conversations ADD COLUMN prev_commit_seq bigint NOT NULL DEFAULT 0;

-- MLS conversations that already moved past epoch 0 have commits we cannot
-- identify (messages do not record their kind): keep all their history until
-- two new commits have been recorded.
UPDATE conversations SET commit_seq = last_seq
 WHERE mls_group_id IS NOT NULL AND epoch > 0;

-- One row per consumed token id: a jti is accepted once, across every node.
-- Rows outlive their token's acceptance window, then the retention job purges them.
CREATE TABLE token_uses (
    jti        text   PRIMARY KEY,
    user_did   text   NOT NULL,
    expires_ms bigint NOT NULL,
    used_ms    bigint NOT NULL
);
CREATE INDEX token_uses_expires_ms_idx ON token_uses (expires_ms);

-- Retention scans GroupInfo by age as it scans messages.
CREATE INDEX group_infos_created_ms_idx ON group_infos (created_ms);
