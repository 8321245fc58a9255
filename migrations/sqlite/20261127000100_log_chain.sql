-- The log's own hash chain (see store/src/chain.rs and audit.rs), and its head row.
--
-- `log_hash` links each event to its position, its category and the event before it in
-- the log. Rows stored before this migration have none until the store, when it opens
-- the database, chains them in position order (under the write lock, once): the head
-- row's NULL hash below is what tells it to.
ALTER TABLE events ADD COLUMN log_hash BLOB;

-- One row: the last position given and its log hash, written in every append's
-- transaction. The writer takes the next position from here, not from MAX(position), so
-- a position is never given twice, even after its row was deleted.
CREATE TABLE log_head (
    id       INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    position INTEGER CHECK (position >= 0),
    hash     BLOB
);

INSERT INTO log_head (id, position, hash) VALUES (1, NULL, NULL);
