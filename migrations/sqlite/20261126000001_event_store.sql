-- The event log. SQLite serialises writers, and the writer gives positions inside its
-- write transaction, so positions become visible in increasing order.
CREATE TABLE events (
    position       INTEGER NOT NULL PRIMARY KEY CHECK (position >= 1),
    stream         TEXT    NOT NULL,
    -- The part of the stream name before the first '-', for category filters.
    category       TEXT    NOT NULL,
    version        INTEGER NOT NULL CHECK (version >= 1),
    -- Hyphenated UUID text, so a batch of ids can be looked up through json_each.
    event_id       TEXT    NOT NULL,
    event_type     TEXT    NOT NULL,
    schema_version INTEGER NOT NULL,
    -- Canonical JSON text (sorted keys), exactly as hashed.
    data           TEXT    NOT NULL,
    metadata       TEXT    NOT NULL,
    -- Microseconds since the Unix epoch, UTC.
    recorded_at    INTEGER NOT NULL,
    -- SHA-256 over the previous event's hash and this event (see store/src/chain.rs).
    hash           BLOB    NOT NULL,
    CONSTRAINT events_stream_version_key UNIQUE (stream, version),
    CONSTRAINT events_event_id_key UNIQUE (event_id)
);

CREATE INDEX events_type_position ON events (event_type, position);
CREATE INDEX events_category_position ON events (category, position);

-- Unique keys held by streams (for example a lead's email), taken and released
-- atomically with the holder's events.
CREATE TABLE claims (
    key      TEXT    NOT NULL PRIMARY KEY,
    stream   TEXT    NOT NULL,
    position INTEGER NOT NULL
);

-- Idempotency keys of the commands that caused appends, written in the same
-- transaction as the events, with the append's outcome.
CREATE TABLE idempotency_keys (
    key           TEXT    NOT NULL PRIMARY KEY,
    request_hash  TEXT    NOT NULL,
    payload       TEXT    NOT NULL,
    stream        TEXT    NOT NULL,
    version       INTEGER NOT NULL,
    last_position INTEGER NOT NULL,
    -- Microseconds since the Unix epoch, UTC.
    recorded_at   INTEGER NOT NULL
);

CREATE INDEX idempotency_keys_recorded_at ON idempotency_keys (recorded_at);

CREATE TABLE snapshots (
    stream         TEXT    NOT NULL PRIMARY KEY,
    version        INTEGER NOT NULL,
    schema_version INTEGER NOT NULL,
    state          TEXT    NOT NULL,
    taken_at       INTEGER NOT NULL
);
