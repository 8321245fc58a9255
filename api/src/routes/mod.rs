//! The endpoints of `api.md`, by kind.

pub mod commands;
pub mod consumers;
pub mod operations;
pub mod queries;
