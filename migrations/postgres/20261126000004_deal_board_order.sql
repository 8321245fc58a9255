-- The deal board lists deals in the order they were opened; without this index an
-- unfiltered page sorts the whole board.
CREATE INDEX deal_board_opened ON deal_board (generation, opened_micros, deal_id);
