-- A rebuild or verify renews its claim on a projection (`rebuilding`) after every batch.
-- A claim not renewed for a while was left by a process that died mid-way; another
-- rebuild may take it over instead of finding the projection busy forever.
ALTER TABLE projections ADD COLUMN rebuild_seen_micros INTEGER;
