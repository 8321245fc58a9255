//! The PostgreSQL dialect, for production and for several processes on one database.
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

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions, PgQueryResult, PgRow};
use sqlx::{Connection, PgConnection, Postgres, Row};
use tokio::sync::watch;
use uuid::Uuid;

use crate::StoreConfig;
use crate::audit::AuditRow;
use crate::batch::{self, EventRow, FactsSource, LogFacts, Plan, StoredEvent, ValidAppend, Wanted};
use crate::chain::Hash;
use crate::error::StoreError;
use crate::model::{IdempotencyRecord, LogFilter, to_sql_int};
use crate::sql::{self, Dialect, Param, Sql, SqlStore};

/// The `application_name` of the store's sessions when the URL names none.
pub const APPLICATION_NAME: &str = "annals";
/// The notification channel that carries the last committed position.
const CHANNEL: &str = "annals_events";
/// The SQLSTATE with which `annals_append` refuses a data key (see `sql::key_refused`).
const KEY_REFUSED_SQLSTATE: &str = "ANS02";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// The event store on PostgreSQL.
pub type PostgresStore = SqlStore<Postgres>;

/// An append whose transaction is still open (test support).
#[doc(hidden)]
pub type HeldAppend = sql::HeldAppend<Postgres>;

impl SqlStore<Postgres> {
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
        // The writer has a connection of its own, so reads can never starve appends.
        let write_pool = PgPoolOptions::new()
            .max_connections(1)
            // A dead connection shows itself at BEGIN; no ping before every batch.
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(write_options)
            .await?;
        let store = SqlStore::start(pool, write_pool, None, &config).await?;
        let mut listener = PgListener::connect_with(store.pool()).await?;
        listener.listen(CHANNEL).await?;
        tokio::spawn(listen(listener, store.head_watch()));
        Ok(store)
    }
}

/// A duration as PostgreSQL's settings take it: milliseconds (0 turns a timeout off).
fn millis(duration: Duration) -> String {
    duration.as_millis().to_string()
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

#[async_trait]
impl Dialect for Postgres {
    /// Data and metadata are read as the text the store wrote (see `chain`), not as
    /// `jsonb` renders it: `jsonb` writes `1e308` with 309 digits, which serde_json cannot
    /// read back.
    const EVENT_COLUMNS: &'static str = "position, stream, version, event_id, event_type, schema_version, \
         COALESCE(data_text, data::text) AS data, \
         COALESCE(metadata_text, metadata::text) AS metadata, recorded_at, hash";
    /// In one round trip. The key is an arbitrary constant that names the lock.
    const BEGIN_WRITE: &'static str =
        "BEGIN ISOLATION LEVEL READ COMMITTED; SELECT pg_advisory_xact_lock(7305218446109532161)";
    const BEGIN_SNAPSHOT: &'static str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
    const SELECT_SNAPSHOT: &'static str =
        "SELECT version, schema_version, state::text AS state FROM snapshots WHERE stream = $1";
    const SAVE_SNAPSHOT: &'static str = "INSERT INTO snapshots (stream, version, schema_version, state, taken_at) \
         VALUES ($1, $2, $3, $4::jsonb, $5) \
         ON CONFLICT (stream) DO UPDATE \
            SET version = EXCLUDED.version, schema_version = EXCLUDED.schema_version, \
                state = EXCLUDED.state, taken_at = EXCLUDED.taken_at \
          WHERE snapshots.version <= EXCLUDED.version";
    const IDEMPOTENCY_COLUMNS: &'static str = "key, request_hash, payload::text AS payload, \
                                               stream, version, last_position, recorded_at";
    /// The text kept beside the `jsonb` is what was hashed, as long as the `jsonb` (what
    /// readers get) still equals it; otherwise, and for rows stored before the text was
    /// kept, the `jsonb`'s canonical rendering is hashed, which shows an edit.
    const AUDIT_STREAMS: &'static str = "SELECT stream, version, position, event_id, event_type, schema_version, \
                recorded_at, hash, \
                CASE WHEN data_text IS NOT NULL AND data = data_text::jsonb \
                     THEN data_text END AS data_text, \
                CASE WHEN data_text IS NOT NULL AND data = data_text::jsonb \
                     THEN NULL ELSE data END AS data, \
                CASE WHEN metadata_text IS NOT NULL AND metadata = metadata_text::jsonb \
                     THEN metadata_text END AS metadata_text, \
                CASE WHEN metadata_text IS NOT NULL AND metadata = metadata_text::jsonb \
                     THEN NULL ELSE metadata END AS metadata \
           FROM events ORDER BY stream, version";

    const LOCK_DATA_KEYS: Option<&'static str> = Some("LOCK TABLE data_keys IN EXCLUSIVE MODE");
    const PURGE_OVERWRITTEN: Option<&'static str> = None;
    const KEYS_OF: &'static str = "SELECT subject, wrapped FROM data_keys \
         WHERE subject = ANY (ARRAY(SELECT jsonb_array_elements_text($1::jsonb)))";
    const BEGIN_TABLES_WRITE: &'static str = "BEGIN";
    // Planned afresh with their real arguments: read-model tables grow from empty during
    // a rebuild, and a plan cached while one was empty kept scanning it whole (350 ms
    // per batch at 100,000 rows); a statement runs once per batch, so planning it each
    // time costs little.
    const PREPARE_TABLE_STATEMENTS: bool = false;
    const SHARE_LOCK: &'static str = " FOR SHARE";
    /// `clock_timestamp()`, not `now()`: a transaction's start would make a lease taken
    /// late in a long transaction expire early, and a fence pass late.
    const NOW_MICROS: &'static str =
        "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)";
    const SCHEMA_OF: &'static str = "SELECT tablename FROM pg_tables \
                                      WHERE schemaname = current_schema() AND tablename = $1 \
                                     UNION ALL \
                                     SELECT indexname FROM pg_indexes \
                                      WHERE schemaname = current_schema() AND tablename = $1";
    const EXPLAIN: &'static str = "EXPLAIN ";
    const EXPLAIN_COLUMN: &'static str = "QUERY PLAN";

    fn placeholder(n: usize) -> String {
        format!("${n}")
    }

    fn time(at: DateTime<Utc>) -> Param<'static> {
        Param::Time(at)
    }

    fn read_time(row: &PgRow, column: &str) -> Result<DateTime<Utc>, StoreError> {
        Ok(row.try_get(column)?)
    }

    fn read_event_id(row: &PgRow) -> Result<Uuid, StoreError> {
        Ok(row.try_get("event_id")?)
    }

    fn rows_affected(done: &PgQueryResult) -> u64 {
        done.rows_affected()
    }

    fn audit_row(row: &PgRow) -> Result<AuditRow, StoreError> {
        let text = |column: &str, text_column: &str| -> Result<String, StoreError> {
            Ok(match row.try_get::<Option<String>, _>(text_column)? {
                Some(text) => text,
                None => crate::chain::canonical_json(&row.try_get::<Value, _>(column)?),
            })
        };
        Ok(AuditRow {
            stream: row.try_get("stream")?,
            version: Self::count(row, "version")?,
            position: Self::count(row, "position")?,
            event_id: Self::read_event_id(row)?,
            event_type: row.try_get("event_type")?,
            schema_version: sql::schema_version::<Self>(row)?,
            data: text("data", "data_text")?,
            metadata: text("metadata", "metadata_text")?,
            recorded_at_micros: Self::read_time(row, "recorded_at")?.timestamp_micros(),
            hash: row.try_get("hash")?,
        })
    }

    /// Reads the facts in one round trip (`fetch_facts`), one row per fact.
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
        let rows = fetch_facts(connection, &wanted).await?;

        let mut facts = LogFacts::default();
        let mut head_seen = false;
        for row in rows {
            let kind: &str = row.try_get("kind")?;
            match kind {
                "head" => {
                    let (stream, head) = stream_head(&row)?;
                    facts.heads.insert(stream, head);
                }
                "event" => {
                    let (id, stored) = stored_event(&row)?;
                    facts.stored.insert(id, stored);
                }
                "key" => {
                    let record = idempotency_key(&row)?;
                    facts.idempotency.insert(record.key.clone(), record);
                }
                "claim" => {
                    facts
                        .claims
                        .insert(row.try_get("name")?, row.try_get("other")?);
                }
                _ => {
                    (facts.last_position, facts.last_log_hash) = log_head(&row)?;
                    head_seen = true;
                }
            }
        }
        if !head_seen {
            return Err(StoreError::Corrupt("the log's head row is missing".into()));
        }
        Ok(facts)
    }

    /// Writes a planned batch through `annals_append` (see the migration), which also takes
    /// the writers' lock and checks the plan was made on the log's current last position.
    /// On a connection outside a transaction this is the whole append, in one round trip.
    async fn insert(
        connection: &mut PgConnection,
        planned_on_last: u64,
        plan: &Plan,
    ) -> Result<(), StoreError> {
        if plan.rows.is_empty() && plan.claims_taken.is_empty() && plan.claims_released.is_empty() {
            return Ok(());
        }
        let events = EventColumns::of(&plan.rows);
        let keys = IdempotencyColumns::of(&plan.idempotency);
        let taken = TakenClaimColumns::of(&plan.claims_taken);
        let new_keys = NewKeyColumns::of(&plan.new_keys);
        sqlx::query(
            "SELECT annals_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
                                  $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, \
                                  $27, $28, $29)",
        )
        .bind(to_sql_int(planned_on_last))
        .bind(to_sql_int(plan.last_position))
        .bind(&events.positions)
        .bind(&events.streams)
        .bind(&events.categories)
        .bind(&events.versions)
        .bind(&events.ids)
        .bind(&events.types)
        .bind(&events.schemas)
        .bind(&events.data)
        .bind(&events.metadata)
        .bind(&events.recorded)
        .bind(&events.hashes)
        .bind(&plan.claims_released)
        .bind(&taken.keys)
        .bind(&taken.streams)
        .bind(&taken.positions)
        .bind(&keys.names)
        .bind(&keys.hashes)
        .bind(&keys.payloads)
        .bind(&keys.streams)
        .bind(&keys.versions)
        .bind(&keys.positions)
        .bind(&keys.recorded)
        .bind(&events.log_hashes)
        .bind(plan.last_log_hash.as_slice())
        .bind(&new_keys.subjects)
        .bind(&new_keys.wrapped)
        .bind(&new_keys.checks)
        .execute(&mut *connection)
        .await
        .map_err(|error| append_refused(error, plan))?;
        // Only inside the transaction `write_attempt` opens for a batch that shreds.
        sql::shred_keys::<Self>(connection, plan).await
    }

    async fn write_attempt(
        connection: &mut PgConnection,
        batch: &[ValidAppend],
        source: FactsSource,
        remembered: Option<LogFacts>,
    ) -> Result<Option<Plan>, StoreError> {
        let shreds = batch.iter().any(|append| !append.request.shred.is_empty());
        if let Some(facts) = remembered.filter(|_| !shreds) {
            // Remembered facts need no reads, so no transaction around them: the append is
            // one statement, and the function checks the facts under the lock. A batch
            // that shreds a data key writes more than that statement, so it takes the
            // transaction below; so does one that creates a stream (and may store its
            // data key), as its stream is not remembered.
            let planned_on_last = facts.last_position;
            let plan = batch::plan(batch, facts, Utc::now());
            if plan.needs_stored_ids() {
                return Ok(None);
            }
            let stale = batch::stale_facts(
                Self::insert(connection, planned_on_last, &plan).await,
                source,
            )?;
            return Ok((!stale).then_some(plan));
        }
        let mut transaction = connection.begin_with(Self::BEGIN_WRITE).await?;
        let facts = Self::read_facts(&mut transaction, batch, source).await?;
        sql::plan_and_commit(transaction, batch, facts, source).await
    }

    async fn read_page(
        connection: &mut PgConnection,
        from: u64,
        head: u64,
        limit: usize,
        filter: &LogFilter,
    ) -> Result<Vec<PgRow>, StoreError> {
        // One union branch per distinct value: a value named twice would read its
        // events twice.
        let mut filter = filter.clone();
        for values in [&mut filter.event_types, &mut filter.categories] {
            values.sort_unstable();
            values.dedup();
        }
        Ok(sqlx::query(&read_all_sql(&filter))
            .bind(to_sql_int(from))
            .bind(to_sql_int(head))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(&filter.event_types)
            .bind(&filter.categories)
            .fetch_all(&mut *connection)
            .await?)
    }

    async fn store_log_hashes(
        connection: &mut PgConnection,
        rows: &[(u64, Hash)],
    ) -> Result<(), StoreError> {
        let positions: Vec<i64> = rows.iter().map(|(p, _)| to_sql_int(*p)).collect();
        let hashes: Vec<&[u8]> = rows.iter().map(|(_, h)| h.as_slice()).collect();
        sqlx::query(
            "UPDATE events SET log_hash = u.h FROM unnest($1::bigint[], $2::bytea[]) AS u(p, h) \
              WHERE events.position = u.p",
        )
        .bind(&positions)
        .bind(&hashes)
        .execute(&mut *connection)
        .await?;
        Ok(())
    }
}

/// The statement of `read_facts`: a row per stream head, stored event, claim and
/// idempotency key the batch wants, and the log's head row, each marked by its `kind`.
/// It is not prepared: planned afresh with its real arguments, it always takes the
/// indexes, where a cached generic plan made while the table was small would scan the
/// whole log.
async fn fetch_facts(
    connection: &mut PgConnection,
    wanted: &Wanted,
) -> Result<Vec<PgRow>, StoreError> {
    Ok(sqlx::query(
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
    .await?)
}

/// A `head` row of `fetch_facts`: a stream, its version and last hash.
fn stream_head(row: &PgRow) -> Result<(String, (u64, Hash)), StoreError> {
    let hash: Vec<u8> = row.try_get("hash")?;
    let hash: Hash = hash
        .as_slice()
        .try_into()
        .map_err(|_| StoreError::Corrupt("hash of a stream head".into()))?;
    Ok((
        row.try_get("name")?,
        (Postgres::count(row, "version")?, hash),
    ))
}

/// An `event` row of `fetch_facts`: a stored event that reuses an id of the batch.
fn stored_event(row: &PgRow) -> Result<(Uuid, StoredEvent), StoreError> {
    let id: String = row.try_get("other")?;
    let id = Uuid::parse_str(&id).map_err(|_| StoreError::Corrupt("event id".into()))?;
    let mut typed: Value = row.try_get("data")?;
    let event_type = match typed["type"].take() {
        Value::String(t) => t,
        _ => return Err(StoreError::Corrupt(format!("type of event {id}"))),
    };
    let stored = StoredEvent {
        stream: row.try_get("name")?,
        version: Postgres::count(row, "version")?,
        position: Postgres::count(row, "position")?,
        event_type,
        schema_version: u32::try_from(row.try_get::<i64, _>("schema_version")?)
            .map_err(|_| StoreError::Corrupt(format!("schema of {id}")))?,
        // The text as hashed; rows stored before it was kept have only their `jsonb`.
        data: match typed["text"].take() {
            Value::String(text) => text,
            _ => crate::chain::canonical_json(&typed["data"]),
        },
    };
    Ok((id, stored))
}

/// A `key` row of `fetch_facts`: a stored idempotency key the batch carries.
fn idempotency_key(row: &PgRow) -> Result<IdempotencyRecord, StoreError> {
    let mut extra: Value = row.try_get("data")?;
    let corrupt = || StoreError::Corrupt("an idempotency key".into());
    let request_hash = extra["hash"].as_str().ok_or_else(corrupt)?.to_owned();
    let recorded_at: DateTime<Utc> =
        serde_json::from_value(extra["recorded_at"].take()).map_err(|_| corrupt())?;
    Ok(IdempotencyRecord {
        key: row.try_get("name")?,
        request_hash,
        payload: extra["payload"].take(),
        stream: row.try_get("other")?,
        version: Postgres::count(row, "version")?,
        last_position: Postgres::count(row, "position")?,
        recorded_at,
    })
}

/// The `last` row of `fetch_facts`: the log's head row, the last position given and its
/// log hash, which must be there.
fn log_head(row: &PgRow) -> Result<(u64, Hash), StoreError> {
    let position: Option<i64> = row.try_get("position")?;
    let hash: Option<Vec<u8>> = row.try_get("hash")?;
    let (Some(position), Some(hash)) = (position, hash) else {
        return Err(StoreError::Corrupt("the log's head row is empty".into()));
    };
    let position = u64::try_from(position)
        .map_err(|_| StoreError::Corrupt("the log's head position".into()))?;
    let hash = hash
        .as_slice()
        .try_into()
        .map_err(|_| StoreError::Corrupt("the log's head hash".into()))?;
    Ok((position, hash))
}

/// The plan's event rows, column by column, as `annals_append` takes them.
struct EventColumns<'a> {
    positions: Vec<i64>,
    streams: Vec<&'a str>,
    categories: Vec<&'a str>,
    versions: Vec<i64>,
    ids: Vec<Uuid>,
    types: Vec<&'a str>,
    schemas: Vec<i64>,
    data: Vec<&'a str>,
    metadata: Vec<&'a str>,
    recorded: Vec<DateTime<Utc>>,
    hashes: Vec<&'a [u8]>,
    log_hashes: Vec<&'a [u8]>,
}

impl<'a> EventColumns<'a> {
    fn of(rows: &'a [EventRow]) -> Self {
        EventColumns {
            positions: rows.iter().map(|r| to_sql_int(r.position)).collect(),
            streams: rows.iter().map(|r| r.stream.as_str()).collect(),
            categories: rows.iter().map(|r| r.category.as_str()).collect(),
            versions: rows.iter().map(|r| to_sql_int(r.version)).collect(),
            ids: rows.iter().map(|r| r.event_id).collect(),
            types: rows.iter().map(|r| r.event_type.as_str()).collect(),
            schemas: rows.iter().map(|r| i64::from(r.schema_version)).collect(),
            data: rows.iter().map(|r| r.data.as_str()).collect(),
            metadata: rows.iter().map(|r| r.metadata.as_str()).collect(),
            recorded: rows.iter().map(|r| r.recorded_at).collect(),
            hashes: rows.iter().map(|r| r.hash.as_slice()).collect(),
            log_hashes: rows.iter().map(|r| r.log_hash.as_slice()).collect(),
        }
    }
}

/// The idempotency keys a plan records, column by column, as `annals_append` takes them
/// (each payload as its canonical text).
struct IdempotencyColumns<'a> {
    names: Vec<&'a str>,
    hashes: Vec<&'a str>,
    payloads: Vec<String>,
    streams: Vec<&'a str>,
    versions: Vec<i64>,
    positions: Vec<i64>,
    recorded: Vec<DateTime<Utc>>,
}

impl<'a> IdempotencyColumns<'a> {
    fn of(keys: &'a [IdempotencyRecord]) -> Self {
        IdempotencyColumns {
            names: keys.iter().map(|k| k.key.as_str()).collect(),
            hashes: keys.iter().map(|k| k.request_hash.as_str()).collect(),
            payloads: keys
                .iter()
                .map(|k| crate::chain::canonical_json(&k.payload))
                .collect(),
            streams: keys.iter().map(|k| k.stream.as_str()).collect(),
            versions: keys.iter().map(|k| to_sql_int(k.version)).collect(),
            positions: keys.iter().map(|k| to_sql_int(k.last_position)).collect(),
            recorded: keys.iter().map(|k| k.recorded_at).collect(),
        }
    }
}

/// The claims a plan takes (key, holder stream, position), column by column.
struct TakenClaimColumns<'a> {
    keys: Vec<&'a str>,
    streams: Vec<&'a str>,
    positions: Vec<i64>,
}

impl<'a> TakenClaimColumns<'a> {
    fn of(taken: &'a [(String, String, u64)]) -> Self {
        TakenClaimColumns {
            keys: taken.iter().map(|(k, _, _)| k.as_str()).collect(),
            streams: taken.iter().map(|(_, s, _)| s.as_str()).collect(),
            positions: taken.iter().map(|(_, _, p)| to_sql_int(*p)).collect(),
        }
    }
}

/// The data keys a plan stores (subject, wrapped key, master key check), column by
/// column.
struct NewKeyColumns<'a> {
    subjects: Vec<&'a str>,
    wrapped: Vec<&'a [u8]>,
    checks: Vec<&'a [u8]>,
}

impl<'a> NewKeyColumns<'a> {
    fn of(new_keys: &'a [(String, Vec<u8>, Vec<u8>)]) -> Self {
        NewKeyColumns {
            subjects: new_keys.iter().map(|k| k.0.as_str()).collect(),
            wrapped: new_keys.iter().map(|k| k.1.as_slice()).collect(),
            checks: new_keys.iter().map(|k| k.2.as_slice()).collect(),
        }
    }
}

/// What a failed `annals_append` means: its refusal of a data key (see
/// `sql::key_refused`), or the database's error as it is.
fn append_refused(error: sqlx::Error, plan: &Plan) -> StoreError {
    let refused = error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == KEY_REFUSED_SQLSTATE);
    if refused {
        // The batch's own subject when it has one key (a batch that fails is written
        // again in halves, so each append ends up alone).
        match plan.new_keys.as_slice() {
            [(subject, _, _)] => sql::key_refused(subject),
            _ => sql::key_refused("a stream of the batch"),
        }
    } else {
        StoreError::from(error)
    }
}

/// The query of a `read_all` page. With a filter, one branch per event type (or, with
/// categories only, per category), each an ordered scan of its own index that stops at
/// the limit, merged by position: an index on `(category, position)` read for several
/// values at once (`= ANY`) returns rows out of position order, and PostgreSQL would
/// then fetch and sort every later matching row for each page.
/// Parameters: $1 from, $2 head, $3 limit, $4 event types, $5 categories.
fn read_all_sql(filter: &LogFilter) -> String {
    let columns = <Postgres as Dialect>::EVENT_COLUMNS;
    let range = "position >= $1 AND position <= $2";
    // Every variant names all five parameters (these conditions are always true), so
    // one binding serves them all.
    let all_bound = "cardinality($4::text[]) >= 0 AND cardinality($5::text[]) >= 0";
    if filter.event_types.is_empty() && filter.categories.is_empty() {
        return format!(
            "SELECT {columns} FROM events WHERE {range} AND {all_bound} \
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
                "(SELECT {columns} FROM events WHERE {condition} AND {range} \
                  ORDER BY position LIMIT $3)"
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    format!("SELECT * FROM ({union}) AS matching WHERE {all_bound} ORDER BY position LIMIT $3")
}
