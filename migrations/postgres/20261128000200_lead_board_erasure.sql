-- lead_board's email and name become nullable: an erased lead shows neither. The table
-- is made again, from the log, when the server next starts (the consumer runner makes a
-- missing read model's table and applies the log from position 0).
DROP TABLE IF EXISTS lead_board;
