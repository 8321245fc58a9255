-- The indexes the analysts' queries need (projections/src/queries.rs), each led by the
-- generation, as every read-model query is. The columns most leads or deals leave empty
-- are indexed only where set: a query comparing such a column to a value implies it is
-- set, and the index stays small and cheap to write during a rebuild.

-- Account 360: the leads converted into one account, in conversion order.
CREATE INDEX lead_board_converted_account ON lead_board
    (generation, converted_account_id, converted_at, lead_id)
    WHERE converted_account_id IS NOT NULL;

-- The lead list filtered by status, in the list's own order (score descending, then
-- capture time, then id), so a page reads only its own rows.
CREATE INDEX lead_board_status ON lead_board
    (generation, status, score DESC, captured_at, lead_id);

-- The funnel's time window: each step counts the rows whose time for that step falls in
-- the window, and the won step finds each won deal's lead by its converted deal.
CREATE INDEX lead_board_captured ON lead_board (generation, captured_at);
CREATE INDEX lead_board_qualified ON lead_board (generation, qualified_at)
    WHERE qualified_at IS NOT NULL;
CREATE INDEX lead_board_converted ON lead_board (generation, converted_at)
    WHERE converted_at IS NOT NULL;
CREATE INDEX lead_board_converted_deal ON lead_board (generation, converted_deal_id)
    WHERE converted_deal_id IS NOT NULL;
CREATE INDEX deal_board_closed ON deal_board (generation, status, closed_at)
    WHERE closed_at IS NOT NULL;
