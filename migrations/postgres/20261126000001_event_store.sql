-- The event log. `position` is given by the writer under the `annals.events` advisory
-- lock, held until commit, so positions become visible in increasing order: a reader
-- that sees position p can never later see a smaller one.
CREATE TABLE events (
    position       BIGINT      NOT NULL PRIMARY KEY CHECK (position >= 1),
    stream         TEXT        NOT NULL,
    -- The part of the stream name before the first '-', for category filters.
    category       TEXT        NOT NULL,
    version        BIGINT      NOT NULL CHECK (version >= 1),
    event_id       UUID        NOT NULL,
    event_type     TEXT        NOT NULL,
    schema_version BIGINT      NOT NULL,
    data           JSONB       NOT NULL,
    metadata       JSONB       NOT NULL,
    recorded_at    TIMESTAMPTZ NOT NULL,
    -- SHA-256 over the previous event's hash and this event (see store/src/chain.rs).
    hash           BYTEA       NOT NULL,
    CONSTRAINT events_stream_version_key UNIQUE (stream, version),
    CONSTRAINT events_event_id_key UNIQUE (event_id)
);

CREATE INDEX events_type_position ON events (event_type, position);
CREATE INDEX events_category_position ON events (category, position);

-- Unique keys held by streams (for example a lead's email), taken and released
-- atomically with the holder's events.
CREATE TABLE claims (
    key      TEXT   NOT NULL PRIMARY KEY,
    stream   TEXT   NOT NULL,
    position BIGINT NOT NULL
);

CREATE TABLE snapshots (
    stream         TEXT        NOT NULL PRIMARY KEY,
    version        BIGINT      NOT NULL,
    schema_version BIGINT      NOT NULL,
    state          JSONB       NOT NULL,
    taken_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
