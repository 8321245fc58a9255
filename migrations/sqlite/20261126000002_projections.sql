-- How far each projection has applied the log, committed in the same transaction as
-- the projection's rows: an event is applied exactly once, after any crash.
CREATE TABLE projection_checkpoints (
    name     TEXT    NOT NULL PRIMARY KEY,
    position INTEGER NOT NULL
);

-- lead_board: leads with status, score, owner, source, captured and qualified times.
-- Times are RFC 3339 UTC text with microseconds, so they sort as text.
CREATE TABLE lead_board (
    lead_id           TEXT    NOT NULL PRIMARY KEY,
    email             TEXT    NOT NULL,
    name              TEXT    NOT NULL,
    company           TEXT,
    source            TEXT    NOT NULL,
    status            TEXT    NOT NULL,
    score             BIGINT  NOT NULL,
    owner             TEXT,
    captured_at       TEXT    NOT NULL,
    qualified_at      TEXT,
    converted_deal_id TEXT,
    updated_position  BIGINT  NOT NULL
);

CREATE INDEX lead_board_score ON lead_board (score DESC, captured_at, lead_id);
CREATE INDEX lead_board_owner ON lead_board (owner);
