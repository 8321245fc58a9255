//! The SQLite dialect: the embedded default, one file in WAL mode with
//! `synchronous=FULL`, so an acknowledged append survives a power cut.
//!
//! SQLite lets one writer in at a time (`BEGIN IMMEDIATE`), so positions are handed out in
//! commit order. Several processes may open the file (a server, the CLI, a second
//! server): leases (`leases`) decide which runs each consumer. Waiting readers are woken
//! by this process's writer, and by polling for anything else's.
//!
//! A writer's waits are bounded by `StoreConfig::lock_timeout`: its turn at this process's
//! write gate, and SQLite's busy timeout on the file; past it the append fails as
//! `Unavailable` (no server can end a stalled holder here, so the waiters give up instead).
//! Writers of this process take turns at the gate, in order, before `BEGIN IMMEDIATE`:
//! SQLite's own busy handler would make a waiting writer sleep in growing steps (up to
//! 100 ms), which showed as tail latency of appends and projections alike.
//!
//! Lists are bound as JSON text and read with `json_each`; times are stored as
//! microseconds since the epoch; event ids as hyphenated text.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteQueryResult, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Connection, Sqlite, SqliteConnection};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::StoreConfig;
use crate::audit::AuditRow;
use crate::batch::{FactsSource, LogFacts, Plan, StoredEvent, ValidAppend};
use crate::chain::Hash;
use crate::error::StoreError;
use crate::model::{IdempotencyRecord, LogFilter};
use crate::sql::{self, Dialect, PREPARED, Param, Sql, SqlStore};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// Creates `file`, readable and writable by its owner only; `None` when it exists. The
/// database holds personal data, as the key file beside it does (`annals-api` makes
/// that one with this too).
pub fn create_private(file: &std::path::Path) -> std::io::Result<Option<std::fs::File>> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(file) {
        Ok(created) => Ok(Some(created)),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(None),
        Err(error) => Err(error),
    }
}

/// The event store on SQLite.
pub type SqliteStore = SqlStore<Sqlite>;

/// An append whose transaction is still open (test support).
#[doc(hidden)]
pub type HeldAppend = sql::HeldAppend<Sqlite>;

impl SqlStore<Sqlite> {
    /// Opens (creating it when missing, readable by its owner only) the database file a
    /// `sqlite:` URL names, with WAL and `synchronous=FULL`, and applies pending
    /// migrations. SQLite gives the `-wal` and `-shm` files the database file's mode.
    pub async fn open(url: &str, config: StoreConfig) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?.create_if_missing(true);
        if !(url.contains(":memory:") || url.contains("mode=memory")) {
            // A file that cannot be made here (a missing directory, say) is left for
            // SQLite to refuse in its own words.
            let _ = create_private(options.get_filename());
        }
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
            .busy_timeout(config.lock_timeout)
            // What a write deletes or overwrites is overwritten with zeros on disk, so an
            // erased lead's email leaves no trace in free pages (see `forget_erased`).
            .pragma("secure_delete", "ON");
        let pool = SqlitePoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .connect_with(options.clone())
            .await?;
        MIGRATOR.run(&pool).await?;
        let write_pool = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        let gate = Arc::new(Mutex::new(()));
        SqlStore::start(pool, write_pool, Some(gate), &config).await
    }
}

/// A list bound as one JSON text, for `json_each`.
fn json_list<T: serde::Serialize>(items: &[T]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".to_owned())
}

#[async_trait]
impl Dialect for Sqlite {
    const EVENT_COLUMNS: &'static str = "position, stream, version, event_id, event_type, \
                                         schema_version, data, metadata, recorded_at, hash";
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";
    // In WAL mode a read transaction keeps the snapshot its first read takes.
    const BEGIN_SNAPSHOT: &'static str = "BEGIN";
    const SELECT_SNAPSHOT: &'static str =
        "SELECT version, schema_version, state FROM snapshots WHERE stream = $1";
    const SAVE_SNAPSHOT: &'static str = "INSERT INTO snapshots (stream, version, schema_version, state, taken_at) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (stream) DO UPDATE \
            SET version = excluded.version, schema_version = excluded.schema_version, \
                state = excluded.state, taken_at = excluded.taken_at \
          WHERE snapshots.version <= excluded.version";
    const IDEMPOTENCY_COLUMNS: &'static str =
        "key, request_hash, payload, stream, version, last_position, recorded_at";
    const AUDIT_STREAMS: &'static str = "SELECT stream, version, position, event_id, event_type, schema_version, data, \
                metadata, recorded_at, hash \
           FROM events ORDER BY stream, version";

    const LOCK_DATA_KEYS: Option<&'static str> = None;
    const PURGE_OVERWRITTEN: Option<&'static str> = Some("PRAGMA wal_checkpoint(TRUNCATE)");
    // A join probes the key for each subject; `IN (SELECT …)` first built an index of
    // the list, and cost half as much again.
    // One row for them all (see `keys_found`): sqlx's SQLite driver costs more per row
    // than the look-up itself, and a page of new leads reads a key per event.
    const KEYS_OF: &'static str = "SELECT group_concat(d.subject || ' ' || \
         CASE WHEN d.wrapped IS NULL THEN '-' ELSE 'x' || hex(d.wrapped) END, ' ') AS keys \
         FROM json_each($1) AS j JOIN data_keys AS d ON d.subject = j.value";
    const BEGIN_TABLES_WRITE: &'static str = Self::BEGIN_WRITE;
    // SQLite plans by its indexes, not by table sizes, and re-preparing the read models'
    // large multi-row statements halved its rebuild rate.
    const PREPARE_TABLE_STATEMENTS: bool = true;
    const SHARE_LOCK: &'static str = "";
    /// The file's own clock, as every process on it reads it (one machine's).
    const NOW_MICROS: &'static str =
        "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)";
    const SCHEMA_OF: &'static str = "SELECT name FROM sqlite_master \
                                      WHERE tbl_name = $1 AND type IN ('table', 'index')";
    const EXPLAIN: &'static str = "EXPLAIN QUERY PLAN ";
    const EXPLAIN_COLUMN: &'static str = "detail";

    fn placeholder(_n: usize) -> String {
        "?".to_owned()
    }

    fn time(at: DateTime<Utc>) -> Param<'static> {
        Param::Int(Some(at.timestamp_micros()))
    }

    fn read_time(row: &SqliteRow, column: &str) -> Result<DateTime<Utc>, StoreError> {
        let micros = Self::required(Self::int, row, column)?;
        DateTime::from_timestamp_micros(micros)
            .ok_or_else(|| StoreError::Corrupt(format!("{column} {micros}")))
    }

    fn read_event_id(row: &SqliteRow) -> Result<Uuid, StoreError> {
        let text = Self::required(Self::text, row, "event_id")?;
        Uuid::parse_str(&text).map_err(|_| StoreError::Corrupt(format!("event id {text:?}")))
    }

    fn rows_affected(done: &SqliteQueryResult) -> u64 {
        done.rows_affected()
    }

    fn audit_row(row: &SqliteRow) -> Result<AuditRow, StoreError> {
        let text = |column| Self::required(Self::text, row, column);
        Ok(AuditRow {
            event_id: Self::read_event_id(row)?,
            stream: text("stream")?,
            version: Self::count(row, "version")?,
            position: Self::count(row, "position")?,
            event_type: text("event_type")?,
            schema_version: sql::schema_version::<Self>(row)?,
            // The text as stored is the text hashed.
            data: text("data")?,
            metadata: text("metadata")?,
            recorded_at_micros: Self::required(Self::int, row, "recorded_at")?,
            hash: Self::required(Self::bytes, row, "hash")?,
        })
    }

    /// `KEYS_OF`'s one text: pairs of a subject and `x` then its key in hex, or `-` for
    /// a shredded key (a stream name has no space).
    fn keys_found(rows: &[SqliteRow]) -> Result<HashMap<String, Option<Vec<u8>>>, StoreError> {
        let found = match rows.first() {
            Some(row) => Self::text(row, "keys")?.unwrap_or_default(),
            None => String::new(),
        };
        let corrupt =
            || StoreError::Corrupt("the data keys read are not pairs of subject and key".into());
        let mut words = found.split(' ').filter(|word| !word.is_empty());
        let mut keys = HashMap::with_capacity(found.matches(' ').count() / 2 + 1);
        while let Some(subject) = words.next() {
            let key = words.next().ok_or_else(corrupt)?;
            let wrapped = match key.strip_prefix('x') {
                Some(hex) => Some(const_hex::decode(hex).map_err(|_| corrupt())?),
                None if key == "-" => None,
                None => return Err(corrupt()),
            };
            keys.insert(subject.to_owned(), wrapped);
        }
        Ok(keys)
    }

    async fn read_facts(
        connection: &mut SqliteConnection,
        batch: &[ValidAppend],
        source: FactsSource,
    ) -> Result<LogFacts, StoreError> {
        let wanted = LogFacts::wanted(batch);
        let mut facts = LogFacts::default();
        read_stream_heads(connection, &wanted.streams, &mut facts).await?;
        if source == FactsSource::ReadWithIds {
            read_stored_events(connection, &wanted.event_ids, &mut facts).await?;
        }
        if !wanted.claim_keys.is_empty() {
            read_claims(connection, &wanted.claim_keys, &mut facts).await?;
        }
        if source == FactsSource::ReadWithIds && !wanted.idempotency_keys.is_empty() {
            read_idempotency_keys(connection, &wanted.idempotency_keys, &mut facts).await?;
        }
        (facts.last_position, facts.last_log_hash) = sql::log_head::<Self>(connection).await?;
        Ok(facts)
    }

    async fn insert(
        connection: &mut SqliteConnection,
        _planned_on_last: u64,
        plan: &Plan,
    ) -> Result<(), StoreError> {
        insert_events(connection, plan).await?;
        for key in &plan.claims_released {
            Self::execute(
                connection,
                "DELETE FROM claims WHERE key = $1",
                &[key.as_str().into()],
                PREPARED,
            )
            .await?;
        }
        insert_idempotency_keys(connection, &plan.idempotency).await?;
        take_claims(connection, &plan.claims_taken).await?;
        sql::store_new_keys::<Self>(connection, plan).await?;
        sql::shred_keys::<Self>(connection, plan).await
    }

    async fn write_attempt(
        connection: &mut SqliteConnection,
        batch: &[ValidAppend],
        source: FactsSource,
        remembered: Option<LogFacts>,
    ) -> Result<Option<Plan>, StoreError> {
        let mut transaction = connection.begin_with(Self::BEGIN_WRITE).await?;
        let facts = match remembered {
            Some(facts) => {
                // Another writer (another process on the file) may have moved the head
                // since; one read of the head row, in process, settles it.
                if sql::log_head::<Self>(&mut transaction).await?.0 != facts.last_position {
                    transaction.rollback().await?;
                    return Ok(None);
                }
                facts
            }
            None => Self::read_facts(&mut transaction, batch, source).await?,
        };
        sql::plan_and_commit(transaction, batch, facts, source).await
    }

    async fn read_page(
        connection: &mut SqliteConnection,
        from: u64,
        head: u64,
        limit: usize,
        filter: &LogFilter,
    ) -> Result<Vec<SqliteRow>, StoreError> {
        let sql = format!(
            "SELECT {} FROM events \
              WHERE position >= $1 AND position <= $2 \
                AND (json_array_length($3) = 0 OR event_type IN (SELECT value FROM json_each($3))) \
                AND (json_array_length($4) = 0 OR category IN (SELECT value FROM json_each($4))) \
              ORDER BY position LIMIT $5",
            Self::EVENT_COLUMNS
        );
        let types = json_list(&filter.event_types);
        let categories = json_list(&filter.categories);
        let params: [Param<'_>; 5] = [
            from.into(),
            head.into(),
            types.as_str().into(),
            categories.as_str().into(),
            limit.into(),
        ];
        Ok(Self::fetch_all(connection, &sql, &params, PREPARED).await?)
    }

    async fn store_log_hashes(
        connection: &mut SqliteConnection,
        rows: &[(u64, Hash)],
    ) -> Result<(), StoreError> {
        for (position, hash) in rows {
            Self::execute(
                connection,
                "UPDATE events SET log_hash = $1 WHERE position = $2",
                &[hash.as_slice().into(), (*position).into()],
                PREPARED,
            )
            .await?;
        }
        Ok(())
    }
}

/// The version and last hash of each of `streams` that exists.
async fn read_stream_heads(
    connection: &mut SqliteConnection,
    streams: &[String],
    facts: &mut LogFacts,
) -> Result<(), StoreError> {
    let streams = json_list(streams);
    let heads = Sqlite::fetch_all(
        connection,
        "SELECT e.stream, e.version, e.hash FROM json_each($1) AS s \
           JOIN events AS e ON e.stream = s.value \
            AND e.version = (SELECT MAX(version) FROM events WHERE stream = s.value)",
        &[streams.as_str().into()],
        PREPARED,
    )
    .await?;
    for row in heads {
        let hash: Hash = Sqlite::required(Sqlite::bytes, &row, "hash")?
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::Corrupt("hash of a stream head".into()))?;
        let stream = Sqlite::required(Sqlite::text, &row, "stream")?;
        facts
            .heads
            .insert(stream, (Sqlite::count(&row, "version")?, hash));
    }
    Ok(())
}

/// The stored events that reuse the batch's ids.
async fn read_stored_events(
    connection: &mut SqliteConnection,
    event_ids: &[Uuid],
    facts: &mut LogFacts,
) -> Result<(), StoreError> {
    let ids = json_list(event_ids);
    let stored = Sqlite::fetch_all(
        connection,
        "SELECT event_id, stream, version, position, event_type, schema_version, data \
           FROM events WHERE event_id IN (SELECT value FROM json_each($1))",
        &[ids.as_str().into()],
        PREPARED,
    )
    .await?;
    for row in stored {
        let text = |column| Sqlite::required(Sqlite::text, &row, column);
        facts.stored.insert(
            Sqlite::read_event_id(&row)?,
            StoredEvent {
                stream: text("stream")?,
                version: Sqlite::count(&row, "version")?,
                position: Sqlite::count(&row, "position")?,
                event_type: text("event_type")?,
                schema_version: sql::schema_version::<Sqlite>(&row)?,
                // Stored as canonical text already.
                data: text("data")?,
            },
        );
    }
    Ok(())
}

/// The holder of each of `claim_keys` that is held.
async fn read_claims(
    connection: &mut SqliteConnection,
    claim_keys: &[String],
    facts: &mut LogFacts,
) -> Result<(), StoreError> {
    let keys = json_list(claim_keys);
    let claims = Sqlite::fetch_all(
        connection,
        "SELECT key, stream FROM claims WHERE key IN (SELECT value FROM json_each($1))",
        &[keys.as_str().into()],
        PREPARED,
    )
    .await?;
    for row in claims {
        facts.claims.insert(
            Sqlite::required(Sqlite::text, &row, "key")?,
            Sqlite::required(Sqlite::text, &row, "stream")?,
        );
    }
    Ok(())
}

/// The stored idempotency keys the batch carries.
async fn read_idempotency_keys(
    connection: &mut SqliteConnection,
    idempotency_keys: &[String],
    facts: &mut LogFacts,
) -> Result<(), StoreError> {
    let keys = json_list(idempotency_keys);
    let sql = format!(
        "SELECT {} FROM idempotency_keys WHERE key IN (SELECT value FROM json_each($1))",
        Sqlite::IDEMPOTENCY_COLUMNS
    );
    let records = Sqlite::fetch_all(connection, &sql, &[keys.as_str().into()], PREPARED).await?;
    for row in records {
        let record = sql::idempotency_record::<Sqlite>(&row)?;
        facts.idempotency.insert(record.key.clone(), record);
    }
    Ok(())
}

/// Inserts a plan's event rows and, when it has any, moves the log's head row to its
/// last position and log hash.
async fn insert_events(connection: &mut SqliteConnection, plan: &Plan) -> Result<(), StoreError> {
    for row in &plan.rows {
        let event_id = row.event_id.hyphenated().to_string();
        let params = [
            row.position.into(),
            row.stream.as_str().into(),
            row.category.as_str().into(),
            row.version.into(),
            event_id.as_str().into(),
            row.event_type.as_str().into(),
            u64::from(row.schema_version).into(),
            row.data.as_str().into(),
            row.metadata.as_str().into(),
            Sqlite::time(row.recorded_at),
            row.hash.as_slice().into(),
            row.log_hash.as_slice().into(),
        ];
        Sqlite::execute(
            connection,
            "INSERT INTO events (position, stream, category, version, event_id, event_type, \
                                 schema_version, data, metadata, recorded_at, hash, log_hash) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            &params,
            PREPARED,
        )
        .await?;
    }
    if !plan.rows.is_empty() {
        let params = [
            plan.last_position.into(),
            plan.last_log_hash.as_slice().into(),
        ];
        Sqlite::execute(
            connection,
            "UPDATE log_head SET position = $1, hash = $2 WHERE id = 1",
            &params,
            PREPARED,
        )
        .await?;
    }
    Ok(())
}

/// Records a plan's idempotency keys, each payload as its canonical text.
async fn insert_idempotency_keys(
    connection: &mut SqliteConnection,
    records: &[IdempotencyRecord],
) -> Result<(), StoreError> {
    for record in records {
        let payload = crate::chain::canonical_json(&record.payload);
        let params = [
            record.key.as_str().into(),
            record.request_hash.as_str().into(),
            payload.as_str().into(),
            record.stream.as_str().into(),
            record.version.into(),
            record.last_position.into(),
            Sqlite::time(record.recorded_at),
        ];
        Sqlite::execute(
            connection,
            "INSERT INTO idempotency_keys (key, request_hash, payload, stream, version, \
                                           last_position, recorded_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &params,
            PREPARED,
        )
        .await?;
    }
    Ok(())
}

/// Sets each claim a plan takes to its holder stream and position.
async fn take_claims(
    connection: &mut SqliteConnection,
    taken: &[(String, String, u64)],
) -> Result<(), StoreError> {
    for (key, stream, position) in taken {
        Sqlite::execute(
            connection,
            "INSERT INTO claims (key, stream, position) VALUES ($1, $2, $3) \
             ON CONFLICT (key) DO UPDATE \
                SET stream = excluded.stream, position = excluded.position",
            &[
                key.as_str().into(),
                stream.as_str().into(),
                (*position).into(),
            ],
            PREPARED,
        )
        .await?;
    }
    Ok(())
}
