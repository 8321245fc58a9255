-- A parked event says which event it is and since when it is parked; an operator may
-- skip it for good, recorded with who and when. A skipped event no longer halts its
-- consumer and is no longer listed as parked, but its record stays. Times are RFC 3339
-- UTC text with microseconds; rows parked before this migration have no `parked_at`.
ALTER TABLE projection_dead_letters ADD COLUMN event_id TEXT;
ALTER TABLE projection_dead_letters ADD COLUMN parked_at TEXT;
ALTER TABLE projection_dead_letters ADD COLUMN skipped_by TEXT;
ALTER TABLE projection_dead_letters ADD COLUMN skipped_at TEXT;

UPDATE projection_dead_letters d
   SET event_id = CAST(e.event_id AS TEXT)
  FROM events e
 WHERE e.position = d.position;
