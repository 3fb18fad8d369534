-- #listConversations pages (WHERE user_did = $1 AND conversation_id > $2
-- ORDER BY conversation_id LIMIT n) walk this index from the cursor: with
-- the index on user_did alone every membership of the user was read and
-- sorted for each page.  It also serves every lookup by user_did, so the
-- old index goes.  (SQLite needs nothing: members is WITHOUT ROWID, so its
-- index on user_did already holds conversation_id in order.)
CREATE INDEX members_user_conversation_idx ON members (user_did, conversation_id);
DROP INDEX members_user_did_idx;
