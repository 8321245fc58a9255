//! The Annals event store: an append-only log of events in streams, behind one async
//! contract (`EventStore`) that SQLite (the embedded default) and PostgreSQL serve alike.
//!
//! Invariants every backend keeps, and the conformance suite in `tests/` proves on both:
//! - a stream's versions are 1, 2, … without gaps; one append is atomic, and an append
//!   whose expected version does not match writes nothing;
//! - global positions are given in commit order, so a reader that has seen position `p`
//!   has seen, or will never see, anything below `p`: readers never skip an event;
//! - appending an already stored event again (same id, same place) is a no-op;
//! - each stream, and the whole log, is a SHA-256 hash chain that `verify` re-checks
//!   from the stored rows (see `audit` for what that proves); a position is never given
//!   twice, even after its row was deleted;
//! - `append` returns only after the commit is durable.
//!
//! This crate knows SQL; its public types do not, so another backend can serve the same
//! trait. It holds no business rules.

mod audit;
mod batch;
mod chain;
mod error;
mod follow;
mod group_commit;
mod keys;
mod layer;
pub mod leases;
mod model;
mod personal;
pub mod postgres;
mod sql;
pub mod sqlite;
mod tables;
pub mod vault;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;

pub use error::{BackendError, InvalidInput, StoreError, is_unavailable};
pub use follow::LogFollower;
pub use group_commit::WriterProbe;
pub use keys::DataKeys;
pub use layer::StoreLayer;
pub use leases::{Lease, LeaseState, holder_of_this_process};
pub use model::{
    Anchor, AppendOutcome, AppendRequest, AuditReport, BrokenLink, Claim, Direction,
    ExpectedVersion, IdempotencyKey, IdempotencyRecord, LogFilter, LogPage, MAX_EVENTS_PER_APPEND,
    MAX_IDEMPOTENCY_KEY_LEN, MAX_NAME_LEN, Metadata, NewEvent, RecordedEvent, Snapshot, StreamName,
    to_sql_int,
};
pub use personal::{EncryptedStore, PersonalFields};
pub use postgres::PostgresStore;
pub use sql::{Param, SqlStore};
pub use sqlite::SqliteStore;
pub use tables::{Tables, TablesTx};

/// The event store contract.
#[async_trait]
pub trait EventStore: Send + Sync + std::fmt::Debug {
    /// Appends the request's events (and takes or releases its claims) atomically, if the
    /// stream is at the expected version. Returns after the commit is durable.
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError>;

    /// Up to `limit` events of one stream, from `from_version` (inclusive) in `direction`.
    async fn read_stream(
        &self,
        stream: &StreamName,
        from_version: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Up to `limit` events of the global log matching `filter`, from `from_position`
    /// (inclusive) in increasing position.
    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
        filter: &LogFilter,
    ) -> Result<LogPage, StoreError>;

    /// The position of the last event in the log (0 when it is empty).
    async fn head(&self) -> Result<u64, StoreError>;

    /// Waits until the log's head is beyond `after`, or until `timeout`; returns the head
    /// then. Wakes within milliseconds of a commit (in this process, or any process on
    /// PostgreSQL), and polls as a fallback.
    async fn wait_for_events(&self, after: u64, timeout: Duration) -> Result<u64, StoreError>;

    /// Saves a snapshot; an older snapshot than the one stored is ignored.
    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError>;

    /// The latest snapshot of a stream, if any.
    async fn load_snapshot(&self, stream: &StreamName) -> Result<Option<Snapshot>, StoreError>;

    /// The stored idempotency key, if any.
    async fn find_idempotency(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError>;

    /// Forgets idempotency keys recorded before the given time; returns how many.
    async fn purge_idempotency(
        &self,
        recorded_before: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64, StoreError>;

    /// Walks every stream's hash chain and the log's from the stored rows, in one
    /// snapshot, and checks the log's head row (see `audit`).
    async fn verify(&self) -> Result<AuditReport, StoreError>;

    /// The log's head as its head row records it: the last position given and its log
    /// hash, for an operator to keep elsewhere.
    async fn anchor(&self) -> Result<Anchor, StoreError>;

    /// The position whose stored log hash is `hash` (hex), if the log holds it. Together
    /// with a `verify` that finds nothing broken, `Some` proves the log up to there is
    /// the one the anchor was taken from.
    async fn find_anchor(&self, hash: &str) -> Result<Option<u64>, StoreError>;
}

/// Settings shared by the backends.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Connections for reads (PostgreSQL) or readers (SQLite); writes have their own.
    pub max_connections: u32,
    /// How often a waiting reader looks at the head when no notification came.
    pub poll_interval: Duration,
    /// How long a writer waits for the writers' lock before its append fails as
    /// `Unavailable`: PostgreSQL's `lock_timeout` on the writer's session; on SQLite the
    /// wait for this process's writer turn and the busy timeout on the file.
    pub lock_timeout: Duration,
    /// PostgreSQL's `statement_timeout` on the writer's session: no statement of a write
    /// (reading the facts, the insert, the commit) runs longer on the server.
    pub statement_timeout: Duration,
    /// PostgreSQL's `idle_in_transaction_session_timeout` on every session of the store:
    /// a session that stalls inside a transaction (a frozen process holding the writers'
    /// lock) is ended by the server, which releases its locks.
    pub idle_in_transaction_timeout: Duration,
    /// The longest one write attempt may take in the writer task, from taking the
    /// connection to the commit's answer: past it the connection is dropped and the
    /// batch's callers get `Unavailable` (the case of a half-open socket, which no server
    /// setting ends). Keep it above `lock_timeout`.
    pub commit_timeout: Duration,
    /// Bytes of appends (their events' data and metadata) waiting for the writer, at
    /// most; past it `append` waits for room, as it does past the queue's length.
    pub max_queued_bytes: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_connections: 16,
            poll_interval: Duration::from_millis(500),
            lock_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(30),
            idle_in_transaction_timeout: Duration::from_secs(30),
            commit_timeout: Duration::from_secs(45),
            max_queued_bytes: 64 << 20,
        }
    }
}

/// A database a URL names, opened and migrated: its event store, and the tables beside
/// the log on the same database (read models, leases), which must commit with it.
#[derive(Debug, Clone)]
pub struct Backend {
    event_store: Arc<dyn EventStore>,
    tables: Arc<dyn Tables>,
    keys: Arc<dyn DataKeys>,
    /// Set once the event store seals personal data (`with_personal_data`).
    encrypted: Option<Arc<EncryptedStore>>,
}

impl Backend {
    fn of<S: EventStore + Tables + DataKeys + Clone + 'static>(store: S) -> Self {
        Backend {
            event_store: Arc::new(store.clone()),
            tables: Arc::new(store.clone()),
            keys: Arc::new(store),
            encrypted: None,
        }
    }

    /// The same database, its event store sealing the personal fields `personal` names
    /// under keys wrapped by `master` (see `personal`); refused when `master` is not
    /// the key the database was first started with.
    pub async fn with_personal_data(
        mut self,
        master: &vault::MasterKey,
        personal: PersonalFields,
    ) -> Result<Self, StoreError> {
        let encrypted = Arc::new(
            EncryptedStore::open(
                self.event_store.clone(),
                self.keys.clone(),
                master,
                personal,
            )
            .await?,
        );
        self.event_store = encrypted.clone();
        self.encrypted = Some(encrypted);
        Ok(self)
    }

    /// The event store, behind the contract.
    pub fn event_store(&self) -> Arc<dyn EventStore> {
        self.event_store.clone()
    }

    /// The store of the data keys.
    pub fn data_keys(&self) -> Arc<dyn DataKeys> {
        self.keys.clone()
    }

    /// The sealing event store, when personal data is sealed.
    pub fn personal_data(&self) -> Option<Arc<EncryptedStore>> {
        self.encrypted.clone()
    }

    /// The tables beside the log, and the leases, on the same database.
    pub fn tables(&self) -> Arc<dyn Tables> {
        self.tables.clone()
    }
}

/// Opens the database a URL names (`sqlite:…` or `postgres://…`), applying pending
/// migrations: the one place a URL is read, and the one list of backends.
pub async fn open(url: &str, config: StoreConfig) -> Result<Backend, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Backend::of(PostgresStore::open(url, config).await?))
    } else if url.starts_with("sqlite:") {
        Ok(Backend::of(SqliteStore::open(url, config).await?))
    } else {
        Err(StoreError::UnsupportedUrl)
    }
}

/// Counts itself in a probe's counter for as long as it lives (also when the future
/// holding it is cancelled): a reader waiting for the head, a caller waiting for room.
pub(crate) struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    pub(crate) fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Counted(count)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Moves this process's head watch to `position` if that is further; readers waiting
/// on the watch wake only when it moves.
pub(crate) fn raise_head(head: &tokio::sync::watch::Sender<u64>, position: u64) {
    head.send_if_modified(|h| {
        let newer = position > *h;
        if newer {
            *h = position;
        }
        newer
    });
}

/// Waits on this process's head watch, re-reading the head from the database every poll
/// interval in case a notification was missed. `parked` counts the readers that read the
/// head, found nothing new and wait for a wake-up (test support: what a test waits for
/// before it commits, so that only the wake-up can end the wait).
pub(crate) async fn wait_for_head<F, Fut>(
    head: &tokio::sync::watch::Sender<u64>,
    parked: &AtomicUsize,
    after: u64,
    timeout: Duration,
    poll_interval: Duration,
    read_head: F,
) -> Result<u64, StoreError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<u64, StoreError>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut receiver = head.subscribe();
    loop {
        let read = read_head().await?;
        raise_head(head, read);
        // A commit whose wake-up came while the head was read is in the watch, not in
        // `read`: take the watch's value (and mark it seen), or it would wait for the next.
        let current = *receiver.borrow_and_update();
        if current > after {
            return Ok(current);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(current);
        }
        let wake = deadline.min(now + poll_interval);
        let _parked = Counted::new(parked);
        tokio::select! {
            changed = receiver.changed() => {
                if changed.is_ok() {
                    let seen = *receiver.borrow_and_update();
                    if seen > after {
                        return Ok(seen);
                    }
                }
            }
            () = tokio::time::sleep_until(wake) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    /// A commit that lands while a reader reads the head (after the read's snapshot, with
    /// its wake-up before the reader waits) still wakes the reader: it is in the watch.
    #[tokio::test]
    async fn a_commit_raised_while_the_head_is_read_is_not_missed() {
        let head = tokio::sync::watch::Sender::new(1);
        let parked = AtomicUsize::new(0);
        let reads = AtomicUsize::new(0);
        let read_head = || {
            let first = reads.fetch_add(1, Ordering::SeqCst) == 0;
            if first {
                // Position 2 commits and its writer raises the watch while the answer,
                // read before the commit, is on its way.
                super::raise_head(&head, 2);
            }
            std::future::ready(Ok(if first { 1 } else { 2 }))
        };
        let started = Instant::now();
        // Readers poll every 60 s: returning before the 30 s deadline is the wake-up.
        let woke = super::wait_for_head(
            &head,
            &parked,
            1,
            Duration::from_secs(30),
            Duration::from_secs(60),
            read_head,
        )
        .await
        .unwrap();
        assert_eq!(woke, 2);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "woken after {:?}",
            started.elapsed()
        );
    }
}
