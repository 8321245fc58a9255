//! The HTTP interface of Annals and what the `annals` binary runs: the axum server of
//! `api.md` (commands, queries, history, the log, administration), its authentication
//! and metrics, and the system it serves (store, handlers, every consumer of the log).
//!
//! Invariants: only this crate serves HTTP and knows the API's JSON shapes; every error
//! becomes an HTTP answer in `error.rs` alone; business rules stay in `annals-domain` (a
//! handler here only turns a body into a command and looks up the facts a rule needs);
//! `registry` is the one list of the log's consumers.

pub mod auth;
pub mod contract;
pub mod dto;
pub mod edge;
pub mod error;
pub mod extract;
pub mod observe;
pub mod openapi;
pub mod registry;
pub mod routes;
pub mod server;
pub mod system;

pub use auth::Tokens;
pub use error::ApiError;
pub use server::{Settings, openapi, router, serve};
pub use system::{System, consumer_settings};
