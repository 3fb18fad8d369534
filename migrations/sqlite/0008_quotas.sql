-- Quotas (storage/quotas.py) count what one user holds, inside the storing
-- transaction: conversations by creator, blob bytes by uploader.  These
-- indexes keep each count a range scan of that user's rows.
CREATE INDEX conversations_creator_idx ON conversations (creator);
CREATE INDEX blobs_uploader_idx ON blobs (uploader_did);

-- Deleted conversations keep their id for ever (never reused), so a
-- create-delete loop would grow this table without end: the ones a creator
-- deleted in the last day count against its conversations quota.  Rows
-- deleted before this migration have no creator and count for nobody.
ALTER TABLE deleted_conversations ADD COLUMN creator text;
CREATE INDEX deleted_conversations_creator_idx ON deleted_conversations (creator, deleted_ms);
