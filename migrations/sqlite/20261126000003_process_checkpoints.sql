-- How far each process (a reaction to events that issues commands, such as the lead
-- conversion) has followed the log. Its effects are commands with idempotency keys
-- derived from the causing event, so a crash between an effect and this checkpoint
-- repeats nothing; a projection rebuild never touches it.
CREATE TABLE process_checkpoints (
    name     TEXT    NOT NULL PRIMARY KEY,
    position INTEGER NOT NULL
);
