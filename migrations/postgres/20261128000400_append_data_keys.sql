-- A capture's data key is stored by the append's own statement (one round trip, as
-- every other append), not in a transaction around it: annals_append takes the keys of
-- the streams a batch creates, with the check of the master key that wrapped each.
DROP FUNCTION annals_append(BIGINT, BIGINT, BIGINT[], TEXT[], TEXT[], BIGINT[], UUID[],
                            TEXT[], BIGINT[], TEXT[], TEXT[], TIMESTAMPTZ[], BYTEA[],
                            TEXT[], TEXT[], TEXT[], BIGINT[], TEXT[], TEXT[], TEXT[],
                            TEXT[], BIGINT[], BIGINT[], TIMESTAMPTZ[], BYTEA[], BYTEA);

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
    new_log_hash    BYTEA,
    key_subjects    TEXT[],
    key_wrapped     BYTEA[],
    key_checks      BYTEA[]
) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    inserted BIGINT;
    stored   BIGINT;
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
    -- The data keys of the streams this batch creates (no event of theirs exists, so a
    -- key a refused capture left is replaced); never over a tombstone, and never once the
    -- database's master key is not the one the key was wrapped with.
    INSERT INTO data_keys (subject, wrapped, created_at)
    SELECT s, w, COALESCE(recorded[1], now())
      FROM unnest(key_subjects, key_wrapped, key_checks) AS u(s, w, c)
     WHERE EXISTS (SELECT 1 FROM master_key_check WHERE id = 1 AND check_value = c)
    ON CONFLICT (subject) DO UPDATE
       SET wrapped = EXCLUDED.wrapped, created_at = EXCLUDED.created_at
     WHERE data_keys.wrapped IS NOT NULL;
    GET DIAGNOSTICS stored = ROW_COUNT;
    IF stored <> cardinality(key_subjects) THEN
        RAISE EXCEPTION 'a data key of the batch cannot be stored' USING ERRCODE = 'ANS02';
    END IF;
    PERFORM pg_notify('annals_events', new_last::text);
    RETURN inserted;
END
$$;
