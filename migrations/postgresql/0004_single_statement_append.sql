-- The plain-message append as ONE autocommit statement: the caller no longer
-- needs BEGIN, a separate lock query and COMMIT around it (four round trips
-- per group commit became one).  Same rules as 0001's relay_append_messages, plus
-- the check the caller used to make first: an MLS conversation accepts
-- MLSMessages only, so a plain item there gets status 'mls' and is not stored.
CREATE FUNCTION relay_append_plain(
    p_conv bytea[], p_sender text[], p_device text[], p_cmid text[],
    p_ciphertext bytea[], p_created_ms bigint[])
RETURNS TABLE (r_ord integer, r_status text, r_seq bigint, r_created_ms bigint)
LANGUAGE plpgsql AS $$
BEGIN
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
END;
$$;

-- relay_append_messages (0001) is no longer called by this version but stays:
-- during a rolling upgrade, nodes of the previous version still call it.  A
-- later migration drops it once no such node can be running.
