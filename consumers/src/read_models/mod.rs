//! The read models: each folds typed events into rows of its own table (declared once
//! with `row!`), with the domain's own rules, names itself with a constant (`NAME`) and
//! holds its queries. A view that spans aggregates reads the boards that own each fact in
//! one snapshot (`crate::queries::Snapshot`) rather than keeping a copy.
//!
//! Invariant: a read model is a pure function of the log: no clock, no randomness, no
//! other read model's rows while it folds; so a rebuild from position 0 gives the same
//! rows, and verify can compare them.

pub mod account_360;
pub mod deal_board;
pub mod due_timers;
pub mod lead_board;
pub mod lead_response;
pub mod order_board;
pub mod revenue;
pub mod subscription_board;
