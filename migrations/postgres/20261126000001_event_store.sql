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

-- Idempotency keys of the commands that caused appends, written in the same
-- transaction as the events, with the append's outcome.
CREATE TABLE idempotency_keys (
    key           TEXT        NOT NULL PRIMARY KEY,
    request_hash  TEXT        NOT NULL,
    payload       JSONB       NOT NULL,
    stream        TEXT        NOT NULL,
    version       BIGINT      NOT NULL,
    last_position BIGINT      NOT NULL,
    recorded_at   TIMESTAMPTZ NOT NULL
);

CREATE INDEX idempotency_keys_recorded_at ON idempotency_keys (recorded_at);

CREATE TABLE snapshots (
    stream         TEXT        NOT NULL PRIMARY KEY,
    version        BIGINT      NOT NULL,
    schema_version BIGINT      NOT NULL,
    state          JSONB       NOT NULL,
    taken_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Writes one planned batch (see store/src/postgres.rs): takes the writers' lock, checks
-- that the log's last position is still the one the batch was planned on, inserts the
-- events, applies the claim changes, records idempotency keys and notifies readers. Versions, positions and hashes
-- are decided by the writer; this function only refuses a plan made on stale facts, by
-- raising SQLSTATE 'ANS01', which rolls the whole transaction back.
-- Called alone (autocommit) it is a whole append in one round trip; a writer that read
-- its facts under the lock calls it inside that transaction.
CREATE FUNCTION annals_append(
    planned_on_last BIGINT,
    new_last        BIGINT,
    positions       BIGINT[],
    streams         TEXT[],
    categories      TEXT[],
    versions        BIGINT[],
    ids             UUID[],
    types           TEXT[],
    schema_versions BIGINT[],
    data            TEXT[],
    metadata        TEXT[],
    recorded        TIMESTAMPTZ[],
    hashes          BYTEA[],
    released        TEXT[],
    taken_keys      TEXT[],
    taken_streams   TEXT[],
    taken_positions BIGINT[],
    key_names       TEXT[],
    key_hashes      TEXT[],
    key_payloads    TEXT[],
    key_streams     TEXT[],
    key_versions    BIGINT[],
    key_positions   BIGINT[],
    key_recorded    TIMESTAMPTZ[]
) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    inserted BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock(7305218446109532161);
    -- Each statement below sees every commit made before the lock was granted.
    IF (SELECT COALESCE(MAX(position), 0) FROM events) <> planned_on_last THEN
        RAISE EXCEPTION 'the log moved on since the batch was planned' USING ERRCODE = 'ANS01';
    END IF;
    INSERT INTO events (position, stream, category, version, event_id, event_type,
                        schema_version, data, metadata, recorded_at, hash)
    SELECT p, s, c, v, i, t, sv, d::jsonb, m::jsonb, r, h
      FROM unnest(positions, streams, categories, versions, ids, types, schema_versions,
                  data, metadata, recorded, hashes) AS u(p, s, c, v, i, t, sv, d, m, r, h)
    ON CONFLICT (event_id) DO NOTHING;
    GET DIAGNOSTICS inserted = ROW_COUNT;
    IF inserted <> cardinality(positions) THEN
        RAISE EXCEPTION 'an event id of the batch is already stored' USING ERRCODE = 'ANS01';
    END IF;
    DELETE FROM claims WHERE key = ANY(released);
    INSERT INTO claims (key, stream, position)
    SELECT * FROM unnest(taken_keys, taken_streams, taken_positions)
    ON CONFLICT (key) DO UPDATE SET stream = EXCLUDED.stream, position = EXCLUDED.position;
    -- A key stored already fails the insert; the writer then reads it and answers.
    INSERT INTO idempotency_keys (key, request_hash, payload, stream, version, last_position,
                                  recorded_at)
    SELECT k, rh, p::jsonb, s, v, lp, r
      FROM unnest(key_names, key_hashes, key_payloads, key_streams, key_versions,
                  key_positions, key_recorded) AS u(k, rh, p, s, v, lp, r);
    PERFORM pg_notify('annals_events', new_last::text);
    RETURN inserted;
END
$$;
