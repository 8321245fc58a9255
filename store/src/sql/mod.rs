//! The seam between the SQL backends. What SQLite and PostgreSQL do alike is written here
//! once, over sqlx's `Database`: the store itself (`SqlStore`), its reads, snapshots,
//! idempotency keys, checkpoints, the audit's walks, the upgrade that chains old rows into
//! the log, the writer's connection and the held append of the tests. Each backend's
//! module is only its dialect (`Dialect`): how a write begins and takes the writers' lock,
//! how the facts of a batch are read and the batch inserted, the page query of the log,
//! how its rows are decoded where they differ, and how a time is stored.
//!
//! Statements written here use `$1`-style placeholders, which PostgreSQL and sqlx's
//! SQLite both accept. A new SQL backend is one dialect module, one migrations folder and
//! one line in `open`.
//!
//! The parts, by what each owns:
//! - `param`: the values bound to statements (`Param`), and how any of the databases runs
//!   a statement and reads a column (`Sql`);
//! - `dialect`: what a backend supplies (`Dialect`);
//! - `store`: `SqlStore`, its `EventStore` contract, and the held append of the tests;
//! - `rows`: the log's head, and the store's own rows as every backend decodes them;
//! - `write`: the writer task's side of the database, the commit of a planned batch and
//!   the data keys an append stores or shreds;
//! - `upgrade`: chaining the rows stored before the log chain existed, once.

mod dialect;
mod param;
mod rows;
mod store;
mod upgrade;
mod write;

pub(crate) use dialect::Dialect;
pub use param::Param;
pub(crate) use param::{PREPARED, Sql};
pub(crate) use rows::{idempotency_record, log_head, schema_version};
pub use store::{HeldAppend, SqlStore};
pub(crate) use write::{key_refused, plan_and_commit, shred_keys, store_new_keys};
