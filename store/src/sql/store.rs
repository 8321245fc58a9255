//! The event store on a SQL database (`SqlStore`), and its `EventStore` contract written
//! once for every dialect: reads, snapshots, idempotency keys, the audit's walks and the
//! anchors. Appends go to the writer task (`group_commit`) on a connection of its own;
//! everything else runs on the store's pool. A page of the log is read only up to the
//! head read before it, every position of which is committed, so a reader never skips an
//! event. The held append of the tests (`HeldAppend`) is here too: it takes the gate and
//! the writers' lock as a real append does, and commits when the test says.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use sqlx::pool::PoolConnection;
use sqlx::{Connection, Database, Pool, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard, watch};

use super::rows::{event, idempotency_record, log_head, read_head, read_log_head, schema_version};
use super::upgrade::backfill;
use super::write::Writer;
use super::{Dialect, PREPARED};
use crate::audit::{self, LogRow};
use crate::batch::{self, FactsSource};
use crate::chain::GENESIS;
use crate::error::StoreError;
use crate::group_commit::GroupCommit;
use crate::model::{
    Anchor, AppendOutcome, AppendRequest, AuditReport, Direction, IdempotencyRecord, LogFilter,
    LogPage, RecordedEvent, Snapshot, StreamName, check_snapshot, page,
};
use crate::{EventStore, StoreConfig};

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
