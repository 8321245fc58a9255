//! The HTTP interface of Annals and what the `annals` binary runs: the axum server of
//! `api.md` (commands, queries, history, the log, administration), its authentication
//! and metrics, and the system it serves (store, handlers, projections, processes).
//!
//! Invariants: only this crate knows HTTP and JSON shapes; every error becomes an HTTP
//! answer in `error.rs` alone; business rules stay in `annals-domain` (a handler here
//! only turns a body into a command and looks up the facts a rule needs).

pub mod auth;
pub mod contract;
pub mod dto;
pub mod edge;
pub mod error;
pub mod extract;
pub mod observe;
pub mod openapi;
pub mod routes;
pub mod server;
pub mod system;

pub use auth::Tokens;
pub use error::ApiError;
pub use server::{Settings, openapi, router, serve};
pub use system::{System, process_settings};
