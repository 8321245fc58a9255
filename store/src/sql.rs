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

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;
use sqlx::database::HasStatementCache;
use sqlx::pool::PoolConnection;
use sqlx::{
    ColumnIndex, Connection, Database, Decode, Encode, Executor, IntoArguments, Pool, Row,
    Transaction, Type,
};
use tokio::sync::{Mutex, OwnedMutexGuard, watch};
use uuid::Uuid;

use crate::audit::{self, AuditRow, LogRow};
use crate::batch::{self, FactsSource, LogFacts, Plan, ValidAppend};
use crate::chain::{GENESIS, Hash};
use crate::error::StoreError;
use crate::group_commit::{BatchWriter, GroupCommit};
use crate::model::{
    Anchor, AppendOutcome, AppendRequest, AuditReport, Direction, IdempotencyRecord, LogFilter,
    LogPage, RecordedEvent, Snapshot, StreamName, check_snapshot, page, recorded_event, to_sql_int,
};
use crate::{EventStore, StoreConfig};

/// A value bound to a statement's placeholder. Text and integers carry their own NULL,
/// so PostgreSQL knows the type of a missing value.
#[derive(Debug, Clone, PartialEq)]
pub enum Param<'a> {
    Text(Option<Cow<'a, str>>),
    Int(Option<i64>),
    Bytes(&'a [u8]),
    Time(DateTime<Utc>),
}

/// A count or position: numbers cross into SQL as `i64`, and the store never hands out
/// more than `i64::MAX`.
impl From<u64> for Param<'_> {
    fn from(n: u64) -> Self {
        Param::Int(Some(to_sql_int(n)))
    }
}

/// A limit.
impl From<usize> for Param<'_> {
    fn from(n: usize) -> Self {
        Param::Int(Some(i64::try_from(n).unwrap_or(i64::MAX)))
    }
}

impl From<i64> for Param<'_> {
    fn from(n: i64) -> Self {
        Param::Int(Some(n))
    }
}

impl<'a> From<&'a str> for Param<'a> {
    fn from(text: &'a str) -> Self {
        Param::Text(Some(Cow::Borrowed(text)))
    }
}

impl From<String> for Param<'_> {
    fn from(text: String) -> Self {
        Param::Text(Some(Cow::Owned(text)))
    }
}

impl From<Option<String>> for Param<'_> {
    fn from(text: Option<String>) -> Self {
        Param::Text(text.map(Cow::Owned))
    }
}

impl<'a> From<&'a [u8]> for Param<'a> {
    fn from(bytes: &'a [u8]) -> Self {
        Param::Bytes(bytes)
    }
}

/// Whether a statement is prepared once and its plan kept (`true` for the store's own,
/// whose tables' shapes do not change), or planned afresh with its arguments each time.
pub(crate) const PREPARED: bool = true;

/// Runs statements with `Param`s and reads columns, on any database sqlx serves with the
/// types the store uses. The bounds are written once, on the one implementation below.
pub(crate) trait Sql: Database {
    fn fetch_all<'a>(
        connection: &'a mut Self::Connection,
        sql: &'a str,
        params: &'a [Param<'a>],
        prepared: bool,
    ) -> BoxFuture<'a, Result<Vec<Self::Row>, sqlx::Error>>;

    fn fetch_optional<'a>(
        connection: &'a mut Self::Connection,
        sql: &'a str,
        params: &'a [Param<'a>],
        prepared: bool,
    ) -> BoxFuture<'a, Result<Option<Self::Row>, sqlx::Error>>;

    fn fetch<'a>(
        connection: &'a mut Self::Connection,
        sql: &'a str,
    ) -> BoxStream<'a, Result<Self::Row, sqlx::Error>>;

    fn execute<'a>(
        connection: &'a mut Self::Connection,
        sql: &'a str,
        params: &'a [Param<'a>],
        prepared: bool,
    ) -> BoxFuture<'a, Result<Self::QueryResult, sqlx::Error>>;

    fn int(row: &Self::Row, column: &str) -> Result<Option<i64>, sqlx::Error>;
    fn text(row: &Self::Row, column: &str) -> Result<Option<String>, sqlx::Error>;
    fn bytes(row: &Self::Row, column: &str) -> Result<Option<Vec<u8>>, sqlx::Error>;
    /// A JSON column read from the text stored (see `chain`).
    fn json(row: &Self::Row, column: &str) -> Result<Value, StoreError>;
    /// Every column of a row, as text (the statement casts them).
    fn texts(row: &Self::Row) -> Result<Vec<Option<String>>, sqlx::Error>;
    /// The first column of a row, as an integer.
    fn first_int(row: &Self::Row) -> Result<Option<i64>, sqlx::Error>;

    /// A column that may not be NULL.
    fn required<T>(
        read: fn(&Self::Row, &str) -> Result<Option<T>, sqlx::Error>,
        row: &Self::Row,
        column: &str,
    ) -> Result<T, StoreError> {
        read(row, column)?.ok_or_else(|| StoreError::Corrupt(format!("{column} is NULL")))
    }

    /// A count, version or position: never negative.
    fn count(row: &Self::Row, column: &str) -> Result<u64, StoreError> {
        let n = Self::required(Self::int, row, column)?;
        u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("{column} is negative")))
    }
}

impl<DB> Sql for DB
where
    DB: Database + HasStatementCache,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> Option<i64>: Encode<'q, DB>,
    for<'q> Option<&'q str>: Encode<'q, DB>,
    for<'q> i64: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'q> String: Decode<'q, DB> + Type<DB>,
    for<'q> Vec<u8>: Decode<'q, DB> + Type<DB>,
    for<'q> DateTime<Utc>: Encode<'q, DB> + Type<DB>,
    for<'a> &'a str: ColumnIndex<DB::Row>,
    usize: ColumnIndex<DB::Row>,
{
    fn fetch_all<'a>(
        connection: &'a mut DB::Connection,
        sql: &'a str,
        params: &'a [Param<'a>],
        prepared: bool,
    ) -> BoxFuture<'a, Result<Vec<DB::Row>, sqlx::Error>> {
        Box::pin(query::<DB>(sql, params, prepared).fetch_all(connection))
    }

    fn fetch_optional<'a>(
        connection: &'a mut DB::Connection,
        sql: &'a str,
        params: &'a [Param<'a>],
        prepared: bool,
    ) -> BoxFuture<'a, Result<Option<DB::Row>, sqlx::Error>> {
        Box::pin(query::<DB>(sql, params, prepared).fetch_optional(connection))
    }

    fn fetch<'a>(
        connection: &'a mut DB::Connection,
        sql: &'a str,
    ) -> BoxStream<'a, Result<DB::Row, sqlx::Error>> {
        sqlx::query::<DB>(sql).fetch(connection)
    }

    fn execute<'a>(
        connection: &'a mut DB::Connection,
        sql: &'a str,
        params: &'a [Param<'a>],
        prepared: bool,
    ) -> BoxFuture<'a, Result<DB::QueryResult, sqlx::Error>> {
        Box::pin(query::<DB>(sql, params, prepared).execute(connection))
    }

    fn int(row: &DB::Row, column: &str) -> Result<Option<i64>, sqlx::Error> {
        row.try_get(column)
    }

    fn text(row: &DB::Row, column: &str) -> Result<Option<String>, sqlx::Error> {
        row.try_get(column)
    }

    fn bytes(row: &DB::Row, column: &str) -> Result<Option<Vec<u8>>, sqlx::Error> {
        row.try_get(column)
    }

    fn texts(row: &DB::Row) -> Result<Vec<Option<String>>, sqlx::Error> {
        (0..row.len()).map(|i| row.try_get(i)).collect()
    }

    fn first_int(row: &DB::Row) -> Result<Option<i64>, sqlx::Error> {
        row.try_get(0)
    }

    fn json(row: &DB::Row, column: &str) -> Result<Value, StoreError> {
        let text: &str = row.try_get(column)?;
        serde_json::from_str(text).map_err(|_| StoreError::Corrupt(format!("{column} is not JSON")))
    }
}

fn query<'a, DB>(
    sql: &'a str,
    params: &'a [Param<'a>],
    prepared: bool,
) -> sqlx::query::Query<'a, DB, DB::Arguments<'a>>
where
    DB: Database + HasStatementCache,
    for<'q> Option<i64>: Encode<'q, DB>,
    for<'q> Option<&'q str>: Encode<'q, DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'q> DateTime<Utc>: Encode<'q, DB> + Type<DB>,
{
    let query = sqlx::query::<DB>(sql).persistent(prepared);
    params.iter().fold(query, |query, param| match param {
        Param::Int(n) => query.bind(*n),
        Param::Text(text) => query.bind(text.as_deref()),
        Param::Bytes(bytes) => query.bind(*bytes),
        Param::Time(at) => query.bind(*at),
    })
}

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

/// The event store on a SQL database (`crate::SqliteStore`, `crate::PostgresStore`).
#[derive(Debug)]
pub struct SqlStore<DB: Database> {
    pool: Pool<DB>,
    /// Writers of this process take turns here before they begin, where the backend's own
    /// wait would be slow (SQLite: see `sqlite`); `None` where the backend's lock is enough.
    write_gate: Option<Arc<Mutex<()>>>,
    writer: GroupCommit,
    head: watch::Sender<u64>,
    /// Readers waiting on `head` now (test support, see `parked_readers`).
    parked_readers: Arc<AtomicUsize>,
    poll_interval: Duration,
    /// Held so that a task following `head` (PostgreSQL's listener) stops when the last
    /// clone of the store is dropped.
    _alive: Arc<watch::Receiver<u64>>,
}

impl<DB: Database> Clone for SqlStore<DB> {
    fn clone(&self) -> Self {
        SqlStore {
            pool: self.pool.clone(),
            write_gate: self.write_gate.clone(),
            writer: self.writer.clone(),
            head: self.head.clone(),
            parked_readers: self.parked_readers.clone(),
            poll_interval: self.poll_interval,
            _alive: self._alive.clone(),
        }
    }
}

// The dialect is this crate's own: outside it, a store is a `SqliteStore` or a
// `PostgresStore`, whose dialects are implemented here.
#[expect(private_bounds, reason = "only this crate's dialects can be named")]
impl<DB: Dialect> SqlStore<DB> {
    /// Starts the store on a migrated database: chains old rows into the log if the
    /// upgrade left any, then starts the writer on `write_pool`, its own connection.
    pub(crate) async fn start(
        pool: Pool<DB>,
        write_pool: Pool<DB>,
        write_gate: Option<Arc<Mutex<()>>>,
        config: &StoreConfig,
    ) -> Result<Self, StoreError> {
        backfill::<DB>(&pool).await?;
        let (head, alive) = watch::channel(read_head::<DB>(&pool).await?);
        let writer = GroupCommit::start(
            Writer::<DB> {
                pool: write_pool,
                connection: None,
                gate: write_gate.clone().map(|gate| (gate, config.lock_timeout)),
            },
            head.clone(),
            config,
        );
        Ok(SqlStore {
            pool,
            write_gate,
            writer,
            head,
            parked_readers: Arc::default(),
            poll_interval: config.poll_interval,
            _alive: Arc::new(alive),
        })
    }

    /// The connection pool, for code that keeps its own tables in the same database.
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// The gate this process's writers take turns at, if the backend has one.
    pub(crate) fn gate(&self) -> Option<Arc<Mutex<()>>> {
        self.write_gate.clone()
    }

    /// This process's head watch, for a task that learns of other processes' commits.
    pub(crate) fn head_watch(&self) -> watch::Sender<u64> {
        self.head.clone()
    }

    /// Test support: how many `wait_for_events` calls on this store (and its clones) have
    /// read the head, found nothing new, and wait for a commit to wake them.
    #[doc(hidden)]
    pub fn parked_readers(&self) -> usize {
        self.parked_readers.load(Ordering::SeqCst)
    }

    /// Test support: the writer task's probe (see `WriterProbe`).
    #[doc(hidden)]
    pub fn writer_probe(&self) -> &crate::WriterProbe {
        self.writer.probe()
    }

    /// Test support: runs an append in a transaction of its own and leaves it open until
    /// `HeldAppend::commit`, like a writer that is slow to commit. It holds the writers'
    /// lock (and its turn at the gate) meanwhile, exactly as a real append does.
    #[doc(hidden)]
    // Boxed with a concrete lifetime: sqlx futures held across `.await` otherwise fail the
    // higher-ranked `Send` check where a caller spawns this.
    pub fn hold_append(
        &self,
        request: AppendRequest,
    ) -> BoxFuture<'static, Result<HeldAppend<DB>, StoreError>> {
        let store = self.clone();
        Box::pin(async move {
            let append = batch::validate(request)?;
            let turn = match &store.write_gate {
                Some(gate) => Some(gate.clone().lock_owned().await),
                None => None,
            };
            let mut transaction = store.pool.begin_with(DB::BEGIN_WRITE).await?;
            let batch = std::slice::from_ref(&append);
            let facts = DB::read_facts(&mut transaction, batch, FactsSource::ReadWithIds).await?;
            let planned_on_last = facts.last_position;
            let plan = batch::plan(batch, facts, Utc::now());
            DB::insert(&mut transaction, planned_on_last, &plan).await?;
            let outcome = plan
                .outcomes
                .into_iter()
                .next()
                .unwrap_or(Err(StoreError::Closed))?;
            Ok(HeldAppend {
                transaction,
                outcome,
                head: store.head.clone(),
                _turn: turn,
            })
        })
    }

    async fn connection(&self) -> Result<PoolConnection<DB>, StoreError> {
        Ok(self.pool.acquire().await?)
    }
}

/// An append whose transaction is still open (test support).
#[doc(hidden)]
#[derive(Debug)]
pub struct HeldAppend<DB: Database> {
    transaction: Transaction<'static, DB>,
    outcome: AppendOutcome,
    head: watch::Sender<u64>,
    _turn: Option<OwnedMutexGuard<()>>,
}

impl<DB: Database> HeldAppend<DB> {
    pub fn outcome(&self) -> &AppendOutcome {
        &self.outcome
    }

    pub async fn commit(self) -> Result<AppendOutcome, StoreError> {
        self.transaction.commit().await?;
        crate::raise_head(&self.head, self.outcome.last_position());
        Ok(self.outcome)
    }
}

/// What refuses a data key an append would store: its subject was erased, or the
/// database's master key is not the writer's.
pub(crate) fn key_refused(subject: &str) -> StoreError {
    StoreError::MasterKey(format!(
        "the data key of {subject} cannot be stored: its subject was erased, or the \
         database's master key changed while this process ran"
    ))
}

/// Stores the data keys of the streams a plan creates: no event of the subject exists,
/// so a key a refused capture left is replaced; a tombstone is not, and neither is any
/// key once the database's master key is not the writer's (PostgreSQL's
/// `annals_append` does the same in its statement).
pub(crate) async fn store_new_keys<DB: Dialect>(
    connection: &mut DB::Connection,
    plan: &Plan,
) -> Result<(), StoreError> {
    for (subject, wrapped, check) in &plan.new_keys {
        let done = DB::execute(
            connection,
            "INSERT INTO data_keys (subject, wrapped, created_at) \
             SELECT $1, $2, $3 WHERE EXISTS \
                 (SELECT 1 FROM master_key_check WHERE id = 1 AND check_value = $4) \
             ON CONFLICT (subject) DO UPDATE \
                SET wrapped = excluded.wrapped, created_at = excluded.created_at \
              WHERE data_keys.wrapped IS NOT NULL",
            &[
                subject.as_str().into(),
                wrapped.as_slice().into(),
                DB::time(key_time(plan)),
                check.as_slice().into(),
            ],
            PREPARED,
        )
        .await?;
        if DB::rows_affected(&done) == 0 {
            return Err(key_refused(subject));
        }
    }
    Ok(())
}

/// Destroys the data keys a plan shreds: each shredded subject's row keeps no key, and
/// says when (a subject without a row gets one, so a legacy subject is marked erased
/// too).
pub(crate) async fn shred_keys<DB: Dialect>(
    connection: &mut DB::Connection,
    plan: &Plan,
) -> Result<(), StoreError> {
    for subject in &plan.shredded {
        DB::execute(
            connection,
            "INSERT INTO data_keys (subject, wrapped, created_at, shredded_at) \
             VALUES ($1, NULL, $2, $2) \
             ON CONFLICT (subject) DO UPDATE SET wrapped = NULL, shredded_at = excluded.shredded_at",
            &[subject.as_str().into(), DB::time(key_time(plan))],
            PREPARED,
        )
        .await?;
    }
    Ok(())
}

/// When a plan's keys are stored or shredded: when its events are recorded.
fn key_time(plan: &Plan) -> DateTime<Utc> {
    plan.rows
        .first()
        .map_or_else(Utc::now, |row| row.recorded_at)
}

/// Plans the batch on `facts` in the open write transaction, inserts and commits; rolls
/// back and returns `None` when the facts proved too thin (see `BatchWriter`).
pub(crate) async fn plan_and_commit<DB: Dialect>(
    mut transaction: Transaction<'_, DB>,
    batch: &[ValidAppend],
    facts: LogFacts,
    source: FactsSource,
) -> Result<Option<Plan>, StoreError> {
    let planned_on_last = facts.last_position;
    let plan = batch::plan(batch, facts, Utc::now());
    if source != FactsSource::ReadWithIds && plan.needs_stored_ids() {
        transaction.rollback().await?;
        return Ok(None);
    }
    let inserted = DB::insert(&mut transaction, planned_on_last, &plan).await;
    if batch::stale_facts(inserted, source)? {
        transaction.rollback().await?;
        return Ok(None);
    }
    transaction.commit().await?;
    Ok(Some(plan))
}

/// The writer task's side of the database.
struct Writer<DB: Database> {
    pool: Pool<DB>,
    /// Kept between batches (taking it from the pool costs more than a round trip);
    /// dropped, and closed, after any error.
    connection: Option<PoolConnection<DB>>,
    /// The gate and how long the writer waits for its turn there (a writer of this
    /// process that stalls inside its transaction must not stop every other for good).
    gate: Option<(Arc<Mutex<()>>, Duration)>,
}

#[async_trait]
impl<DB: Dialect> BatchWriter for Writer<DB> {
    async fn write_attempt(
        &mut self,
        batch: &[ValidAppend],
        source: FactsSource,
        remembered: Option<LogFacts>,
    ) -> Result<Option<Plan>, StoreError> {
        let _turn = match &self.gate {
            Some((gate, timeout)) => Some(
                tokio::time::timeout(*timeout, gate.lock())
                    .await
                    .map_err(|_| StoreError::timed_out("the wait for the writers' turn ran out"))?,
            ),
            None => None,
        };
        let connection = match &mut self.connection {
            Some(connection) => connection,
            None => self.connection.insert(self.pool.acquire().await?),
        };
        let attempt = DB::write_attempt(connection, batch, source, remembered).await;
        if attempt.is_err()
            && let Some(mut connection) = self.connection.take()
        {
            connection.close_on_drop();
        }
        attempt
    }

    fn reset(&mut self) {
        if let Some(mut connection) = self.connection.take() {
            connection.close_on_drop();
        }
    }
}

const READ_HEAD: &str = "SELECT COALESCE(MAX(position), 0) AS head FROM events";
const LOG_HEAD: &str = "SELECT position, hash FROM log_head WHERE id = 1";

async fn read_head<DB: Dialect>(pool: &Pool<DB>) -> Result<u64, StoreError> {
    let mut connection = pool.acquire().await?;
    let row = DB::fetch_optional(&mut connection, READ_HEAD, &[], PREPARED).await?;
    Ok(match row {
        Some(row) => DB::count(&row, "head")?,
        None => 0,
    })
}

/// The log's head row, as it is stored.
async fn read_log_head<DB: Dialect>(
    connection: &mut DB::Connection,
) -> Result<audit::HeadRow, StoreError> {
    let row = DB::fetch_optional(connection, LOG_HEAD, &[], PREPARED).await?;
    row.map(|row| -> Result<_, StoreError> {
        let position = DB::int(&row, "position")?;
        Ok((
            position.and_then(|p| u64::try_from(p).ok()),
            DB::bytes(&row, "hash")?,
        ))
    })
    .transpose()
}

/// The log's head row: the last position given and its log hash, which must be there.
pub(crate) async fn log_head<DB: Dialect>(
    connection: &mut DB::Connection,
) -> Result<(u64, Hash), StoreError> {
    match read_log_head::<DB>(connection).await? {
        None => Err(StoreError::Corrupt("the log's head row is missing".into())),
        Some((Some(position), Some(hash))) => Ok((
            position,
            hash.as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt("the log's head hash".into()))?,
        )),
        Some(_) => Err(StoreError::Corrupt("the log's head row is empty".into())),
    }
}

/// An event row of `EVENT_COLUMNS`.
fn event<DB: Dialect>(row: &DB::Row) -> Result<RecordedEvent, StoreError> {
    let int = |column| DB::required(DB::int, row, column);
    let text = |column| DB::required(DB::text, row, column);
    recorded_event(
        int("position")?,
        text("stream")?,
        int("version")?,
        DB::read_event_id(row)?,
        text("event_type")?,
        int("schema_version")?,
        DB::json(row, "data")?,
        DB::json(row, "metadata")?,
        DB::read_time(row, "recorded_at")?,
        &DB::required(DB::bytes, row, "hash")?,
    )
}

/// An idempotency key row of `IDEMPOTENCY_COLUMNS`.
pub(crate) fn idempotency_record<DB: Dialect>(
    row: &DB::Row,
) -> Result<IdempotencyRecord, StoreError> {
    let text = |column| DB::required(DB::text, row, column);
    Ok(IdempotencyRecord {
        key: text("key")?,
        request_hash: text("request_hash")?,
        payload: DB::json(row, "payload")?,
        stream: text("stream")?,
        version: DB::count(row, "version")?,
        last_position: DB::count(row, "last_position")?,
        recorded_at: DB::read_time(row, "recorded_at")?,
    })
}

/// A schema version column.
pub(crate) fn schema_version<DB: Dialect>(row: &DB::Row) -> Result<u32, StoreError> {
    let n = DB::required(DB::int, row, "schema_version")?;
    u32::try_from(n).map_err(|_| StoreError::Corrupt("schema version".into()))
}

/// Chains the rows stored before the log chain existed into it, once, when the head row
/// says so (its hash is NULL only between the migration and this): in position order,
/// under the writers' lock (so one process does it, and no append slips in), in one
/// transaction.
async fn backfill<DB: Dialect>(pool: &Pool<DB>) -> Result<(), StoreError> {
    let unchained = |head: audit::HeadRow| matches!(head, Some((_, None)));
    // A plain read first: a store opening beside another process's writer must not wait
    // for the writers' lock when there is nothing to chain (almost always).
    if !unchained(read_log_head::<DB>(&mut *pool.acquire().await?).await?) {
        return Ok(());
    }
    let mut transaction = pool.begin_with(DB::BEGIN_WRITE).await?;
    if !unchained(read_log_head::<DB>(&mut transaction).await?) {
        transaction.rollback().await?;
        return Ok(());
    }
    let mut previous = GENESIS;
    let mut last = 0;
    loop {
        let rows = DB::fetch_all(
            &mut transaction,
            "SELECT position, category, hash FROM events WHERE position > $1 \
              ORDER BY position LIMIT 10000",
            &[last.into()],
            PREPARED,
        )
        .await?;
        let rows = rows
            .iter()
            .map(|row| {
                Ok((
                    DB::count(row, "position")?,
                    DB::required(DB::text, row, "category")?,
                    DB::required(DB::bytes, row, "hash")?,
                ))
            })
            .collect::<Result<Vec<(u64, String, Vec<u8>)>, StoreError>>()?;
        let Some((end, _, _)) = rows.last() else {
            break;
        };
        last = *end;
        let hashes = audit::chain_rows(&mut previous, &rows);
        let chained: Vec<(u64, Hash)> = rows.iter().map(|(p, _, _)| *p).zip(hashes).collect();
        DB::store_log_hashes(&mut transaction, &chained).await?;
    }
    DB::execute(
        &mut transaction,
        "UPDATE log_head SET position = $1, hash = $2 WHERE id = 1",
        &[last.into(), previous.as_slice().into()],
        PREPARED,
    )
    .await?;
    transaction.commit().await?;
    Ok(())
}

#[async_trait]
impl<DB: Dialect> EventStore for SqlStore<DB> {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        self.writer.append(batch::validate(request)?).await
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        from_version: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let columns = DB::EVENT_COLUMNS;
        let sql = match direction {
            Direction::Forwards => format!(
                "SELECT {columns} FROM events WHERE stream = $1 AND version >= $2 \
                 ORDER BY version LIMIT $3"
            ),
            Direction::Backwards => format!(
                "SELECT {columns} FROM events WHERE stream = $1 AND version <= $2 \
                 ORDER BY version DESC LIMIT $3"
            ),
        };
        let params = [stream.as_str().into(), from_version.into(), limit.into()];
        let rows = DB::fetch_all(&mut *self.connection().await?, &sql, &params, PREPARED).await?;
        rows.iter().map(event::<DB>).collect()
    }

    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
        filter: &LogFilter,
    ) -> Result<LogPage, StoreError> {
        let from = from_position.max(1);
        // The head is read first: every position up to it is committed (positions are
        // given in commit order), so the page below sees all of them.
        let head = read_head::<DB>(&self.pool).await?;
        let mut connection = self.connection().await?;
        let rows = DB::read_page(&mut connection, from, head, limit, filter).await?;
        let events = rows
            .iter()
            .map(event::<DB>)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page(events, from, limit, head))
    }

    async fn head(&self) -> Result<u64, StoreError> {
        read_head::<DB>(&self.pool).await
    }

    async fn wait_for_events(&self, after: u64, timeout: Duration) -> Result<u64, StoreError> {
        crate::wait_for_head(
            &self.head,
            &self.parked_readers,
            after,
            timeout,
            self.poll_interval,
            || read_head::<DB>(&self.pool),
        )
        .await
    }

    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        check_snapshot(snapshot)?;
        let state = crate::chain::canonical_json(&snapshot.state);
        let params = [
            snapshot.stream.as_str().into(),
            snapshot.version.into(),
            u64::from(snapshot.schema_version).into(),
            state.as_str().into(),
            DB::time(Utc::now()),
        ];
        DB::execute(
            &mut *self.connection().await?,
            DB::SAVE_SNAPSHOT,
            &params,
            PREPARED,
        )
        .await?;
        Ok(())
    }

    async fn load_snapshot(&self, stream: &StreamName) -> Result<Option<Snapshot>, StoreError> {
        let params = [stream.as_str().into()];
        let row = DB::fetch_optional(
            &mut *self.connection().await?,
            DB::SELECT_SNAPSHOT,
            &params,
            PREPARED,
        )
        .await?;
        row.map(|row| {
            Ok(Snapshot {
                stream: stream.as_str().to_owned(),
                version: DB::count(&row, "version")?,
                schema_version: schema_version::<DB>(&row)
                    .map_err(|_| StoreError::Corrupt("snapshot schema version".into()))?,
                state: DB::json(&row, "state")?,
            })
        })
        .transpose()
    }

    async fn find_idempotency(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        let sql = format!(
            "SELECT {} FROM idempotency_keys WHERE key = $1",
            DB::IDEMPOTENCY_COLUMNS
        );
        let row = DB::fetch_optional(
            &mut *self.connection().await?,
            &sql,
            &[key.into()],
            PREPARED,
        )
        .await?;
        row.as_ref().map(idempotency_record::<DB>).transpose()
    }

    async fn purge_idempotency(&self, recorded_before: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = DB::execute(
            &mut *self.connection().await?,
            "DELETE FROM idempotency_keys WHERE recorded_at < $1",
            &[DB::time(recorded_before)],
            PREPARED,
        )
        .await?;
        Ok(DB::rows_affected(&done))
    }

    async fn verify(&self) -> Result<AuditReport, StoreError> {
        // One snapshot for both walks and the head row.
        let mut connection = self.connection().await?;
        let mut transaction = connection.begin_with(DB::BEGIN_SNAPSHOT).await?;
        let head = read_log_head::<DB>(&mut transaction).await?;
        let report = audit::walk_streams(
            DB::fetch(&mut transaction, DB::AUDIT_STREAMS)
                .map_err(StoreError::from)
                .and_then(|row| async move { DB::audit_row(&row) }),
        )
        .await?;
        let log = audit::walk_log(
            DB::fetch(
                &mut transaction,
                "SELECT position, stream, version, category, hash, log_hash \
                   FROM events ORDER BY position",
            )
            .map(|row| {
                let row = row?;
                Ok(LogRow {
                    position: DB::count(&row, "position")?,
                    stream: DB::required(DB::text, &row, "stream")?,
                    version: DB::count(&row, "version")?,
                    category: DB::required(DB::text, &row, "category")?,
                    hash: DB::required(DB::bytes, &row, "hash")?,
                    log_hash: DB::bytes(&row, "log_hash")?,
                })
            }),
            head,
        )
        .await?;
        transaction.rollback().await?;
        Ok(audit::combine(report, log))
    }

    async fn anchor(&self) -> Result<Anchor, StoreError> {
        let (position, hash) = log_head::<DB>(&mut *self.connection().await?).await?;
        Ok(Anchor {
            position,
            hash: hex::encode(hash),
        })
    }

    async fn find_anchor(&self, hash: &str) -> Result<Option<u64>, StoreError> {
        let Ok(hash) = hex::decode(hash) else {
            return Ok(None);
        };
        if hash == GENESIS {
            return Ok(Some(0));
        }
        let row = DB::fetch_optional(
            &mut *self.connection().await?,
            "SELECT position FROM events WHERE log_hash = $1 LIMIT 1",
            &[hash.as_slice().into()],
            PREPARED,
        )
        .await?;
        row.map(|row| DB::count(&row, "position")).transpose()
    }
}
