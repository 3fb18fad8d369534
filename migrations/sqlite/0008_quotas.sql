-- Quotas (storage/quotas.py) count what one user holds, inside the storing
-- transaction: conversations by creator, blob bytes by uploader.  These
-- indexes keep each count a range scan of that user's rows.
CREATE INDEX conversations_creator_idx ON conversations (creator);
CREATE INDEX blobs_uploader_idx ON blobs (uploader_did);
