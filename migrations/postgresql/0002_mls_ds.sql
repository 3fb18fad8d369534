-- MLS delivery service: per-conversation group id and epoch, key packages,
-- claims, welcome inboxes and GroupInfo per epoch.

-- NULL: an opaque-ciphertext conversation.  Set once at creation, never changed.
ALTER TABLE conversations ADD COLUMN mls_group_id bytea;
-- Whether non-members may fetch GroupInfo and join with an external commit.
ALTER TABLE conversations ADD COLUMN external_join boolean NOT NULL DEFAULT false;

CREATE TABLE key_packages (
    ref          bytea   PRIMARY KEY,          -- KeyPackageRef (RFC 9420 §5.2)
    user_did     text    NOT NULL,
    device_id    text    NOT NULL,
    cipher_suite integer NOT NULL,
    data         bytea   NOT NULL,             -- the MLSMessage (wire_format key_package)
    last_resort  boolean NOT NULL DEFAULT false,
    not_after    bigint  NOT NULL,             -- lifetime end, seconds (clamped to 2^63-1)
    uploaded_ms  bigint  NOT NULL,
    -- Set when handed out (or retired): never handed out again.  Rows are kept
    -- so that a Welcome's KeyPackageRef still resolves to its device.
    claimed_ms   bigint
);
CREATE INDEX key_packages_available_idx
    ON key_packages (user_did, device_id, cipher_suite, uploaded_ms)
    WHERE claimed_ms IS NULL;

-- Who claimed which KeyPackage: a Welcome may only name refs its committer claimed.
CREATE TABLE key_package_claims (
    ref         bytea  NOT NULL REFERENCES key_packages (ref) ON DELETE CASCADE,
    claimer_did text   NOT NULL,
    claimed_ms  bigint NOT NULL,
    PRIMARY KEY (ref, claimer_did)
);

-- Per-device Welcome inbox; a row goes when the device acks seq >= its seq.
-- (No foreign key to conversations: conversations are never deleted, and the
-- tests empty the core tables with TRUNCATE.)
CREATE TABLE welcomes (
    user_did        text   NOT NULL,
    device_id       text   NOT NULL,
    conversation_id bytea  NOT NULL,
    seq             bigint NOT NULL,
    epoch           bigint NOT NULL,
    welcome         bytea  NOT NULL,
    created_ms      bigint NOT NULL,
    PRIMARY KEY (user_did, device_id, conversation_id, seq)
);

CREATE TABLE group_infos (
    conversation_id bytea  NOT NULL,
    epoch           bigint NOT NULL,
    group_info      bytea  NOT NULL,
    created_ms      bigint NOT NULL,
    PRIMARY KEY (conversation_id, epoch)
);

-- One MLS message, appended under the conversation row lock, with the epoch
-- check in the same transaction as the seq assignment.  The caller has
-- already locked every conversation of its batch in id order.
-- p_kind: 'application' | 'proposal' | 'commit' | 'external_commit'.
-- Returns (status, seq, created_ms, epoch): status 'ok' (epoch = the epoch
-- after this message), 'duplicate' (the original seq/created_ms), or an error
-- ('not_member', 'not_mls', 'wrong_group', 'stale_commit', 'future_epoch',
-- 'stale_epoch'; epoch = the current one).
CREATE FUNCTION relay_append_mls(
    p_conv bytea, p_sender text, p_device text, p_cmid text, p_ct bytea,
    p_created_ms bigint, p_kind text, p_epoch bigint, p_group bytea, p_window bigint)
RETURNS TABLE (r_status text, r_seq bigint, r_created_ms bigint, r_epoch bigint)
LANGUAGE plpgsql AS $$
DECLARE
    c record;
    old record;
    is_commit boolean := p_kind IN ('commit', 'external_commit');
    new_seq bigint;
BEGIN
    SELECT id, last_seq, epoch, mls_group_id, external_join INTO c
      FROM conversations WHERE id = p_conv FOR UPDATE;
    IF NOT FOUND OR NOT (
        EXISTS (SELECT 1 FROM members WHERE conversation_id = p_conv AND user_did = p_sender)
        OR (p_kind = 'external_commit' AND c.external_join)) THEN
        RETURN QUERY SELECT 'not_member'::text, NULL::bigint, NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    SELECT m.seq, m.created_ms INTO old FROM messages m
     WHERE m.conversation_id = p_conv AND m.sender_did = p_sender
       AND m.sender_device = p_device AND m.client_message_id = p_cmid;
    IF FOUND THEN
        RETURN QUERY SELECT 'duplicate'::text, old.seq, old.created_ms, c.epoch;
        RETURN;
    END IF;
    IF c.mls_group_id IS NULL THEN
        RETURN QUERY SELECT 'not_mls'::text, NULL::bigint, NULL::bigint, c.epoch;
        RETURN;
    END IF;
    IF p_group IS DISTINCT FROM c.mls_group_id THEN
        RETURN QUERY SELECT 'wrong_group'::text, NULL::bigint, NULL::bigint, c.epoch;
        RETURN;
    END IF;
    IF p_epoch > c.epoch THEN
        RETURN QUERY SELECT 'future_epoch'::text, NULL::bigint, NULL::bigint, c.epoch;
        RETURN;
    END IF;
    IF (is_commit AND p_epoch < c.epoch) THEN
        RETURN QUERY SELECT 'stale_commit'::text, NULL::bigint, NULL::bigint, c.epoch;
        RETURN;
    END IF;
    IF (p_kind = 'proposal' AND p_epoch < c.epoch)
       OR (p_kind = 'application' AND p_epoch < c.epoch - p_window) THEN
        RETURN QUERY SELECT 'stale_epoch'::text, NULL::bigint, NULL::bigint, c.epoch;
        RETURN;
    END IF;
    new_seq := c.last_seq + 1;
    UPDATE conversations
       SET last_seq = new_seq, epoch = epoch + CASE WHEN is_commit THEN 1 ELSE 0 END
     WHERE id = p_conv;
    INSERT INTO messages (conversation_id, seq, sender_did, sender_device,
                          client_message_id, ciphertext, created_ms)
    VALUES (p_conv, new_seq, p_sender, p_device, p_cmid, p_ct, p_created_ms);
    RETURN QUERY SELECT 'ok'::text, new_seq, p_created_ms,
                        c.epoch + CASE WHEN is_commit THEN 1 ELSE 0 END;
END;
$$;
