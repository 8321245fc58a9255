-- Leases that spread the consumers of the log (and the timer scheduler) between the
-- processes sharing this database (`store/src/leases.rs`): one row per name, its holder
-- (host, pid and a random part: which process), a fencing epoch that grows at each
-- take-over, and when it expires, in microseconds since the epoch by the DATABASE's
-- clock (no server's clock matters). A row is never deleted: a release expires it, so
-- the next holder's epoch is still higher than every earlier one.
CREATE TABLE leases (
    name           TEXT   NOT NULL PRIMARY KEY,
    holder         TEXT   NOT NULL,
    epoch          BIGINT NOT NULL,
    expires_micros BIGINT NOT NULL,
    taken_micros   BIGINT NOT NULL
);

-- When a checkpoint last moved (the database's clock, microseconds), so that an operator
-- can tell a consumer that has lag and does not move (`stalled`) from every process.
ALTER TABLE projection_checkpoints ADD COLUMN moved_micros BIGINT;
