-- The epoch after each MLS message (for a commit: the epoch it created), so a
-- retried send answers with the epoch its message produced.  NULL for opaque
-- conversations and for messages stored before this migration.  Mirrors
-- migrations/postgresql/0007_mls_check_order.sql.
ALTER TABLE messages ADD COLUMN epoch INTEGER;
