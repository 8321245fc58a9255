//! Black-box tests of the HTTP API: the real `annals serve` binary on port 0, against a
//! temporary SQLite file and a fresh PostgreSQL database, spoken to over HTTP as
//! clients of `api.md` would.

// A test that cannot go on should stop loudly; `unwrap` says so shortest.
#![allow(clippy::unwrap_used)]

#[macro_use]
#[path = "../support/database.rs"]
mod database;
mod server;

mod edge;
mod erasure;
mod errors;
mod faults;
mod flows;
mod leases;
mod operations;
mod orders;
mod parked;
mod process;
mod registry;
mod roles;
mod routing;
