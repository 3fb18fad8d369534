-- mls-relay initial schema (PostgreSQL).  Times are integer milliseconds.

CREATE TABLE conversations (
    id          bytea  PRIMARY KEY,
    creator     text   NOT NULL,
    created_ms  bigint NOT NULL,
    -- Highest seq handed out; the ONLY source of new seqs (never MAX(seq)+1).
    last_seq    bigint NOT NULL DEFAULT 0,
    -- Lowest retained seq; last_seq + 1 once everything was pruned.
    first_seq   bigint NOT NULL DEFAULT 1,
    -- Reserved for MLS epoch tracking.
    epoch       bigint NOT NULL DEFAULT 0
);

CREATE TABLE members (
    conversation_id bytea  NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_did        text   NOT NULL,
    joined_seq      bigint NOT NULL,
    added_ms        bigint NOT NULL,
    PRIMARY KEY (conversation_id, user_did)
);
CREATE INDEX members_user_did_idx ON members (user_did);

-- Messages do not reference members: removing a member keeps what it sent.
CREATE TABLE messages (
    conversation_id   bytea  NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq               bigint NOT NULL,
    sender_did        text   NOT NULL,
    sender_device     text   NOT NULL,
    client_message_id text   NOT NULL,
    ciphertext        bytea  NOT NULL,
    created_ms        bigint NOT NULL,
    PRIMARY KEY (conversation_id, seq),
    UNIQUE (conversation_id, sender_did, sender_device, client_message_id)
);
-- prune_messages scans by age.
CREATE INDEX messages_created_ms_idx ON messages (created_ms);

CREATE TABLE cursors (
    user_did        text   NOT NULL,
    device_id       text   NOT NULL,
    conversation_id bytea  NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             bigint NOT NULL,
    updated_ms      bigint NOT NULL,
    PRIMARY KEY (user_did, device_id, conversation_id)
);

-- Group commit in one round trip, set-based (no per-item statements).
-- Returns one row per item in submitted order: (ord, status, seq, created_ms)
-- with status 'ok', 'duplicate' (the original seq/created_ms) or 'not_member'.
-- Within a conversation, new seqs follow batch order.
CREATE FUNCTION relay_append_messages(
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
         WHERE ch.is_member AND ch.old_seq IS NULL AND ch.ord = ch.first_ord
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
                WHEN ch.old_seq IS NOT NULL OR ch.ord <> ch.first_ord THEN 'duplicate'
                ELSE 'ok' END,
           coalesce(ch.old_seq, f.seq),
           coalesce(ch.old_created, f.created)
      FROM checked ch LEFT JOIN fresh f ON f.ord = ch.first_ord
     ORDER BY ch.ord;
END;
$$;
