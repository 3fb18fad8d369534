-- One order of checks for an MLS append, the same as SQLite's
-- (storage/mls_sql.py, append_mls_sqlite), and the epoch each message produced.
--
--   1. the sender is a member (or sends an external commit to a conversation
--      with external_join)                       else not_member (no epoch:
--                                                  existence is not revealed)
--   2. framing: MLSMessage bytes in an MLS conversation, and only there
--                                                 else needs_mls / not_mls
--   3. a repeated client_message_id is the original message: its seq, time
--      and the epoch it produced                  (duplicate)
--   4. group_id is the conversation's             else wrong_group
--   5. the epoch rule                             else future_epoch,
--                                                  stale_commit, stale_epoch
--   6. every Welcome KeyPackageRef was claimed by the sender (resolved by the
--      caller in the same transaction: p_refs_ok) else unknown_key_package
--   7. store; a commit moves the epoch by one.
-- Steps 2-6 carry the conversation's current epoch: whoever loses a commit
-- race learns where the group is, whatever else is wrong with its commit.
--
-- Additive: relay_append_mls (0002) stays for nodes of the previous release
-- during a rolling upgrade; it leaves messages.epoch NULL, which a retry then
-- answers with the current epoch, as before.

-- The epoch after this message (for a commit: the epoch it created).  NULL for
-- opaque conversations and for messages stored before this migration.
ALTER TABLE messages ADD COLUMN epoch bigint;

CREATE FUNCTION relay_append_mls_v2(
    p_conv bytea, p_sender text, p_device text, p_cmid text, p_ct bytea,
    p_created_ms bigint, p_kind text, p_epoch bigint, p_group bytea, p_window bigint,
    p_refs_ok boolean)
RETURNS TABLE (r_status text, r_seq bigint, r_created_ms bigint, r_epoch bigint)
LANGUAGE plpgsql AS $$
DECLARE
    c record;
    old record;
    is_commit boolean := p_kind IN ('commit', 'external_commit');
    new_seq bigint;
    new_epoch bigint;
BEGIN
    SELECT id, last_seq, epoch, mls_group_id, external_join INTO c
      FROM conversations WHERE id = p_conv FOR UPDATE;
    IF NOT FOUND OR NOT (
        EXISTS (SELECT 1 FROM members WHERE conversation_id = p_conv AND user_did = p_sender)
        OR (p_kind = 'external_commit' AND c.external_join)) THEN
        RETURN QUERY SELECT 'not_member'::text, NULL::bigint, NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    IF p_kind = '' AND c.mls_group_id IS NOT NULL THEN
        RETURN QUERY SELECT 'needs_mls'::text, NULL::bigint, NULL::bigint, c.epoch;
        RETURN;
    END IF;
    IF c.mls_group_id IS NULL THEN
        RETURN QUERY SELECT 'not_mls'::text, NULL::bigint, NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    SELECT m.seq, m.created_ms, m.epoch INTO old FROM messages m
     WHERE m.conversation_id = p_conv AND m.sender_did = p_sender
       AND m.sender_device = p_device AND m.client_message_id = p_cmid;
    IF FOUND THEN
        RETURN QUERY SELECT 'duplicate'::text, old.seq, old.created_ms,
                            coalesce(old.epoch, c.epoch);
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
    IF NOT p_refs_ok THEN
        RETURN QUERY SELECT 'unknown_key_package'::text, NULL::bigint, NULL::bigint, c.epoch;
        RETURN;
    END IF;
    new_seq := c.last_seq + 1;
    new_epoch := c.epoch + CASE WHEN is_commit THEN 1 ELSE 0 END;
    UPDATE conversations SET last_seq = new_seq, epoch = new_epoch WHERE id = p_conv;
    INSERT INTO messages (conversation_id, seq, sender_did, sender_device,
                          client_message_id, ciphertext, created_ms, epoch)
    VALUES (p_conv, new_seq, p_sender, p_device, p_cmid, p_ct, p_created_ms, new_epoch);
    RETURN QUERY SELECT 'ok'::text, new_seq, p_created_ms, new_epoch;
END;
$$;
