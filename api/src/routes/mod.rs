//! The endpoints of `api.md`, by kind.

pub mod commands;
pub mod operations;
pub mod queries;
