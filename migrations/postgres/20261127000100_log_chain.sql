-- The log's own hash chain (see store/src/chain.rs and audit.rs), its head row, and the
-- JSON text the chains are computed over.
--
-- `log_hash` links each event to its position, its category and the event before it in
-- the log. Rows stored before this migration have none until the store, when it opens
-- the database, chains them in position order (under the writers' lock, once): the head
-- row's NULL hash below is what tells it to.
--
-- `data_text` and `metadata_text` keep the JSON exactly as it was hashed: `jsonb` keeps
-- numbers as decimals and writes them its own way (`1e16` comes back as
-- `10000000000000000`, `-0.0` as `0`), so hashing what `jsonb` gives back reported
-- untouched rows as tampered. Rows stored before this migration have NULL here and are
-- checked as before, against the canonical rendering of their `jsonb`.
ALTER TABLE events
    ADD COLUMN log_hash      BYTEA,
    ADD COLUMN data_text     TEXT,
    ADD COLUMN metadata_text TEXT;

-- One row: the last position given and its log hash, written in every append's
-- transaction. The writer takes the next position from here, not from MAX(position), so
-- a position is never given twice, even after its row was deleted.
CREATE TABLE log_head (
    id       SMALLINT NOT NULL PRIMARY KEY CHECK (id = 1),
    position BIGINT CHECK (position >= 0),
    hash     BYTEA
);

INSERT INTO log_head (id, position, hash) VALUES (1, NULL, NULL);

-- The writer's function, as in 20261126000001_event_store.sql, but checking the plan
-- against the head row, writing the JSON text and the log hashes, and moving the head
-- row. The old signature is dropped so that a process of the previous version fails
-- loudly instead of appending around the log chain.
DROP FUNCTION annals_append(BIGINT, BIGINT, BIGINT[], TEXT[], TEXT[], BIGINT[], UUID[],
                            TEXT[], BIGINT[], TEXT[], TEXT[], TIMESTAMPTZ[], BYTEA[],
                            TEXT[], TEXT[], TEXT[], BIGINT[], TEXT[], TEXT[], TEXT[],
                            TEXT[], BIGINT[], BIGINT[], TIMESTAMPTZ[]);

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
    key_recorded    TIMESTAMPTZ[],
    log_hashes      BYTEA[],
    new_log_hash    BYTEA
) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    inserted BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock(7305218446109532161);
    -- Each statement below sees every commit made before the lock was granted.
    IF (SELECT position FROM log_head WHERE id = 1) IS DISTINCT FROM planned_on_last THEN
        RAISE EXCEPTION 'the log moved on since the batch was planned' USING ERRCODE = 'ANS01';
    END IF;
    INSERT INTO events (position, stream, category, version, event_id, event_type,
                        schema_version, data, metadata, recorded_at, hash, log_hash,
                        data_text, metadata_text)
    SELECT p, s, c, v, i, t, sv, d::jsonb, m::jsonb, r, h, lh, d, m
      FROM unnest(positions, streams, categories, versions, ids, types, schema_versions,
                  data, metadata, recorded, hashes, log_hashes)
           AS u(p, s, c, v, i, t, sv, d, m, r, h, lh)
    ON CONFLICT (event_id) DO NOTHING;
    GET DIAGNOSTICS inserted = ROW_COUNT;
    IF inserted <> cardinality(positions) THEN
        RAISE EXCEPTION 'an event id of the batch is already stored' USING ERRCODE = 'ANS01';
    END IF;
    UPDATE log_head SET position = new_last, hash = new_log_hash WHERE id = 1;
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
