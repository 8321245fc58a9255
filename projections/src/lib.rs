//! The projector runtime and the read models: projectors follow the global log and apply
//! each event exactly once, committing their rows and checkpoint in one transaction;
//! read models can be rebuilt from position 0 beside the live ones and verified.
//!
//! Projectors never append events; processes act only through commands. Filled by the
//! projection issue.
