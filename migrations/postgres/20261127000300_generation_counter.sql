-- Generations are numbered from a counter that only grows: a claim (a takeover of a
-- stale one included) takes `next_generation` and bumps it in the same statement, so two
-- claimants never share a spare generation. It is above every generation the projection
-- has ever had.
ALTER TABLE projections ADD COLUMN next_generation BIGINT NOT NULL DEFAULT 2;

UPDATE projections
   SET next_generation = 1 + GREATEST(
           live_generation,
           COALESCE(rebuilding, 0),
           COALESCE((SELECT MAX(c.generation) FROM projection_checkpoints c
                      WHERE c.name = projections.name), 0));
