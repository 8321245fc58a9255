//! The SQLite backend: the embedded default, one file in WAL mode with
//! `synchronous=FULL`, so an acknowledged append survives a power cut.
//!
//! SQLite lets one writer in at a time (`BEGIN IMMEDIATE`), so positions are handed out in
//! commit order. One process owns the file: waiting readers are woken by this process's
//! writer, and by polling for anything else.
//!
//! A writer's waits are bounded by `StoreConfig::lock_timeout`: its turn at this process's
//! write gate, and SQLite's busy timeout on the file; past it the append fails as
//! `Unavailable` (no server can end a stalled holder here, so the waiters give up instead).

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde_json::Value;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Connection, Row, Sqlite, SqliteConnection, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard, watch};
use uuid::Uuid;

use crate::audit::{self, AuditRow, LogRow};
use crate::batch::{self, FactsSource, LogFacts, Plan, StoredEvent, ValidAppend};
use crate::chain::{GENESIS, Hash};
use crate::error::StoreError;
use crate::group_commit::{BatchWriter, GroupCommit};
use crate::model::{
    Anchor, AppendOutcome, AppendRequest, AuditReport, Direction, IdempotencyRecord, LogFilter,
    LogPage, RecordedEvent, Snapshot, StreamName, check_snapshot, page, recorded_event, to_sql_int,
};
use crate::{EventStore, StoreConfig};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

const EVENT_COLUMNS: &str = "position, stream, version, event_id, event_type, schema_version, \
                             data, metadata, recorded_at, hash";

/// The event store on SQLite.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Writers of this process take turns here, in order, before `BEGIN IMMEDIATE`:
    /// SQLite's own busy handler would make a waiting writer sleep in growing steps
    /// (up to 100 ms), which showed as tail latency of appends and projections alike.
    write_gate: Arc<Mutex<()>>,
    writer: GroupCommit,
    head: watch::Sender<u64>,
    /// Readers waiting on `head` now (test support, see `parked_readers`).
    parked_readers: Arc<AtomicUsize>,
    poll_interval: Duration,
}

impl SqliteStore {
    /// Opens (creating it when missing) the database file a `sqlite:` URL names, with WAL
    /// and `synchronous=FULL`, and applies pending migrations.
    pub async fn open(url: &str, config: StoreConfig) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?.create_if_missing(true);
        Self::open_with(options, config).await
    }

    /// Opens with the caller's connection options. WAL, `synchronous=FULL` and a busy
    /// timeout of `StoreConfig::lock_timeout` are always set, whatever the options say:
    /// an append is acknowledged only once it is durable, and the library's default level
    /// is a build setting (`SQLITE_DEFAULT_WAL_SYNCHRONOUS`), not something to rely on.
    pub async fn open_with(
        options: SqliteConnectOptions,
        config: StoreConfig,
    ) -> Result<Self, StoreError> {
        let options = options
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(config.lock_timeout);
        let pool = SqlitePoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .connect_with(options.clone())
            .await?;
        MIGRATOR.run(&pool).await?;
        backfill(&pool).await?;
        let write_pool = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        let head = watch::Sender::new(read_head(&pool).await?);
        let write_gate = Arc::new(Mutex::new(()));
        let writer = GroupCommit::start(
            SqliteWriter {
                pool: write_pool,
                connection: None,
                gate: write_gate.clone(),
                gate_timeout: config.lock_timeout,
            },
            head.clone(),
            &config,
        );
        Ok(SqliteStore {
            pool,
            write_gate,
            writer,
            head,
            parked_readers: Arc::default(),
            poll_interval: config.poll_interval,
        })
    }

    /// The connection pool, for code that keeps its own tables in the same database.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Where this process's writers queue for the database (see the field); code that
    /// writes through `pool` in transactions takes its turn here first.
    pub fn write_gate(&self) -> Arc<Mutex<()>> {
        self.write_gate.clone()
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
    /// `HeldAppend::commit`, like a writer that is slow to commit.
    #[doc(hidden)]
    // Boxed with a concrete lifetime: sqlx futures held across `.await` otherwise fail the
    // higher-ranked `Send` check where a caller spawns this.
    pub fn hold_append(
        &self,
        request: AppendRequest,
    ) -> futures::future::BoxFuture<'static, Result<HeldAppend, StoreError>> {
        let store = self.clone();
        Box::pin(async move {
            let append = batch::validate(request)?;
            let turn = store.write_gate.clone().lock_owned().await;
            let mut transaction = store.pool.begin_with("BEGIN IMMEDIATE").await?;
            let batch = std::slice::from_ref(&append);
            let facts = read_facts(&mut transaction, batch, FactsSource::ReadWithIds).await?;
            let plan = batch::plan(batch, facts, Utc::now());
            insert(&mut transaction, &plan).await?;
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
}

/// An append whose transaction is still open (test support).
#[doc(hidden)]
#[derive(Debug)]
pub struct HeldAppend {
    transaction: Transaction<'static, Sqlite>,
    outcome: AppendOutcome,
    head: watch::Sender<u64>,
    _turn: OwnedMutexGuard<()>,
}

impl HeldAppend {
    pub fn outcome(&self) -> &AppendOutcome {
        &self.outcome
    }

    pub async fn commit(self) -> Result<AppendOutcome, StoreError> {
        self.transaction.commit().await?;
        let last = self.outcome.last_position();
        crate::raise_head(&self.head, last);
        Ok(self.outcome)
    }
}

async fn read_head(pool: &SqlitePool) -> Result<u64, StoreError> {
    let head: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM events")
        .fetch_one(pool)
        .await?;
    Ok(u64::try_from(head).unwrap_or(0))
}

struct SqliteWriter {
    pool: SqlitePool,
    /// Kept between batches (taking it from the pool costs more than a round trip);
    /// dropped, and closed, after any error.
    connection: Option<PoolConnection<Sqlite>>,
    gate: Arc<Mutex<()>>,
    /// How long the writer waits for its turn at the gate (a writer of this process that
    /// stalls inside its transaction must not stop every other for good).
    gate_timeout: Duration,
}

#[async_trait]
impl BatchWriter for SqliteWriter {
    async fn write_attempt(
        &mut self,
        batch: &[ValidAppend],
        source: FactsSource,
        remembered: Option<LogFacts>,
    ) -> Result<Option<Plan>, StoreError> {
        let _turn = tokio::time::timeout(self.gate_timeout, self.gate.lock())
            .await
            .map_err(|_| StoreError::timed_out("the wait for the writers' turn ran out"))?;
        let connection = match &mut self.connection {
            Some(connection) => connection,
            None => self.connection.insert(self.pool.acquire().await?),
        };
        let attempt = write_attempt(connection, batch, source, remembered).await;
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

async fn write_attempt(
    connection: &mut SqliteConnection,
    batch: &[ValidAppend],
    source: FactsSource,
    remembered: Option<LogFacts>,
) -> Result<Option<Plan>, StoreError> {
    let mut transaction = connection.begin_with("BEGIN IMMEDIATE").await?;
    let facts = match remembered {
        Some(facts) => {
            // Another writer (another process on the file) may have moved the head
            // since; one read of the head row, in process, settles it.
            if read_log_head(&mut transaction).await?.0 != facts.last_position {
                transaction.rollback().await?;
                return Ok(None);
            }
            facts
        }
        None => read_facts(&mut transaction, batch, source).await?,
    };
    let plan = batch::plan(batch, facts, Utc::now());
    if source != FactsSource::ReadWithIds && plan.needs_stored_ids() {
        transaction.rollback().await?;
        return Ok(None);
    }
    if batch::stale_facts(insert(&mut transaction, &plan).await, source)? {
        transaction.rollback().await?;
        return Ok(None);
    }
    transaction.commit().await?;
    Ok(Some(plan))
}

fn json_list<T: serde::Serialize>(items: &[T]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".to_owned())
}

async fn read_facts(
    connection: &mut SqliteConnection,
    batch: &[ValidAppend],
    source: FactsSource,
) -> Result<LogFacts, StoreError> {
    let wanted = LogFacts::wanted(batch);
    let mut facts = LogFacts::default();

    let heads = sqlx::query(
        "SELECT e.stream, e.version, e.hash FROM json_each(?1) AS s \
           JOIN events AS e ON e.stream = s.value \
            AND e.version = (SELECT MAX(version) FROM events WHERE stream = s.value)",
    )
    .bind(json_list(&wanted.streams))
    .fetch_all(&mut *connection)
    .await?;
    for row in heads {
        let hash: Vec<u8> = row.try_get("hash")?;
        let hash: Hash = hash
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::Corrupt("hash of a stream head".into()))?;
        facts
            .heads
            .insert(row.try_get("stream")?, (sql_u64(&row, "version")?, hash));
    }

    let stored = if source != FactsSource::ReadWithIds {
        Vec::new()
    } else {
        sqlx::query(
            "SELECT event_id, stream, version, position, event_type, schema_version, data \
           FROM events WHERE event_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(json_list(&wanted.event_ids))
        .fetch_all(&mut *connection)
        .await?
    };
    for row in stored {
        let id = parse_uuid(&row)?;
        facts.stored.insert(
            id,
            StoredEvent {
                stream: row.try_get("stream")?,
                version: sql_u64(&row, "version")?,
                position: sql_u64(&row, "position")?,
                event_type: row.try_get("event_type")?,
                schema_version: u32::try_from(row.try_get::<i64, _>("schema_version")?)
                    .map_err(|_| StoreError::Corrupt(format!("schema of {id}")))?,
                // Stored as canonical text already.
                data: row.try_get("data")?,
            },
        );
    }

    if !wanted.claim_keys.is_empty() {
        let claims = sqlx::query(
            "SELECT key, stream FROM claims WHERE key IN (SELECT value FROM json_each(?1))",
        )
        .bind(json_list(&wanted.claim_keys))
        .fetch_all(&mut *connection)
        .await?;
        for row in claims {
            facts
                .claims
                .insert(row.try_get("key")?, row.try_get("stream")?);
        }
    }

    if source == FactsSource::ReadWithIds && !wanted.idempotency_keys.is_empty() {
        let records = sqlx::query(&format!(
            "SELECT {IDEMPOTENCY_COLUMNS} FROM idempotency_keys \
              WHERE key IN (SELECT value FROM json_each(?1))"
        ))
        .bind(json_list(&wanted.idempotency_keys))
        .fetch_all(&mut *connection)
        .await?;
        for row in records {
            let record = idempotency_from_row(&row)?;
            facts.idempotency.insert(record.key.clone(), record);
        }
    }

    (facts.last_position, facts.last_log_hash) = read_log_head(connection).await?;
    Ok(facts)
}

/// The log's head row: the last position given and its log hash.
async fn read_log_head(connection: &mut SqliteConnection) -> Result<(u64, Hash), StoreError> {
    let row = sqlx::query("SELECT position, hash FROM log_head WHERE id = 1")
        .fetch_optional(&mut *connection)
        .await?
        .ok_or_else(|| StoreError::Corrupt("the log's head row is missing".into()))?;
    let position: Option<i64> = row.try_get("position")?;
    let hash: Option<Vec<u8>> = row.try_get("hash")?;
    match (position.and_then(|p| u64::try_from(p).ok()), hash) {
        (Some(position), Some(hash)) => Ok((
            position,
            hash.as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt("the log's head hash".into()))?,
        )),
        _ => Err(StoreError::Corrupt("the log's head row is empty".into())),
    }
}

/// Chains the rows stored before the log chain existed into it, once, when the head row
/// says so (its hash is NULL only between the migration and this): in position order,
/// under the write lock, in one transaction.
async fn backfill(pool: &SqlitePool) -> Result<(), StoreError> {
    // A plain read first: a store opening beside another process's writer must not wait
    // for the write lock when there is nothing to chain (almost always).
    let head: Option<Option<Vec<u8>>> =
        sqlx::query_scalar("SELECT hash FROM log_head WHERE id = 1")
            .fetch_optional(pool)
            .await?;
    if !matches!(head, Some(None)) {
        return Ok(());
    }
    let mut transaction = pool.begin_with("BEGIN IMMEDIATE").await?;
    let pending: Option<Option<Vec<u8>>> =
        sqlx::query_scalar("SELECT hash FROM log_head WHERE id = 1")
            .fetch_optional(&mut *transaction)
            .await?;
    if !matches!(pending, Some(None)) {
        transaction.rollback().await?;
        return Ok(());
    }
    let mut previous = GENESIS;
    let mut last = 0;
    loop {
        let rows = sqlx::query(
            "SELECT position, category, hash FROM events WHERE position > ?1 \
              ORDER BY position LIMIT 10000",
        )
        .bind(to_sql_int(last))
        .fetch_all(&mut *transaction)
        .await?;
        if rows.is_empty() {
            break;
        }
        let rows = rows
            .iter()
            .map(|row| {
                Ok((
                    sql_u64(row, "position")?,
                    row.try_get("category")?,
                    row.try_get("hash")?,
                ))
            })
            .collect::<Result<Vec<(u64, String, Vec<u8>)>, StoreError>>()?;
        let hashes = audit::chain_rows(&mut previous, &rows);
        for ((position, _, _), hash) in rows.iter().zip(&hashes) {
            sqlx::query("UPDATE events SET log_hash = ?1 WHERE position = ?2")
                .bind(hash.as_slice())
                .bind(to_sql_int(*position))
                .execute(&mut *transaction)
                .await?;
            last = *position;
        }
    }
    sqlx::query("UPDATE log_head SET position = ?1, hash = ?2 WHERE id = 1")
        .bind(to_sql_int(last))
        .bind(previous.as_slice())
        .execute(&mut *transaction)
        .await?;
    transaction.commit().await?;
    Ok(())
}

fn parse_uuid(row: &SqliteRow) -> Result<Uuid, StoreError> {
    let text: &str = row.try_get("event_id")?;
    Uuid::parse_str(text).map_err(|_| StoreError::Corrupt(format!("event id {text:?}")))
}

fn sql_u64(row: &SqliteRow, column: &str) -> Result<u64, StoreError> {
    let n: i64 = row.try_get(column)?;
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("{column} is negative")))
}

async fn insert(connection: &mut SqliteConnection, plan: &Plan) -> Result<(), StoreError> {
    for row in &plan.rows {
        sqlx::query(
            "INSERT INTO events (position, stream, category, version, event_id, event_type, \
                                 schema_version, data, metadata, recorded_at, hash, log_hash) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )
        .bind(to_sql_int(row.position))
        .bind(&row.stream)
        .bind(&row.category)
        .bind(to_sql_int(row.version))
        .bind(row.event_id.hyphenated().to_string())
        .bind(&row.event_type)
        .bind(i64::from(row.schema_version))
        .bind(&row.data)
        .bind(&row.metadata)
        .bind(row.recorded_at.timestamp_micros())
        .bind(row.hash.as_slice())
        .bind(row.log_hash.as_slice())
        .execute(&mut *connection)
        .await?;
    }
    if !plan.rows.is_empty() {
        sqlx::query("UPDATE log_head SET position = ?1, hash = ?2 WHERE id = 1")
            .bind(to_sql_int(plan.last_position))
            .bind(plan.last_log_hash.as_slice())
            .execute(&mut *connection)
            .await?;
    }
    for key in &plan.claims_released {
        sqlx::query("DELETE FROM claims WHERE key = ?1")
            .bind(key)
            .execute(&mut *connection)
            .await?;
    }
    for record in &plan.idempotency {
        sqlx::query(
            "INSERT INTO idempotency_keys (key, request_hash, payload, stream, version, \
                                           last_position, recorded_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .bind(&record.key)
        .bind(&record.request_hash)
        .bind(crate::chain::canonical_json(&record.payload))
        .bind(&record.stream)
        .bind(to_sql_int(record.version))
        .bind(to_sql_int(record.last_position))
        .bind(record.recorded_at.timestamp_micros())
        .execute(&mut *connection)
        .await?;
    }
    for (key, stream, position) in &plan.claims_taken {
        sqlx::query(
            "INSERT INTO claims (key, stream, position) VALUES (?1, ?2, ?3) \
             ON CONFLICT (key) DO UPDATE SET stream = excluded.stream, position = excluded.position",
        )
        .bind(key)
        .bind(stream)
        .bind(to_sql_int(*position))
        .execute(&mut *connection)
        .await?;
    }
    Ok(())
}

const IDEMPOTENCY_COLUMNS: &str =
    "key, request_hash, payload, stream, version, last_position, recorded_at";

fn idempotency_from_row(row: &SqliteRow) -> Result<IdempotencyRecord, StoreError> {
    Ok(IdempotencyRecord {
        key: row.try_get("key")?,
        request_hash: row.try_get("request_hash")?,
        payload: parse_json(row, "payload")?,
        stream: row.try_get("stream")?,
        version: sql_u64(row, "version")?,
        last_position: sql_u64(row, "last_position")?,
        recorded_at: micros_to_time(row.try_get("recorded_at")?)?,
    })
}

fn micros_to_time(micros: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| StoreError::Corrupt(format!("recorded_at {micros}")))
}

fn parse_json(row: &SqliteRow, column: &str) -> Result<Value, StoreError> {
    let text: &str = row.try_get(column)?;
    serde_json::from_str(text).map_err(|_| StoreError::Corrupt(format!("{column} is not JSON")))
}

fn event_from_row(row: &SqliteRow) -> Result<RecordedEvent, StoreError> {
    let hash: Vec<u8> = row.try_get("hash")?;
    recorded_event(
        row.try_get("position")?,
        row.try_get("stream")?,
        row.try_get("version")?,
        parse_uuid(row)?,
        row.try_get("event_type")?,
        row.try_get("schema_version")?,
        parse_json(row, "data")?,
        parse_json(row, "metadata")?,
        micros_to_time(row.try_get("recorded_at")?)?,
        &hash,
    )
}

fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

#[async_trait]
impl EventStore for SqliteStore {
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
        let sql = match direction {
            Direction::Forwards => format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE stream = ?1 AND version >= ?2 \
                 ORDER BY version LIMIT ?3"
            ),
            Direction::Backwards => format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE stream = ?1 AND version <= ?2 \
                 ORDER BY version DESC LIMIT ?3"
            ),
        };
        let rows = sqlx::query(&sql)
            .bind(stream.as_str())
            .bind(to_sql_int(from_version))
            .bind(sql_limit(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
        filter: &LogFilter,
    ) -> Result<LogPage, StoreError> {
        let from = from_position.max(1);
        let head = read_head(&self.pool).await?;
        let rows = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM events \
              WHERE position >= ?1 AND position <= ?2 \
                AND (json_array_length(?3) = 0 OR event_type IN (SELECT value FROM json_each(?3))) \
                AND (json_array_length(?4) = 0 OR category IN (SELECT value FROM json_each(?4))) \
              ORDER BY position LIMIT ?5"
        ))
        .bind(to_sql_int(from))
        .bind(to_sql_int(head))
        .bind(json_list(&filter.event_types))
        .bind(json_list(&filter.categories))
        .bind(sql_limit(limit))
        .fetch_all(&self.pool)
        .await?;
        let events = rows
            .iter()
            .map(event_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page(events, from, limit, head))
    }

    async fn head(&self) -> Result<u64, StoreError> {
        read_head(&self.pool).await
    }

    async fn wait_for_events(&self, after: u64, timeout: Duration) -> Result<u64, StoreError> {
        crate::wait_for_head(
            &self.head,
            &self.parked_readers,
            after,
            timeout,
            self.poll_interval,
            || read_head(&self.pool),
        )
        .await
    }

    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        check_snapshot(snapshot)?;
        sqlx::query(
            "INSERT INTO snapshots (stream, version, schema_version, state, taken_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (stream) DO UPDATE \
                SET version = excluded.version, schema_version = excluded.schema_version, \
                    state = excluded.state, taken_at = excluded.taken_at \
              WHERE snapshots.version <= excluded.version",
        )
        .bind(&snapshot.stream)
        .bind(to_sql_int(snapshot.version))
        .bind(i64::from(snapshot.schema_version))
        .bind(crate::chain::canonical_json(&snapshot.state))
        .bind(Utc::now().timestamp_micros())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn load_snapshot(&self, stream: &StreamName) -> Result<Option<Snapshot>, StoreError> {
        let row =
            sqlx::query("SELECT version, schema_version, state FROM snapshots WHERE stream = ?1")
                .bind(stream.as_str())
                .fetch_optional(&self.pool)
                .await?;
        row.map(|row| {
            Ok(Snapshot {
                stream: stream.as_str().to_owned(),
                version: sql_u64(&row, "version")?,
                schema_version: u32::try_from(row.try_get::<i64, _>("schema_version")?)
                    .map_err(|_| StoreError::Corrupt("snapshot schema version".into()))?,
                state: parse_json(&row, "state")?,
            })
        })
        .transpose()
    }

    async fn find_idempotency(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {IDEMPOTENCY_COLUMNS} FROM idempotency_keys WHERE key = ?1"
        ))
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(idempotency_from_row).transpose()
    }

    async fn purge_idempotency(&self, recorded_before: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM idempotency_keys WHERE recorded_at < ?1")
            .bind(recorded_before.timestamp_micros())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn load_checkpoint(&self, process: &str) -> Result<u64, StoreError> {
        let position: Option<i64> =
            sqlx::query_scalar("SELECT position FROM process_checkpoints WHERE name = ?1")
                .bind(process)
                .fetch_optional(&self.pool)
                .await?;
        Ok(position.and_then(|p| u64::try_from(p).ok()).unwrap_or(0))
    }

    async fn save_checkpoint(&self, process: &str, position: u64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO process_checkpoints (name, position) VALUES (?1, ?2) \
             ON CONFLICT (name) DO UPDATE SET position = excluded.position \
              WHERE process_checkpoints.position < excluded.position",
        )
        .bind(process)
        .bind(to_sql_int(position))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn verify(&self) -> Result<AuditReport, StoreError> {
        // One read transaction: both walks and the head row see one snapshot.
        let mut transaction = self.pool.begin().await?;
        let head: audit::HeadRow = sqlx::query("SELECT position, hash FROM log_head WHERE id = 1")
            .fetch_optional(&mut *transaction)
            .await?
            .map(|row| -> Result<_, StoreError> {
                let position: Option<i64> = row.try_get("position")?;
                Ok((
                    position.and_then(|p| u64::try_from(p).ok()),
                    row.try_get("hash")?,
                ))
            })
            .transpose()?;
        let report = audit::walk_streams(
            sqlx::query(
                "SELECT stream, version, position, event_id, event_type, schema_version, data, \
                        metadata, recorded_at, hash \
                   FROM events ORDER BY stream, version",
            )
            .fetch(&mut *transaction)
            .map_err(StoreError::from)
            .and_then(|row| async move {
                Ok(AuditRow {
                    event_id: parse_uuid(&row)?,
                    stream: row.try_get("stream")?,
                    version: sql_u64(&row, "version")?,
                    position: sql_u64(&row, "position")?,
                    event_type: row.try_get("event_type")?,
                    schema_version: u32::try_from(row.try_get::<i64, _>("schema_version")?)
                        .map_err(|_| StoreError::Corrupt("schema version".into()))?,
                    // The text as stored is the text hashed.
                    data: row.try_get("data")?,
                    metadata: row.try_get("metadata")?,
                    recorded_at_micros: row.try_get("recorded_at")?,
                    hash: row.try_get("hash")?,
                })
            }),
        )
        .await?;
        let log = audit::walk_log(
            sqlx::query(
                "SELECT position, stream, version, category, hash, log_hash \
                   FROM events ORDER BY position",
            )
            .fetch(&mut *transaction)
            .map_err(StoreError::from)
            .and_then(|row| async move {
                Ok(LogRow {
                    position: sql_u64(&row, "position")?,
                    stream: row.try_get("stream")?,
                    version: sql_u64(&row, "version")?,
                    category: row.try_get("category")?,
                    hash: row.try_get("hash")?,
                    log_hash: row.try_get("log_hash")?,
                })
            }),
            head,
        )
        .await?;
        transaction.rollback().await?;
        Ok(audit::combine(report, log))
    }

    async fn anchor(&self) -> Result<Anchor, StoreError> {
        let mut connection = self.pool.acquire().await?;
        let (position, hash) = read_log_head(&mut connection).await?;
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
        let position: Option<i64> =
            sqlx::query_scalar("SELECT position FROM events WHERE log_hash = ?1 LIMIT 1")
                .bind(hash)
                .fetch_optional(&self.pool)
                .await?;
        position
            .map(|p| u64::try_from(p).map_err(|_| StoreError::Corrupt("position".into())))
            .transpose()
    }
}
