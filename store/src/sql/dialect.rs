//! What a SQL backend supplies (`Dialect`): the statements that differ between SQLite
//! and PostgreSQL, how a write begins and takes the writers' lock, how the facts of a
//! batch are read and the batch inserted, the page query of the log, and how its rows
//! and times are decoded where they differ. Everything else is written once, in `sql`.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Param, Sql};
use crate::audit::AuditRow;
use crate::batch::{FactsSource, LogFacts, Plan, ValidAppend};
use crate::chain::Hash;
use crate::error::StoreError;
use crate::model::LogFilter;

/// What a SQL backend supplies: the rest of the store is written once, in this module.
#[async_trait]
pub(crate) trait Dialect: Sql {
    /// The columns an event is decoded from (`event`), as a `SELECT` lists them.
    const EVENT_COLUMNS: &'static str;
    /// Begins a write transaction and takes the writers' lock, held until it ends.
    const BEGIN_WRITE: &'static str;
    /// Begins a read-only transaction whose statements all see one snapshot.
    const BEGIN_SNAPSHOT: &'static str;
    /// `version, schema_version, state` of the snapshot of stream `$1`; the state as text.
    const SELECT_SNAPSHOT: &'static str;
    /// Saves a snapshot: `$1` stream, `$2` version, `$3` schema version, `$4` the state's
    /// canonical text, `$5` when it was taken; an older one than the stored is ignored.
    const SAVE_SNAPSHOT: &'static str;
    /// The columns of an idempotency key (`idempotency_record`), as a `SELECT` lists them.
    const IDEMPOTENCY_COLUMNS: &'static str;
    /// Every stored event as a stream's chain hashes it (`audit_row`), by stream, version.
    const AUDIT_STREAMS: &'static str;
    /// Begins a transaction that writes the tables beside the log (see `tables`).
    const BEGIN_TABLES_WRITE: &'static str;
    /// Whether the statements on the tables beside the log are prepared (see `PREPARED`).
    const PREPARE_TABLE_STATEMENTS: bool;
    /// See `TablesTx::share_lock`.
    const SHARE_LOCK: &'static str;
    /// See `TablesTx::now_micros`: the database's clock, never the process's.
    const NOW_MICROS: &'static str;
    /// The names of the table `$1` and of its indexes, from the catalog (`Tables::schema_of`).
    const SCHEMA_OF: &'static str;
    /// What keeps every other writer from storing a data key until the transaction ends
    /// (`DataKeys::rotate`), where a write transaction does not already.
    const LOCK_DATA_KEYS: Option<&'static str>;
    /// The data keys of the subjects in `$1` (a JSON array of text) that have a row, as
    /// `keys_found` reads them.
    const KEYS_OF: &'static str;
    /// What makes the database drop old images of overwritten pages (`DataKeys::
    /// purge_overwritten`), where there is such a thing.
    const PURGE_OVERWRITTEN: Option<&'static str>;
    /// What comes before a statement to ask how it would run, and the column that says.
    const EXPLAIN: &'static str;
    const EXPLAIN_COLUMN: &'static str;

    /// See `TablesTx::placeholder`.
    fn placeholder(n: usize) -> String;

    /// A time as this backend stores it.
    fn time(at: DateTime<Utc>) -> Param<'static>;
    /// A time column.
    fn read_time(row: &Self::Row, column: &str) -> Result<DateTime<Utc>, StoreError>;
    /// An event id column.
    fn read_event_id(row: &Self::Row) -> Result<Uuid, StoreError>;
    /// How many rows a statement changed.
    fn rows_affected(done: &Self::QueryResult) -> u64;
    /// One row of `AUDIT_STREAMS`.
    fn audit_row(row: &Self::Row) -> Result<AuditRow, StoreError>;

    /// The data keys `KEYS_OF` found, by subject (`None`: shredded): by default one row
    /// each, its `subject` and `wrapped`.
    fn keys_found(rows: &[Self::Row]) -> Result<HashMap<String, Option<Vec<u8>>>, StoreError> {
        rows.iter()
            .map(|row| {
                Ok((
                    Self::required(Self::text, row, "subject")?,
                    Self::bytes(row, "wrapped")?,
                ))
            })
            .collect()
    }

    /// Gets the facts the batch is planned on, from `source`.
    async fn read_facts(
        connection: &mut Self::Connection,
        batch: &[ValidAppend],
        source: FactsSource,
    ) -> Result<LogFacts, StoreError>;

    /// Writes a plan made on the log's last position `planned_on_last`.
    async fn insert(
        connection: &mut Self::Connection,
        planned_on_last: u64,
        plan: &Plan,
    ) -> Result<(), StoreError>;

    /// One write attempt of the writer task (see `BatchWriter::write_attempt`).
    async fn write_attempt(
        connection: &mut Self::Connection,
        batch: &[ValidAppend],
        source: FactsSource,
        remembered: Option<LogFacts>,
    ) -> Result<Option<Plan>, StoreError>;

    /// The events of the log from `from` to `head` that pass `filter`, at most `limit`,
    /// by position.
    async fn read_page(
        connection: &mut Self::Connection,
        from: u64,
        head: u64,
        limit: usize,
        filter: &LogFilter,
    ) -> Result<Vec<Self::Row>, StoreError>;

    /// Stores the log hashes of rows stored before the log chain existed.
    async fn store_log_hashes(
        connection: &mut Self::Connection,
        rows: &[(u64, Hash)],
    ) -> Result<(), StoreError>;
}
