//! The PostgreSQL backend, for production and for several processes on one database.
//!
//! Writers serialise on a transaction-scoped advisory lock taken before anything is read
//! and released by the commit, so global positions are handed out in commit order and a
//! reader that has seen position `p` has seen everything below it. Group commit (see
//! `group_commit`) makes that lock cost one round trip per batch, not per append.
//! A `NOTIFY` in each writing transaction wakes readers in every process.
//!
//! Nothing on the write path waits without bound (see `StoreConfig`): every session of the
//! store has `idle_in_transaction_session_timeout`, so a process that stalls holding the
//! writers' lock is cut off by the server; the writer's session also has `lock_timeout`
//! and `statement_timeout`; and the writer task bounds each attempt by the commit timeout.
//! The isolation level the SQL relies on, READ COMMITTED (each statement after the lock
//! sees every commit made before it), is set on every session and every write
//! transaction, never inherited from the database's default.
//!
//! Every session carries an `application_name` (`annals` unless the URL or `PGAPPNAME`
//! names another), so the sessions of one process can be told apart in
//! `pg_stat_activity`: by an operator, and by the tests that cut them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde_json::Value;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, Postgres, Row, Transaction};
use tokio::sync::watch;
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

/// The `application_name` of the store's sessions when the URL names none.
pub const APPLICATION_NAME: &str = "annals";
/// The notification channel that carries the last committed position.
const CHANNEL: &str = "annals_events";
/// Begins a write transaction and takes the writers' lock, held until the transaction
/// ends, in one round trip. The key is an arbitrary constant that names the lock.
const BEGIN_WRITE: &str =
    "BEGIN ISOLATION LEVEL READ COMMITTED; SELECT pg_advisory_xact_lock(7305218446109532161)";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// Data and metadata are read as the text the store wrote (see `chain`), not as `jsonb`
/// renders it: `jsonb` writes `1e308` with 309 digits, which serde_json cannot read back.
const EVENT_COLUMNS: &str = "position, stream, version, event_id, event_type, schema_version, \
                             COALESCE(data_text, data::text) AS data, \
                             COALESCE(metadata_text, metadata::text) AS metadata, \
                             recorded_at, hash";

/// The event store on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    writer: GroupCommit,
    head: watch::Sender<u64>,
    /// Readers waiting on `head` now (test support, see `parked_readers`).
    parked_readers: Arc<AtomicUsize>,
    poll_interval: Duration,
    /// Held so that the listener task stops when the last clone of the store is dropped.
    _alive: Arc<watch::Receiver<u64>>,
}

impl PostgresStore {
    /// Connects, applies pending migrations and starts the writer and the listener.
    pub async fn open(url: &str, config: StoreConfig) -> Result<Self, StoreError> {
        // Durability and isolation are not left to the server's defaults: a commit waits
        // for its flush, and statements see what READ COMMITTED promises (a backslash
        // escapes the space in a startup option). A session stalled inside a transaction
        // is ended by the server.
        let options = url.parse::<PgConnectOptions>()?;
        // Every session says whose it is (`pg_stat_activity.application_name`), so an
        // operator, or a test, can tell this process's sessions from others': `annals`
        // unless the URL (`?application_name=`) or `PGAPPNAME` names them otherwise.
        let options = match options.get_application_name() {
            Some(_) => options,
            None => options.application_name(APPLICATION_NAME),
        };
        let options = options.options([
            ("synchronous_commit", "on".to_owned()),
            (
                "default_transaction_isolation",
                "read\\ committed".to_owned(),
            ),
            (
                "idle_in_transaction_session_timeout",
                millis(config.idle_in_transaction_timeout),
            ),
        ]);
        // The writer waits for the writers' lock, and runs each statement, within bounds.
        let write_options = options.clone().options([
            ("lock_timeout", millis(config.lock_timeout)),
            ("statement_timeout", millis(config.statement_timeout)),
        ]);
        // One direct connection first: an unreachable server is reported at once, where
        // a pool would retry until its timeout.
        PgConnection::connect_with(&options).await?.close().await?;
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await?;
        MIGRATOR.run(&pool).await?;
        backfill(&pool).await?;
        // The writer has a connection of its own, so reads can never starve appends.
        let write_pool = PgPoolOptions::new()
            .max_connections(1)
            // A dead connection shows itself at BEGIN; no ping before every batch.
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(write_options)
            .await?;
        let head_now = read_head(&pool).await?;
        let (head, alive) = watch::channel(head_now);
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(CHANNEL).await?;
        tokio::spawn(listen(listener, head.clone()));
        let writer = GroupCommit::start(
            PgWriter {
                pool: write_pool,
                connection: None,
            },
            head.clone(),
            &config,
        );
        Ok(PostgresStore {
            pool,
            writer,
            head,
            parked_readers: Arc::default(),
            poll_interval: config.poll_interval,
            _alive: Arc::new(alive),
        })
    }

    /// The connection pool, for code that keeps its own tables in the same database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
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
    /// lock meanwhile, exactly as a real append does.
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
            let mut transaction = store.pool.begin_with(BEGIN_WRITE).await?;
            let batch = std::slice::from_ref(&append);
            let facts = read_facts(&mut transaction, batch, FactsSource::ReadWithIds).await?;
            let planned_on_last = facts.last_position;
            let plan = batch::plan(batch, facts, Utc::now());
            insert(&mut transaction, planned_on_last, &plan).await?;
            let outcome = plan
                .outcomes
                .into_iter()
                .next()
                .unwrap_or(Err(StoreError::Closed))?;
            Ok(HeldAppend {
                transaction,
                outcome,
            })
        })
    }
}

/// An append whose transaction is still open (test support).
#[doc(hidden)]
#[derive(Debug)]
pub struct HeldAppend {
    transaction: Transaction<'static, Postgres>,
    outcome: AppendOutcome,
}

impl HeldAppend {
    pub fn outcome(&self) -> &AppendOutcome {
        &self.outcome
    }

    pub async fn commit(self) -> Result<AppendOutcome, StoreError> {
        self.transaction.commit().await?;
        Ok(self.outcome)
    }
}

/// A duration as PostgreSQL's settings take it: milliseconds (0 turns a timeout off).
fn millis(duration: Duration) -> String {
    duration.as_millis().to_string()
}

async fn read_head(pool: &PgPool) -> Result<u64, StoreError> {
    let head: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM events")
        .fetch_one(pool)
        .await?;
    Ok(u64::try_from(head).unwrap_or(0))
}

/// Forwards commit notifications of every process to this process's head watch. Runs
/// until the store is dropped; sqlx reconnects the listener after a lost connection.
async fn listen(mut listener: PgListener, head: watch::Sender<u64>) {
    loop {
        tokio::select! {
            () = head.closed() => return,
            received = listener.recv() => match received {
                Ok(notification) => {
                    if let Ok(position) = notification.payload().parse::<u64>() {
                        crate::raise_head(&head, position);
                    }
                }
                Err(sqlx::Error::PoolClosed) => return,
                Err(error) => {
                    // Readers fall back to polling meanwhile.
                    tracing::warn!(%error, "event notification listener failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

struct PgWriter {
    pool: PgPool,
    /// Kept between batches (taking it from the pool costs more than a round trip);
    /// dropped, and closed, after any error.
    connection: Option<PoolConnection<Postgres>>,
}

#[async_trait]
impl BatchWriter for PgWriter {
    async fn write_attempt(
        &mut self,
        batch: &[ValidAppend],
        source: FactsSource,
        remembered: Option<LogFacts>,
    ) -> Result<Option<Plan>, StoreError> {
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
    connection: &mut PgConnection,
    batch: &[ValidAppend],
    source: FactsSource,
    remembered: Option<LogFacts>,
) -> Result<Option<Plan>, StoreError> {
    if let Some(facts) = remembered {
        // Remembered facts need no reads, so no transaction around them: the append is
        // one statement, and the function checks the facts under the lock.
        let planned_on_last = facts.last_position;
        let plan = batch::plan(batch, facts, Utc::now());
        if plan.needs_stored_ids() {
            return Ok(None);
        }
        let stale = batch::stale_facts(insert(connection, planned_on_last, &plan).await, source)?;
        return Ok((!stale).then_some(plan));
    }
    let mut transaction = connection.begin_with(BEGIN_WRITE).await?;
    let facts = read_facts(&mut transaction, batch, source).await?;
    let planned_on_last = facts.last_position;
    let plan = batch::plan(batch, facts, Utc::now());
    if source != FactsSource::ReadWithIds && plan.needs_stored_ids() {
        transaction.rollback().await?;
        return Ok(None);
    }
    if batch::stale_facts(
        insert(&mut transaction, planned_on_last, &plan).await,
        source,
    )? {
        transaction.rollback().await?;
        return Ok(None);
    }
    transaction.commit().await?;
    Ok(Some(plan))
}

/// Reads the facts in one round trip. The statement is not prepared: planned afresh with
/// its real arguments, it always takes the indexes, where a cached generic plan made
/// while the table was small would scan the whole log.
async fn read_facts(
    connection: &mut PgConnection,
    batch: &[ValidAppend],
    source: FactsSource,
) -> Result<LogFacts, StoreError> {
    let mut wanted = LogFacts::wanted(batch);
    if source != FactsSource::ReadWithIds {
        wanted.event_ids.clear();
        wanted.idempotency_keys.clear();
    }
    let rows = sqlx::query(
        "SELECT 'head' AS kind, s.stream AS name, NULL::text AS other, e.version, e.hash, \
                NULL::bigint AS schema_version, NULL::jsonb AS data, NULL::bigint AS position \
           FROM unnest($1::text[]) AS s(stream) \
           CROSS JOIN LATERAL (SELECT version, hash FROM events \
                                WHERE events.stream = s.stream \
                                ORDER BY version DESC LIMIT 1) e \
         UNION ALL \
         SELECT 'event', stream, event_id::text, version, NULL, schema_version, \
                jsonb_build_object('type', event_type, 'text', data_text, \
                                   'data', CASE WHEN data_text IS NULL THEN data END), \
                position \
           FROM events WHERE event_id = ANY($2::uuid[]) \
         UNION ALL \
         SELECT 'claim', key, stream, NULL, NULL, NULL, NULL, NULL \
           FROM claims WHERE key = ANY($3::text[]) \
         UNION ALL \
         SELECT 'key', key, stream, version, NULL, NULL, \
                jsonb_build_object('hash', request_hash, 'payload', payload, \
                                   'recorded_at', recorded_at), last_position \
           FROM idempotency_keys WHERE key = ANY($4::text[]) \
         UNION ALL \
         SELECT 'last', NULL, NULL, NULL, hash, NULL, NULL, position \
           FROM log_head WHERE id = 1",
    )
    .persistent(false)
    .bind(&wanted.streams)
    .bind(&wanted.event_ids)
    .bind(&wanted.claim_keys)
    .bind(&wanted.idempotency_keys)
    .fetch_all(&mut *connection)
    .await?;

    let mut facts = LogFacts::default();
    let mut head_seen = false;
    for row in rows {
        let kind: &str = row.try_get("kind")?;
        match kind {
            "head" => {
                let hash: Vec<u8> = row.try_get("hash")?;
                let hash: Hash = hash
                    .as_slice()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("hash of a stream head".into()))?;
                facts
                    .heads
                    .insert(row.try_get("name")?, (sql_u64(&row, "version")?, hash));
            }
            "event" => {
                let id: String = row.try_get("other")?;
                let id =
                    Uuid::parse_str(&id).map_err(|_| StoreError::Corrupt("event id".into()))?;
                let mut typed: Value = row.try_get("data")?;
                let event_type = match typed["type"].take() {
                    Value::String(t) => t,
                    _ => return Err(StoreError::Corrupt(format!("type of event {id}"))),
                };
                facts.stored.insert(
                    id,
                    StoredEvent {
                        stream: row.try_get("name")?,
                        version: sql_u64(&row, "version")?,
                        position: sql_u64(&row, "position")?,
                        event_type,
                        schema_version: u32::try_from(row.try_get::<i64, _>("schema_version")?)
                            .map_err(|_| StoreError::Corrupt(format!("schema of {id}")))?,
                        // The text as hashed; rows stored before it was kept have only
                        // their `jsonb`.
                        data: match typed["text"].take() {
                            Value::String(text) => text,
                            _ => crate::chain::canonical_json(&typed["data"]),
                        },
                    },
                );
            }
            "key" => {
                let mut extra: Value = row.try_get("data")?;
                let corrupt = || StoreError::Corrupt("an idempotency key".into());
                let request_hash = extra["hash"].as_str().ok_or_else(corrupt)?.to_owned();
                let recorded_at: DateTime<Utc> =
                    serde_json::from_value(extra["recorded_at"].take()).map_err(|_| corrupt())?;
                let record = IdempotencyRecord {
                    key: row.try_get("name")?,
                    request_hash,
                    payload: extra["payload"].take(),
                    stream: row.try_get("other")?,
                    version: sql_u64(&row, "version")?,
                    last_position: sql_u64(&row, "position")?,
                    recorded_at,
                };
                facts.idempotency.insert(record.key.clone(), record);
            }
            "claim" => {
                facts
                    .claims
                    .insert(row.try_get("name")?, row.try_get("other")?);
            }
            _ => {
                let position: Option<i64> = row.try_get("position")?;
                let hash: Option<Vec<u8>> = row.try_get("hash")?;
                let (Some(position), Some(hash)) = (position, hash) else {
                    return Err(StoreError::Corrupt("the log's head row is empty".into()));
                };
                facts.last_position = u64::try_from(position)
                    .map_err(|_| StoreError::Corrupt("the log's head position".into()))?;
                facts.last_log_hash = hash
                    .as_slice()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("the log's head hash".into()))?;
                head_seen = true;
            }
        }
    }
    if !head_seen {
        return Err(StoreError::Corrupt("the log's head row is missing".into()));
    }
    Ok(facts)
}

/// Chains the rows stored before the log chain existed into it, once, when the head row
/// says so (its hash is NULL only between the migration and this): in position order,
/// under the writers' lock (so one process does it, and no append slips in), in one
/// transaction.
async fn backfill(pool: &PgPool) -> Result<(), StoreError> {
    // A plain read first: a server starting beside another's writer must not wait for
    // the writers' lock when there is nothing to chain (almost always).
    let head: Option<Option<Vec<u8>>> =
        sqlx::query_scalar("SELECT hash FROM log_head WHERE id = 1")
            .fetch_optional(pool)
            .await?;
    if !matches!(head, Some(None)) {
        return Ok(());
    }
    let mut transaction = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(7305218446109532161)")
        .execute(&mut *transaction)
        .await?;
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
            "SELECT position, category, hash FROM events WHERE position > $1 \
              ORDER BY position LIMIT 10000",
        )
        .bind(to_sql_int(last))
        .fetch_all(&mut *transaction)
        .await?;
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
        let Some((end, _, _)) = rows.last() else {
            break;
        };
        last = *end;
        let hashes = audit::chain_rows(&mut previous, &rows);
        let positions: Vec<i64> = rows.iter().map(|(p, _, _)| to_sql_int(*p)).collect();
        let hashes: Vec<&[u8]> = hashes.iter().map(|h| h.as_slice()).collect();
        sqlx::query(
            "UPDATE events SET log_hash = u.h FROM unnest($1::bigint[], $2::bytea[]) AS u(p, h) \
              WHERE events.position = u.p",
        )
        .bind(&positions)
        .bind(&hashes)
        .execute(&mut *transaction)
        .await?;
    }
    sqlx::query("UPDATE log_head SET position = $1, hash = $2 WHERE id = 1")
        .bind(to_sql_int(last))
        .bind(previous.as_slice())
        .execute(&mut *transaction)
        .await?;
    transaction.commit().await?;
    Ok(())
}

fn sql_u64(row: &PgRow, column: &str) -> Result<u64, StoreError> {
    let n: i64 = row.try_get(column)?;
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("{column} is negative")))
}

/// Writes a planned batch through `annals_append` (see the migration), which also takes
/// the writers' lock and checks the plan was made on the log's current last position.
/// On a connection outside a transaction this is the whole append, in one round trip.
async fn insert(
    connection: &mut PgConnection,
    planned_on_last: u64,
    plan: &Plan,
) -> Result<(), StoreError> {
    let rows = &plan.rows;
    if rows.is_empty() && plan.claims_taken.is_empty() && plan.claims_released.is_empty() {
        return Ok(());
    }
    let keys = &plan.idempotency;
    let key_names: Vec<&str> = keys.iter().map(|k| k.key.as_str()).collect();
    let key_hashes: Vec<&str> = keys.iter().map(|k| k.request_hash.as_str()).collect();
    let key_payloads: Vec<String> = keys
        .iter()
        .map(|k| crate::chain::canonical_json(&k.payload))
        .collect();
    let key_streams: Vec<&str> = keys.iter().map(|k| k.stream.as_str()).collect();
    let key_versions: Vec<i64> = keys.iter().map(|k| to_sql_int(k.version)).collect();
    let key_positions: Vec<i64> = keys.iter().map(|k| to_sql_int(k.last_position)).collect();
    let key_recorded: Vec<DateTime<Utc>> = keys.iter().map(|k| k.recorded_at).collect();
    let positions: Vec<i64> = rows.iter().map(|r| to_sql_int(r.position)).collect();
    let streams: Vec<&str> = rows.iter().map(|r| r.stream.as_str()).collect();
    let categories: Vec<&str> = rows.iter().map(|r| r.category.as_str()).collect();
    let versions: Vec<i64> = rows.iter().map(|r| to_sql_int(r.version)).collect();
    let ids: Vec<Uuid> = rows.iter().map(|r| r.event_id).collect();
    let types: Vec<&str> = rows.iter().map(|r| r.event_type.as_str()).collect();
    let schemas: Vec<i64> = rows.iter().map(|r| i64::from(r.schema_version)).collect();
    let data: Vec<&str> = rows.iter().map(|r| r.data.as_str()).collect();
    let metadata: Vec<&str> = rows.iter().map(|r| r.metadata.as_str()).collect();
    let recorded: Vec<DateTime<Utc>> = rows.iter().map(|r| r.recorded_at).collect();
    let hashes: Vec<&[u8]> = rows.iter().map(|r| r.hash.as_slice()).collect();
    let log_hashes: Vec<&[u8]> = rows.iter().map(|r| r.log_hash.as_slice()).collect();
    let taken_keys: Vec<&str> = plan
        .claims_taken
        .iter()
        .map(|(k, _, _)| k.as_str())
        .collect();
    let taken_streams: Vec<&str> = plan
        .claims_taken
        .iter()
        .map(|(_, s, _)| s.as_str())
        .collect();
    let taken_positions: Vec<i64> = plan
        .claims_taken
        .iter()
        .map(|(_, _, p)| to_sql_int(*p))
        .collect();
    sqlx::query(
        "SELECT annals_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
                              $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26)",
    )
    .bind(to_sql_int(planned_on_last))
    .bind(to_sql_int(plan.last_position))
    .bind(&positions)
    .bind(&streams)
    .bind(&categories)
    .bind(&versions)
    .bind(&ids)
    .bind(&types)
    .bind(&schemas)
    .bind(&data)
    .bind(&metadata)
    .bind(&recorded)
    .bind(&hashes)
    .bind(&plan.claims_released)
    .bind(&taken_keys)
    .bind(&taken_streams)
    .bind(&taken_positions)
    .bind(&key_names)
    .bind(&key_hashes)
    .bind(&key_payloads)
    .bind(&key_streams)
    .bind(&key_versions)
    .bind(&key_positions)
    .bind(&key_recorded)
    .bind(&log_hashes)
    .bind(plan.last_log_hash.as_slice())
    .execute(&mut *connection)
    .await?;
    Ok(())
}

fn event_from_row(row: &PgRow) -> Result<RecordedEvent, StoreError> {
    let hash: Vec<u8> = row.try_get("hash")?;
    recorded_event(
        row.try_get("position")?,
        row.try_get("stream")?,
        row.try_get("version")?,
        row.try_get("event_id")?,
        row.try_get("event_type")?,
        row.try_get("schema_version")?,
        json_text(row, "data")?,
        json_text(row, "metadata")?,
        row.try_get("recorded_at")?,
        &hash,
    )
}

fn json_text(row: &PgRow, column: &str) -> Result<Value, StoreError> {
    let text: &str = row.try_get(column)?;
    serde_json::from_str(text).map_err(|_| StoreError::Corrupt(format!("{column} is not JSON")))
}

/// The query of a `read_all` page. With a filter, one branch per event type (or, with
/// categories only, per category), each an ordered scan of its own index that stops at
/// the limit, merged by position: an index on `(category, position)` read for several
/// values at once (`= ANY`) returns rows out of position order, and PostgreSQL would
/// then fetch and sort every later matching row for each page.
/// Parameters: $1 from, $2 head, $3 limit, $4 event types, $5 categories.
fn read_all_sql(filter: &LogFilter) -> String {
    let range = "position >= $1 AND position <= $2";
    // Every variant names all five parameters (these conditions are always true), so
    // one binding serves them all.
    let all_bound = "cardinality($4::text[]) >= 0 AND cardinality($5::text[]) >= 0";
    if filter.event_types.is_empty() && filter.categories.is_empty() {
        return format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE {range} AND {all_bound} \
              ORDER BY position LIMIT $3"
        );
    }
    let branches: Vec<String> = if filter.event_types.is_empty() {
        (1..=filter.categories.len())
            .map(|i| format!("category = ($5::text[])[{i}]"))
            .collect()
    } else {
        let categories = if filter.categories.is_empty() {
            ""
        } else {
            " AND category = ANY($5::text[])"
        };
        (1..=filter.event_types.len())
            .map(|i| format!("event_type = ($4::text[])[{i}]{categories}"))
            .collect()
    };
    let union = branches
        .iter()
        .map(|condition| {
            format!(
                "(SELECT {EVENT_COLUMNS} FROM events WHERE {condition} AND {range} \
                  ORDER BY position LIMIT $3)"
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    format!("SELECT * FROM ({union}) AS matching WHERE {all_bound} ORDER BY position LIMIT $3")
}

fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

#[async_trait]
impl EventStore for PostgresStore {
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
                "SELECT {EVENT_COLUMNS} FROM events WHERE stream = $1 AND version >= $2 \
                 ORDER BY version LIMIT $3"
            ),
            Direction::Backwards => format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE stream = $1 AND version <= $2 \
                 ORDER BY version DESC LIMIT $3"
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
        // One union branch per distinct value: a value named twice would read its
        // events twice.
        let mut filter = filter.clone();
        for values in [&mut filter.event_types, &mut filter.categories] {
            values.sort_unstable();
            values.dedup();
        }
        let filter = &filter;
        // The head is read first: every position up to it is committed (positions are
        // given in commit order), so the page below sees all of them.
        let head = read_head(&self.pool).await?;
        let rows = sqlx::query(&read_all_sql(filter))
            .bind(to_sql_int(from))
            .bind(to_sql_int(head))
            .bind(sql_limit(limit))
            .bind(&filter.event_types)
            .bind(&filter.categories)
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
            "INSERT INTO snapshots (stream, version, schema_version, state) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (stream) DO UPDATE \
                SET version = EXCLUDED.version, schema_version = EXCLUDED.schema_version, \
                    state = EXCLUDED.state, taken_at = now() \
              WHERE snapshots.version <= EXCLUDED.version",
        )
        .bind(&snapshot.stream)
        .bind(to_sql_int(snapshot.version))
        .bind(i64::from(snapshot.schema_version))
        .bind(&snapshot.state)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn load_snapshot(&self, stream: &StreamName) -> Result<Option<Snapshot>, StoreError> {
        let row =
            sqlx::query("SELECT version, schema_version, state FROM snapshots WHERE stream = $1")
                .bind(stream.as_str())
                .fetch_optional(&self.pool)
                .await?;
        row.map(|row| {
            Ok(Snapshot {
                stream: stream.as_str().to_owned(),
                version: sql_u64(&row, "version")?,
                schema_version: u32::try_from(row.try_get::<i64, _>("schema_version")?)
                    .map_err(|_| StoreError::Corrupt("snapshot schema version".into()))?,
                state: row.try_get("state")?,
            })
        })
        .transpose()
    }

    async fn find_idempotency(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT key, request_hash, payload, stream, version, last_position, recorded_at \
               FROM idempotency_keys WHERE key = $1",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(IdempotencyRecord {
                key: row.try_get("key")?,
                request_hash: row.try_get("request_hash")?,
                payload: row.try_get("payload")?,
                stream: row.try_get("stream")?,
                version: sql_u64(&row, "version")?,
                last_position: sql_u64(&row, "last_position")?,
                recorded_at: row.try_get("recorded_at")?,
            })
        })
        .transpose()
    }

    async fn purge_idempotency(&self, recorded_before: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM idempotency_keys WHERE recorded_at < $1")
            .bind(recorded_before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn load_checkpoint(&self, process: &str) -> Result<u64, StoreError> {
        let position: Option<i64> =
            sqlx::query_scalar("SELECT position FROM process_checkpoints WHERE name = $1")
                .bind(process)
                .fetch_optional(&self.pool)
                .await?;
        Ok(position.and_then(|p| u64::try_from(p).ok()).unwrap_or(0))
    }

    async fn save_checkpoint(&self, process: &str, position: u64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO process_checkpoints (name, position) VALUES ($1, $2) \
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
        // One snapshot for both walks and the head row.
        let mut transaction = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
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
        // The text kept beside the `jsonb` is what was hashed, as long as the `jsonb`
        // (what readers get) still equals it; otherwise, and for rows stored before the
        // text was kept, the `jsonb`'s canonical rendering is hashed, which shows an edit.
        let report = audit::walk_streams(
            sqlx::query(
                "SELECT stream, version, position, event_id, event_type, schema_version, \
                        recorded_at, hash, \
                        CASE WHEN data_text IS NOT NULL AND data = data_text::jsonb \
                             THEN data_text END AS data_text, \
                        CASE WHEN data_text IS NOT NULL AND data = data_text::jsonb \
                             THEN NULL ELSE data END AS data, \
                        CASE WHEN metadata_text IS NOT NULL AND metadata = metadata_text::jsonb \
                             THEN metadata_text END AS metadata_text, \
                        CASE WHEN metadata_text IS NOT NULL AND metadata = metadata_text::jsonb \
                             THEN NULL ELSE metadata END AS metadata \
                   FROM events ORDER BY stream, version",
            )
            .fetch(&mut *transaction)
            .map_err(StoreError::from)
            .and_then(|row| async move {
                let recorded_at: DateTime<Utc> = row.try_get("recorded_at")?;
                let text = |column: &str, text_column: &str| -> Result<String, StoreError> {
                    Ok(match row.try_get::<Option<String>, _>(text_column)? {
                        Some(text) => text,
                        None => crate::chain::canonical_json(&row.try_get::<Value, _>(column)?),
                    })
                };
                Ok(AuditRow {
                    stream: row.try_get("stream")?,
                    version: sql_u64(&row, "version")?,
                    position: sql_u64(&row, "position")?,
                    event_id: row.try_get("event_id")?,
                    event_type: row.try_get("event_type")?,
                    schema_version: u32::try_from(row.try_get::<i64, _>("schema_version")?)
                        .map_err(|_| StoreError::Corrupt("schema version".into()))?,
                    data: text("data", "data_text")?,
                    metadata: text("metadata", "metadata_text")?,
                    recorded_at_micros: recorded_at.timestamp_micros(),
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
        let row = sqlx::query("SELECT position, hash FROM log_head WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::Corrupt("the log's head row is missing".into()))?;
        let position: Option<i64> = row.try_get("position")?;
        let hash: Option<Vec<u8>> = row.try_get("hash")?;
        match (position.and_then(|p| u64::try_from(p).ok()), hash) {
            (Some(position), Some(hash)) if hash.len() == 32 => Ok(Anchor {
                position,
                hash: hex::encode(hash),
            }),
            _ => Err(StoreError::Corrupt("the log's head row is empty".into())),
        }
    }

    async fn find_anchor(&self, hash: &str) -> Result<Option<u64>, StoreError> {
        let Ok(hash) = hex::decode(hash) else {
            return Ok(None);
        };
        if hash == GENESIS {
            return Ok(Some(0));
        }
        let position: Option<i64> =
            sqlx::query_scalar("SELECT position FROM events WHERE log_hash = $1 LIMIT 1")
                .bind(hash)
                .fetch_optional(&self.pool)
                .await?;
        position
            .map(|p| u64::try_from(p).map_err(|_| StoreError::Corrupt("position".into())))
            .transpose()
    }
}
