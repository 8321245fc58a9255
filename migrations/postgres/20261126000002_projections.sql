-- Projections. Every read-model table has a `generation` column: the live generation is
-- the one `projections.live_generation` names, and readers see only it. A rebuild fills
-- a new generation beside the live one from position 0 and swaps by changing that one
-- value; verify fills a scratch generation and compares.
CREATE TABLE projections (
    name            TEXT    NOT NULL PRIMARY KEY,
    live_generation BIGINT NOT NULL,
    -- The generation being rebuilt, while a rebuild runs.
    rebuilding      BIGINT
);

-- How far each generation of a projection has applied the log, committed in the same
-- transaction as its rows: an event is applied exactly once, after any crash.
CREATE TABLE projection_checkpoints (
    name       TEXT    NOT NULL,
    generation BIGINT NOT NULL,
    position   BIGINT NOT NULL,
    PRIMARY KEY (name, generation)
);

-- Events a projection could not apply after its retries, with the error. A projection
-- that halts on failure stops before its first parked event until an operator retries;
-- one that skips goes on without them.
CREATE TABLE projection_dead_letters (
    name       TEXT    NOT NULL,
    position   BIGINT  NOT NULL,
    event_type TEXT    NOT NULL,
    error      TEXT    NOT NULL,
    attempts   BIGINT  NOT NULL,
    PRIMARY KEY (name, position)
);

-- lead_board: leads with status, score, owner, source, captured and qualified times.
-- Times are RFC 3339 UTC text with microseconds, so they sort as text.
CREATE TABLE lead_board (
    generation        BIGINT NOT NULL,
    lead_id           TEXT    NOT NULL,
    email             TEXT    NOT NULL,
    name              TEXT    NOT NULL,
    company           TEXT,
    source            TEXT    NOT NULL,
    status            TEXT    NOT NULL,
    score             BIGINT NOT NULL,
    owner             TEXT,
    captured_at       TEXT    NOT NULL,
    qualified_at      TEXT,
    converted_deal_id TEXT,
    converted_account_id TEXT,
    converted_at      TEXT,
    updated_position  BIGINT NOT NULL,
    PRIMARY KEY (generation, lead_id)
);

CREATE INDEX lead_board_score ON lead_board (generation, score DESC, captured_at, lead_id);
CREATE INDEX lead_board_owner ON lead_board (generation, owner);

-- deal_board: deals with stage, status, amount, owner and account. Times are RFC 3339
-- text for display and microseconds since the epoch for arithmetic.
CREATE TABLE deal_board (
    generation       BIGINT NOT NULL,
    deal_id          TEXT    NOT NULL,
    account_id       TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    stage            TEXT    NOT NULL,
    status           TEXT    NOT NULL,
    currency         TEXT    NOT NULL,
    amount_minor     BIGINT NOT NULL,
    owner            TEXT,
    expected_close   TEXT,
    opened_at        TEXT    NOT NULL,
    opened_micros    BIGINT NOT NULL,
    closed_at        TEXT,
    closed_micros    BIGINT,
    lost_reason      TEXT,
    updated_position BIGINT NOT NULL,
    PRIMARY KEY (generation, deal_id)
);

CREATE INDEX deal_board_account ON deal_board (generation, account_id);
CREATE INDEX deal_board_stage ON deal_board (generation, status, stage);
CREATE INDEX deal_board_owner ON deal_board (generation, owner);

-- account_360's own rows: one per account. Its deals and converted leads come from the
-- deal and lead boards.
CREATE TABLE account_360 (
    generation       BIGINT NOT NULL,
    account_id       TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    domain           TEXT,
    industry         TEXT,
    employees        BIGINT,
    tier             TEXT    NOT NULL,
    opened_at        TEXT    NOT NULL,
    updated_position BIGINT NOT NULL,
    PRIMARY KEY (generation, account_id)
);
