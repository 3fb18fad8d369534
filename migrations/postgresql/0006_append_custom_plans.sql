-- The plain-message append (0004), always planned for the arrays it is given
-- (custom plans) instead of by the plan cache's choice.  Same rules and
-- results as 0004; only the planning changed.
CREATE OR REPLACE FUNCTION relay_append_plain(
    p_conv bytea[], p_sender text[], p_device text[], p_cmid text[],
    p_ciphertext bytea[], p_created_ms bigint[])
RETURNS TABLE (r_ord integer, r_status text, r_seq bigint, r_created_ms bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_plan_mode text := current_setting('plan_cache_mode');
BEGIN
    -- Custom plans always, never the plan cache's choice: left to itself
    -- ('auto') it compares a generic plan with the first custom ones and may
    -- keep the generic plan for good.  Built while the tables were nearly
    -- empty (a fresh database, the first sends), that plan was 15-25 %
    -- slower for large batches; some connections of the pool flipped, others
    -- did not, and under load PostgreSQL CPU per message nearly doubled and
    -- p50 went from 7 to 50-80 ms in some runs (bench/PROFILE.md).  Forcing
    -- generic plans for small batches was tried and cost more than it saved.
    -- Local to this transaction; restored below for the statements that
    -- follow in a mixed batch's transaction.
    PERFORM set_config('plan_cache_mode', 'force_custom_plan', true);
    -- Lock every conversation of the batch up front, in ascending id order:
    -- two nodes committing overlapping batches can then never deadlock.
    PERFORM 1 FROM conversations c WHERE c.id = ANY (p_conv) ORDER BY c.id FOR UPDATE;
    -- A new statement, hence (READ COMMITTED) a snapshot taken after the locks
    -- were granted: last_seq and the idempotency keys read below are current.
    RETURN QUERY
    WITH items AS (
        SELECT (t.ord - 1)::integer AS ord, t.conv, t.sender, t.device, t.cmid, t.ct, t.created
          FROM unnest(p_conv, p_sender, p_device, p_cmid, p_ciphertext, p_created_ms)
               WITH ORDINALITY AS t (conv, sender, device, cmid, ct, created, ord)
    ), checked AS (
        SELECT i.*,
               EXISTS (SELECT 1 FROM members m
                        WHERE m.conversation_id = i.conv AND m.user_did = i.sender) AS is_member,
               coalesce((SELECT c.mls_group_id IS NOT NULL FROM conversations c
                          WHERE c.id = i.conv), false) AS is_mls,
               old.seq AS old_seq, old.created_ms AS old_created,
               -- A key repeated within the batch refers to its first occurrence.
               min(i.ord) OVER (PARTITION BY i.conv, i.sender, i.device, i.cmid) AS first_ord
          FROM items i
          LEFT JOIN messages old
            ON old.conversation_id = i.conv AND old.sender_did = i.sender
           AND old.sender_device = i.device AND old.client_message_id = i.cmid
    ), fresh AS (
        SELECT ch.ord, ch.conv, ch.sender, ch.device, ch.cmid, ch.ct, ch.created,
               c.last_seq + row_number() OVER (PARTITION BY ch.conv ORDER BY ch.ord) AS seq
          FROM checked ch JOIN conversations c ON c.id = ch.conv
         WHERE ch.is_member AND NOT ch.is_mls AND ch.old_seq IS NULL AND ch.ord = ch.first_ord
    ), inserted AS (
        INSERT INTO messages (conversation_id, seq, sender_did, sender_device,
                              client_message_id, ciphertext, created_ms)
        SELECT f.conv, f.seq, f.sender, f.device, f.cmid, f.ct, f.created FROM fresh f
    ), bumped AS (
        UPDATE conversations c SET last_seq = f.top
          FROM (SELECT conv, max(seq) AS top FROM fresh GROUP BY conv) f
         WHERE c.id = f.conv
    )
    SELECT ch.ord,
           CASE WHEN NOT ch.is_member THEN 'not_member'
                WHEN ch.is_mls THEN 'mls'
                WHEN ch.old_seq IS NOT NULL OR ch.ord <> ch.first_ord THEN 'duplicate'
                ELSE 'ok' END,
           coalesce(ch.old_seq, f.seq),
           coalesce(ch.old_created, f.created)
      FROM checked ch LEFT JOIN fresh f ON f.ord = ch.first_ord
     ORDER BY ch.ord;
    PERFORM set_config('plan_cache_mode', v_plan_mode, true);
END;
$$;
