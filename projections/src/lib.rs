//! The projector runtime and the read models: projectors follow the global log and apply
//! each event exactly once, committing their rows and their checkpoint in one
//! transaction of the event store's own database.
//!
//! Every read-model row belongs to a *generation* of its projection; readers see only the
//! live one. A rebuild fills a new generation from position 0 beside the live one and
//! swaps by changing one value, so readers never see a half-built read model; verify
//! fills a scratch generation and compares it with the live one at the same position.
//!
//! Invariants: a checkpoint only moves in the transaction that applied the events up to
//! it, and only from the value the runner read (a runner that lost a race applies
//! nothing); a read model is a pure function of the log (no clock, no randomness), so a
//! rebuild from position 0 gives the same rows. Projectors never append events;
//! processes act only through commands.
//!
//! Generations: a rebuild or verify first *claims* the projection (one at a time; a
//! claim not renewed for `CLAIM_STALE`, 30 s, may be taken over) and in the same statement
//! takes a new generation from a counter that only grows, so no two claims ever share
//! one, and reads which generation is live. Only a claim's holder swaps, and a
//! generation is dropped only in a transaction that still holds the claim and has read
//! the live generation under it: never the live one, and never by a claimant whose
//! claim was taken over.
//! A batch commits only to a generation that is live or claimed as of its commit (it
//! holds the projections row that a swap or a claim updates), so a live runner that
//! read the generation before a swap applies nothing to the old one, and `applied`
//! (what `wait_for` answers from) never runs ahead of the live checkpoint. Verify
//! compares in one read-only snapshot in which both generations stand at one position,
//! in bounded pages by key, holding up no writer.
//!
//! Parked events (dead letters): only an event's own failure parks it (the projector
//! refuses it, or the database refuses what it made of it); an outage (a timeout, a
//! deadlock, a serialization failure, a lock not granted, a lost connection, a busy
//! SQLite file) is retried with backoff and never parks anything. An operator's retry
//! applies a parked event in its place in the log, in one transaction that holds the
//! live checkpoint row (every batch takes that row before it reads any other, so a
//! batch either sees the retry or waits for it) and re-reads the dead letter (a second
//! retry finds nothing to apply); a skip leaves the event unapplied for good, recorded
//! with who and when.

pub mod account_360;
pub mod deal_board;
pub mod lead_board;
pub mod queries;
pub mod rows;
mod sql;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use annals_store::{EventStore, LogFilter, RecordedEvent, StoreError, to_sql_int};
use async_trait::async_trait;
use rows::Column;
use serde::Serialize;
use tokio::sync::watch;

pub use annals_store::Param;
pub use sql::{ReadDatabase, ReadTx};

/// Every read model, in a stable order: the one list a new read model joins.
pub fn read_models() -> Vec<Arc<dyn Projector>> {
    vec![
        Arc::new(lead_board::LeadBoard),
        Arc::new(deal_board::DealBoard),
        Arc::new(account_360::Account360),
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// Reading the log failed.
    #[error("reading the log failed")]
    Store(#[from] StoreError),
    /// The read-model database failed (an outage is `StoreError::Unavailable`) or
    /// refused a statement (`StoreError::is_refusal`): only such a refusal is an
    /// event's own failure (`is_poison`).
    #[error("read-model database error")]
    Database(#[source] StoreError),
    #[error("event at position {position} ({event_type}) cannot be projected: {reason}")]
    Apply {
        position: u64,
        event_type: String,
        reason: String,
    },
    #[error("projection {0}'s checkpoint moved under this runner; another runner owns it")]
    CheckpointMoved(String),
    #[error("projection {0} is already being rebuilt or verified")]
    Busy(String),
    #[error("a read-model row is corrupt: {0}")]
    Corrupt(String),
    /// A read model's table, made before, lacks a column its `row!` declares now.
    #[error(
        "table {table} does not have the columns read model {projection} declares; a \
         read model whose columns changed needs a new name, or its table dropped: the next \
         start makes it again and the read model applies the log from position 0"
    )]
    TableChanged {
        projection: String,
        table: String,
        #[source]
        refusal: StoreError,
    },
    #[error("the cursor is not one this server gave out")]
    InvalidCursor,
    /// An operator named an event the consumer has not parked (never parked, already
    /// retried, or skipped).
    #[error("{consumer} has no parked event at position {position}")]
    NotParked { consumer: String, position: u64 },
    /// An operator's retry of a parked event failed again; the event stays parked with
    /// this error.
    #[error("the event at position {position} still fails: {reason}")]
    StillFailing { position: u64, reason: String },
}

/// A failed batch: the error, and the event it belongs to when that is known.
#[derive(Debug)]
pub struct Failure {
    pub position: Option<u64>,
    pub error: ProjectionError,
}

impl Failure {
    /// A failure of the batch as a whole (writing it), not of one event.
    pub fn unplaced(error: ProjectionError) -> Self {
        Failure {
            position: None,
            error,
        }
    }
}

/// A read-model table, declared once (by `row!`): what creates it, and what rebuild and
/// verify see of it.
#[derive(Debug, Clone, Copy)]
pub struct Table {
    pub name: &'static str,
    /// The columns compared by verify (all but `generation`).
    pub columns: &'static [&'static str],
    /// Each column's SQL type and nullability, in `columns` order.
    pub types: &'static [&'static str],
    /// The key column, for a stable order; with `generation`, the primary key.
    pub key: &'static str,
    pub indexes: &'static [Index],
}

/// An index of a read-model table, for its queries; led by `generation`, as every
/// read-model query is.
#[derive(Debug, Clone, Copy)]
pub struct Index {
    pub name: &'static str,
    /// The columns after `generation`, with any `DESC`.
    pub columns: &'static str,
    /// A partial index's condition: the rows it holds.
    pub only_where: Option<&'static str>,
}

impl Table {
    /// The statement that creates the table, in SQL both backends accept.
    pub fn create_table_statement(&self) -> String {
        let columns: String = self
            .columns
            .iter()
            .zip(self.types)
            .map(|(column, kind)| format!("{column} {kind}, "))
            .collect();
        format!(
            "CREATE TABLE IF NOT EXISTS {} (generation BIGINT NOT NULL, {columns}\
             PRIMARY KEY (generation, {}))",
            self.name, self.key
        )
    }

    /// The statement that creates one of its indexes.
    pub fn create_index_statement(&self, index: &Index) -> String {
        let only = index
            .only_where
            .map(|only| format!(" WHERE {only}"))
            .unwrap_or_default();
        format!(
            "CREATE INDEX IF NOT EXISTS {} ON {} (generation, {}){only}",
            index.name, self.name, index.columns
        )
    }

    /// The statements that create the table and all its indexes.
    pub fn create_statements(&self) -> Vec<String> {
        let mut statements = vec![self.create_table_statement()];
        statements.extend(self.indexes.iter().map(|i| self.create_index_statement(i)));
        statements
    }
}

/// Turns events into rows of a read model.
#[async_trait]
pub trait Projector: Send + Sync + std::fmt::Debug {
    /// The projection's stable name (its checkpoints' key).
    fn name(&self) -> &'static str;
    /// The events it wants; others are skipped without a call.
    fn filter(&self) -> LogFilter;
    /// The tables it writes; each has a `generation` column.
    fn tables(&self) -> &'static [Table];
    /// Applies a batch of events, in order, inside the batch's transaction, to
    /// `tx.generation()`. Must not read the clock or anything but the events and its own
    /// rows.
    async fn apply(&self, tx: &mut ReadTx, events: &[RecordedEvent]) -> Result<(), Failure>;

    /// Whether every row is folded from the events of one stream only, so that the
    /// history `refold` needs is the retried event's stream rather than the whole log.
    fn rows_follow_streams(&self) -> bool {
        false
    }

    /// Re-folds, in `tx.generation()`, the rows `event` touches from `history`: the
    /// events up to the checkpoint that the projection applies (now including `event`),
    /// in log order, from the stream of `event` when `rows_follow_streams`, else from
    /// the whole log. Used to apply a parked event behind the checkpoint in its place in
    /// the log rather than on top of rows later events changed. A projector whose rows
    /// are not folded per key cannot, and refuses.
    async fn refold(
        &self,
        _tx: &mut ReadTx,
        event: &RecordedEvent,
        _history: &[RecordedEvent],
    ) -> Result<(), Failure> {
        Err(Failure {
            position: Some(event.position),
            error: ProjectionError::Apply {
                position: event.position,
                event_type: event.event_type.clone(),
                reason: format!("{} cannot re-fold its rows from the log", self.name()),
            },
        })
    }
}

/// What one step of a runner did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Events were applied (or skipped by the filter) and the checkpoint moved, or an
    /// event that kept failing was parked and will be skipped.
    Applied(usize),
    /// Nothing new in the log (up to the limit asked for).
    CaughtUp,
    /// The projection halted on a parked event; it waits for an operator's retry.
    Halted,
}

/// What a projection does with an event it cannot apply after its retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Park it and stop before it, until an operator retries: the read model stays
    /// exact but falls behind.
    Halt,
    /// Park it and go on without it: the read model stays current but lacks the event
    /// until an operator retries it.
    Skip,
}

/// An event a projection could not apply (a dead letter): parked until an operator
/// retries it, or skipped for good (then it stays recorded, with who and when).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParkedEvent {
    pub position: u64,
    /// `None` only for events parked before event ids were recorded.
    pub event_id: Option<String>,
    pub event_type: String,
    /// The last error applying it gave.
    pub error: String,
    pub attempts: u64,
    /// When it was parked (RFC 3339); `None` for events parked before this was recorded.
    pub parked_at: Option<String>,
    /// Who skipped it, when skipped.
    pub skipped_by: Option<String>,
    pub skipped_at: Option<String>,
}

/// A projection as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProjectionStatus {
    pub name: String,
    pub checkpoint: u64,
    pub head: u64,
    pub lag: u64,
    /// `running`, `catching_up` (more than a batch behind), `rebuilding` or `halted`.
    pub status: &'static str,
    pub last_error: Option<String>,
}

/// What verify found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub equal: bool,
    /// The log position both generations were compared at.
    pub position: u64,
    /// The first differences, at most ten.
    pub differences: Vec<Difference>,
    /// How many pages the comparison read.
    pub pages: u64,
    /// The most rows the comparison held at once (both generations' pages together).
    pub largest_page: usize,
}

/// One way the live read model differs from a rebuild, at one row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub table: String,
    /// The row's key.
    pub key: String,
    pub kind: DifferenceKind,
    /// The column whose value differs (`changed` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// The column's value in the live read model, as text (`changed` only; `None` is
    /// also a NULL).
    pub live: Option<String>,
    /// The column's value a rebuild from position 0 gives.
    pub rebuilt: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DifferenceKind {
    /// The rebuild has the row; the live read model lacks it.
    Missing,
    /// The live read model has a row the rebuild lacks.
    Extra,
    /// Both have the row; one of its columns differs.
    Changed,
}

/// A projection claimed for a rebuild (see `ProjectionRunner::claim_rebuild`). A claim
/// that is never finished goes stale and may be taken over.
#[derive(Debug)]
#[must_use = "a claim holds the projection until it is finished or goes stale"]
pub struct RebuildClaim {
    /// The generation this claim took from the counter; only its holder writes it.
    new: i64,
}

/// A point in a runner's work where a test can pause it (see
/// `ProjectionRunner::with_pause_hook`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PausePoint {
    /// A live step, after it has read which generation is live, before its batch.
    LiveStep,
    /// A rebuild or verify, just before it claims a spare generation.
    Claim,
    /// A rebuild or verify, just after its claim.
    Claimed,
    /// A verify, each time before it opens the snapshot that compares the generations
    /// (its scratch one filled): the live one may move on meanwhile.
    Compare,
    /// A verify, after each page of its comparison.
    ComparePage,
    /// A rebuild or verify filling its generation, after each batch it committed there
    /// (and renewed its claim for) and before the next: readers can look at a
    /// half-built generation beside the live one.
    FillBatch,
    /// Any step (live, rebuild or verify), after it has read its checkpoint and its
    /// batch of events, before the transaction that applies them: a straggler whose
    /// checkpoint another runner may move meanwhile.
    BatchRead,
}

/// What a runner calls at each `PausePoint`; it waits for the future returned.
pub type PauseHook =
    Arc<dyn Fn(PausePoint) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

#[derive(Clone)]
struct Pause(PauseHook);

impl std::fmt::Debug for Pause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PauseHook")
    }
}

/// Runs one projector: reads the log after its checkpoint in batches, and applies each
/// batch and moves the checkpoint in one transaction.
#[derive(Debug)]
pub struct ProjectionRunner {
    store: Arc<dyn EventStore>,
    db: ReadDatabase,
    projector: Arc<dyn Projector>,
    batch_size: usize,
    /// Events per batch (and transaction) when a rebuild or verify fills its generation.
    rebuild_batch: usize,
    /// The last checkpoint of the live generation this runner saw, for `wait_for`.
    applied: watch::Sender<u64>,
    /// The checkpoint the last batch of a rebuild or verify reached, for `progress`.
    progress: watch::Sender<u64>,
    last_error: Mutex<Option<String>>,
    registered: AtomicBool,
    policy: FailurePolicy,
    max_attempts: u32,
    /// The event that is failing now, and how often it has.
    failing: Mutex<Option<(u64, u32)>>,
    /// Rows per page (of each generation) when verify compares.
    verify_page: usize,
    /// How long a claim may go without renewal before another process may take it.
    claim_stale: Duration,
    /// Tests' hook for forcing interleavings; `None` in production.
    pause: Option<Pause>,
}

/// Why a step failed: at an event (which may be parked), or around it.
enum StepError {
    Event {
        position: u64,
        event_id: Option<String>,
        event_type: String,
        error: ProjectionError,
    },
    /// The generation is neither live nor claimed any more (a rebuild swapped it out, or
    /// took its claim over); the batch took nothing.
    Superseded(&'static str),
    Other(ProjectionError),
}

impl<E: Into<ProjectionError>> From<E> for StepError {
    fn from(error: E) -> Self {
        StepError::Other(error.into())
    }
}

impl StepError {
    fn into_error(self) -> ProjectionError {
        match self {
            StepError::Event { error, .. } | StepError::Other(error) => error,
            StepError::Superseded(name) => ProjectionError::CheckpointMoved(name.to_owned()),
        }
    }
}

/// Whether a failure is the event's own (the projector refused it, or the database
/// refused what it made of it), as opposed to an outage, which is retried with backoff
/// forever and never parks an event.
fn is_poison(error: &ProjectionError) -> bool {
    match error {
        ProjectionError::Apply { .. } => true,
        ProjectionError::Database(error) => error.is_refusal(),
        _ => false,
    }
}

/// Events per batch when a rebuild or verify fills its generation, and per page when a
/// retry reads the log (unless `with_rebuild_batch_size` says otherwise).
const REBUILD_BATCH: usize = 5_000;
/// A rebuild or verify renews its claim after every batch (and a comparison every third
/// of this); a claim not renewed for this long belongs to a process that died, and
/// another may take it over (unless `with_claim_stale` says otherwise).
const CLAIM_STALE: Duration = Duration::from_secs(30);

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Now, as dead letters record it: RFC 3339 UTC with microseconds.
fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// How often a process that does not hold a projection's lease tries to take it: the
/// bound on a takeover after the holder dies.
const LEASE_RETRY: Duration = Duration::from_secs(2);

impl ProjectionRunner {
    pub fn new(
        store: Arc<dyn EventStore>,
        db: ReadDatabase,
        projector: Arc<dyn Projector>,
    ) -> Self {
        ProjectionRunner {
            store,
            db,
            projector,
            batch_size: 1_000,
            rebuild_batch: REBUILD_BATCH,
            applied: watch::Sender::new(0),
            progress: watch::Sender::new(0),
            last_error: Mutex::new(None),
            registered: AtomicBool::new(false),
            policy: FailurePolicy::Halt,
            max_attempts: 3,
            failing: Mutex::new(None),
            verify_page: 1_000,
            claim_stale: CLAIM_STALE,
            pause: None,
        }
    }

    /// How many rows of each generation verify reads per page: the bound on the rows it
    /// holds at once.
    pub fn with_verify_page_size(mut self, rows: usize) -> Self {
        self.verify_page = rows.max(1);
        self
    }

    /// How long a rebuild's or verify's claim may go without renewal before another
    /// process takes it for a dead one's (30 s unless set; every process of a
    /// deployment must use the same). A test sets it short to see a claim renewed.
    pub fn with_claim_stale(mut self, stale: Duration) -> Self {
        self.claim_stale = stale;
        self
    }

    /// The time (in microseconds) before which a claim last renewed is stale.
    fn stale_before(&self) -> i64 {
        now_micros().saturating_sub(i64::try_from(self.claim_stale.as_micros()).unwrap_or(i64::MAX))
    }

    /// Calls `hook` at each `PausePoint` this runner reaches and waits for it: lets a
    /// test pause the runner there, act elsewhere, and resume it, to force an
    /// interleaving. Production code sets none.
    pub fn with_pause_hook(mut self, hook: PauseHook) -> Self {
        self.pause = Some(Pause(hook));
        self
    }

    async fn pause(&self, at: PausePoint) {
        if let Some(Pause(hook)) = &self.pause {
            hook(at).await;
        }
    }

    /// What to do with an event that fails `max_attempts` times in a row.
    pub fn with_failure_policy(mut self, policy: FailurePolicy, max_attempts: u32) -> Self {
        self.policy = policy;
        self.max_attempts = max_attempts.max(1);
        self
    }

    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// How many events a rebuild or verify applies per batch (one transaction each) when
    /// it fills its generation, and a retry reads per page; 5,000 unless set. Readers see
    /// the live generation whatever this is; a test sets it small to look at a generation
    /// half-built, or to make a retry read a short stream in several pages.
    pub fn with_rebuild_batch_size(mut self, batch_size: usize) -> Self {
        self.rebuild_batch = batch_size.max(1);
        self
    }

    pub fn name(&self) -> &'static str {
        self.projector.name()
    }

    /// The log position the current rebuild or verify has reached (the last one's, when
    /// none runs), for a progress bar.
    pub fn progress(&self) -> watch::Receiver<u64> {
        self.progress.subscribe()
    }

    /// Makes what the database lacks of the projection: its row in `projections`, its
    /// tables and their indexes as declared; refuses a table that lacks a declared column
    /// (`TableChanged`). Once per runner (later calls cost nothing); every use of the
    /// projection does it first, and a process calls it at start so that its queries
    /// find the tables before the runner's first step. What exists is found in the
    /// catalog, so a process that finds everything made takes no lock and writes nothing.
    pub async fn register(&self) -> Result<(), ProjectionError> {
        if self.registered.load(Ordering::Relaxed) {
            return Ok(());
        }
        let name = self.name();
        let known = self
            .db
            .fetch_int(
                "SELECT COUNT(*) FROM projections WHERE name = $1",
                &[name.into()],
            )
            .await?;
        if known == Some(0) {
            let mut tx = self.db.begin_write(0).await?;
            tx.execute(
                "INSERT INTO projections (name, live_generation, rebuilding) \
                 VALUES ($1, 1, NULL) ON CONFLICT (name) DO NOTHING",
                &[name.into()],
            )
            .await?;
            tx.commit().await?;
        }
        for table in self.projector.tables() {
            let mut attempts = 0;
            loop {
                match self.make_missing(table).await {
                    Ok(()) => break,
                    // Two processes making one table or index at once: PostgreSQL refuses
                    // the one that commits second, which then finds it made.
                    Err(ProjectionError::Database(error)) if error.is_refusal() && attempts < 3 => {
                        attempts += 1;
                    }
                    Err(error) => return Err(error),
                }
            }
        }
        self.registered.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Makes a declared table that does not exist, with its indexes; or, for one that
    /// does, checks its columns and makes the indexes it lacks. A table made here is
    /// empty, so the projection's checkpoints go with it in the same transaction and the
    /// projection applies the log again from position 0 (a table an operator dropped is
    /// rebuilt, never left missing the history before its checkpoint).
    async fn make_missing(&self, table: &Table) -> Result<(), ProjectionError> {
        let made = self.db.schema_of(table.name).await?;
        if made.is_empty() {
            let mut tx = self.db.begin_write(0).await?;
            for statement in table.create_statements() {
                tx.execute(&statement, &[]).await?;
            }
            tx.execute(
                "DELETE FROM projection_checkpoints WHERE name = $1",
                &[self.name().into()],
            )
            .await?;
            return tx.commit().await;
        }
        let sql = format!(
            "SELECT {} FROM {} WHERE 1 = 0",
            table.columns.join(", "),
            table.name
        );
        if let Err(error) = self.db.fetch_text_rows(&sql, &[]).await {
            return Err(match error {
                ProjectionError::Database(error) if error.is_refusal() => {
                    ProjectionError::TableChanged {
                        projection: self.name().to_owned(),
                        table: table.name.to_owned(),
                        refusal: error,
                    }
                }
                error => error,
            });
        }
        for index in table.indexes {
            if !made.iter().any(|name| name == index.name) {
                let mut tx = self.db.begin_write(0).await?;
                tx.execute(&table.create_index_statement(index), &[])
                    .await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// The generation readers see (registering the projection on first use).
    pub async fn live_generation(&self) -> Result<i64, ProjectionError> {
        let name = self.name();
        self.register().await?;
        let mut tx = self.db.begin_read(0).await?;
        let live = tx
            .fetch_int(
                "SELECT live_generation FROM projections WHERE name = $1",
                &[name.into()],
            )
            .await?
            .unwrap_or(1);
        tx.commit().await?;
        Ok(live)
    }

    /// The position up to which the live generation has applied the log.
    pub async fn checkpoint(&self) -> Result<u64, ProjectionError> {
        // One statement: the live generation and its checkpoint as of one snapshot.
        let position = self
            .db
            .fetch_int(
                "SELECT c.position FROM projections p JOIN projection_checkpoints c \
                     ON c.name = p.name AND c.generation = p.live_generation \
                  WHERE p.name = $1",
                &[self.name().into()],
            )
            .await?
            .unwrap_or(0);
        Ok(u64::try_from(position).unwrap_or(0))
    }

    /// How far this process has seen the live generation applied (by its own runner, or
    /// at a swap): a lower bound of `checkpoint` that costs no query. 0 when this
    /// process does not run the projection. Only a batch that committed to the
    /// generation live at its commit raises it, and a swap makes live only a generation
    /// at least as far as the one it replaces, so it never runs ahead of the live board.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    async fn checkpoint_of(&self, generation: i64) -> Result<u64, ProjectionError> {
        let mut tx = self.db.begin_read(generation).await?;
        let position = read_checkpoint(&mut tx, self.name()).await?;
        tx.commit().await?;
        Ok(position)
    }

    /// One step of the live generation: the next batch after its checkpoint, applied and
    /// checkpointed in one transaction. A failure rolls the whole batch back.
    pub async fn run_once(&self) -> Result<Outcome, ProjectionError> {
        // A halted projection still applies every event before the one it parked.
        let halted_at = match self.policy {
            FailurePolicy::Halt => self.parked().await?.first().map(|p| p.position),
            FailurePolicy::Skip => None,
        };
        let mut live = self.live_generation().await?;
        self.pause(PausePoint::LiveStep).await;
        let limit = halted_at.map(|position| position.saturating_sub(1));
        let mut stepped = self.step(live, limit, self.batch_size).await;
        // A rebuild swapped generations since `live` was read: the batch took nothing;
        // go on in the generation that is live now.
        while let Err(StepError::Superseded(_)) = stepped {
            live = self.live_generation().await?;
            stepped = self.step(live, limit, self.batch_size).await;
        }
        match stepped {
            Ok((outcome, checkpoint)) => {
                *lock(&self.last_error) = None;
                *lock(&self.failing) = None;
                self.applied.send_if_modified(|a| bump(a, checkpoint));
                Ok(match outcome {
                    Outcome::CaughtUp if halted_at.is_some() => Outcome::Halted,
                    outcome => outcome,
                })
            }
            Err(StepError::Event {
                position,
                event_id,
                event_type,
                error,
            }) if is_poison(&error) => {
                let reason = error.to_string();
                *lock(&self.last_error) = Some(format!("position {position}: {reason}"));
                let attempts = {
                    let mut failing = lock(&self.failing);
                    let attempts = match *failing {
                        Some((at, n)) if at == position => n + 1,
                        _ => 1,
                    };
                    *failing = Some((position, attempts));
                    attempts
                };
                if attempts < self.max_attempts {
                    return Err(error);
                }
                self.park(
                    position,
                    event_id.as_deref(),
                    &event_type,
                    &reason,
                    attempts,
                )
                .await?;
                *lock(&self.failing) = None;
                tracing::error!(projection = self.name(), position, %reason, "event parked");
                match self.policy {
                    FailurePolicy::Halt => {
                        // The events of its batch before it are exact: apply them now.
                        let (_, checkpoint) = self
                            .step(live, Some(position.saturating_sub(1)), self.batch_size)
                            .await
                            .map_err(StepError::into_error)?;
                        self.applied.send_if_modified(|a| bump(a, checkpoint));
                        Ok(Outcome::Halted)
                    }
                    FailurePolicy::Skip => Ok(Outcome::Applied(0)),
                }
            }
            Err(failure) => {
                let error = failure.into_error();
                *lock(&self.last_error) = Some(error.to_string());
                Err(error)
            }
        }
    }

    // ---- Parked events (dead letters) and the operator's retry and skip. ----

    async fn park(
        &self,
        position: u64,
        event_id: Option<&str>,
        event_type: &str,
        error: &str,
        attempts: u32,
    ) -> Result<(), ProjectionError> {
        let mut tx = self.db.begin_write(0).await?;
        tx.execute(
            "INSERT INTO projection_dead_letters \
                    (name, position, event_type, error, attempts, event_id, parked_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (name, position) DO UPDATE \
                SET error = excluded.error, attempts = excluded.attempts",
            &[
                self.name().into(),
                to_sql_int(position).into(),
                event_type.into(),
                error.into(),
                i64::from(attempts).into(),
                event_id.map(str::to_owned).into(),
                now_text().into(),
            ],
        )
        .await?;
        tx.commit().await
    }

    /// The events this projection parked and nobody skipped, oldest first.
    pub async fn parked(&self) -> Result<Vec<ParkedEvent>, ProjectionError> {
        self.parked_after(0, usize::MAX).await
    }

    /// A page of `parked`: at most `limit` parked events after position `after`.
    pub async fn parked_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ParkedEvent>, ProjectionError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.dead_letters(
            "skipped_at IS NULL AND position > $2 ORDER BY position LIMIT $3",
            &[to_sql_int(after).into(), limit.into()],
        )
        .await
    }

    /// The dead letter at `position`, parked or skipped.
    pub async fn dead_letter(&self, position: u64) -> Result<Option<ParkedEvent>, ProjectionError> {
        let mut found = self
            .dead_letters("position = $2", &[to_sql_int(position).into()])
            .await?;
        Ok(found.pop())
    }

    async fn dead_letters(
        &self,
        condition: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<ParkedEvent>, ProjectionError> {
        let mut all = vec![Param::from(self.name())];
        all.extend_from_slice(params);
        let rows = self
            .db
            .fetch_text_rows(
                &format!(
                    "SELECT CAST(position AS TEXT), event_type, error, CAST(attempts AS TEXT), \
                            event_id, parked_at, skipped_by, skipped_at \
                       FROM projection_dead_letters WHERE name = $1 AND {condition}"
                ),
                &all,
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let column = |i: usize| row.get(i).cloned().flatten();
                let text = |i: usize| column(i).unwrap_or_default();
                ParkedEvent {
                    position: text(0).parse().unwrap_or(0),
                    event_type: text(1),
                    error: text(2),
                    attempts: text(3).parse().unwrap_or(0),
                    event_id: column(4),
                    parked_at: column(5),
                    skipped_by: column(6),
                    skipped_at: column(7),
                }
            })
            .collect())
    }

    /// The positions a batch leaves out: skipped events always; parked ones too when the
    /// projection goes on without them (a halted one stops before its parked event).
    async fn left_out(&self) -> Result<Vec<u64>, ProjectionError> {
        let condition = match self.policy {
            FailurePolicy::Skip => "",
            FailurePolicy::Halt => " AND skipped_at IS NOT NULL",
        };
        let rows = self
            .db
            .fetch_text_rows(
                &format!(
                    "SELECT CAST(position AS TEXT) FROM projection_dead_letters \
                      WHERE name = $1{condition}"
                ),
                &[self.name().into()],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|row| row.first().cloned().flatten()?.parse().ok())
            .collect())
    }

    /// An operator's retry of every parked event, oldest first (see `retry_parked_event`).
    /// Returns how many are still parked.
    pub async fn retry_parked(&self) -> Result<usize, ProjectionError> {
        let mut still = 0;
        for parked in self.parked().await? {
            match self.retry_parked_event(parked.position).await {
                Ok(()) | Err(ProjectionError::NotParked { .. }) => {}
                Err(ProjectionError::StillFailing { .. }) => still += 1,
                Err(error) => return Err(error),
            }
        }
        Ok(still)
    }

    /// An operator's retry of the parked event at `position`: applied now, in one
    /// transaction that holds the live checkpoint (a live batch running meanwhile either
    /// sees the retry or rolls back) and re-reads the dead letter (`NotParked` when a
    /// concurrent retry or skip took it: an event is never applied twice), in log order:
    /// ahead of the checkpoint (a halted projection), the events up to it are applied and
    /// the checkpoint moves to it; behind it (a skipping one), the rows it touches are
    /// re-folded from the log. When it fails again it stays parked with the new error
    /// (`StillFailing`); an outage is returned as it is, and counts no attempt.
    pub async fn retry_parked_event(&self, position: u64) -> Result<(), ProjectionError> {
        let name = self.name();
        let not_parked = || ProjectionError::NotParked {
            consumer: name.to_owned(),
            position,
        };
        let event = self
            .store
            .read_all(position, 1, &LogFilter::all())
            .await?
            .events
            .into_iter()
            .find(|e| e.position == position)
            .ok_or_else(not_parked)?;
        let (mut tx, live, checkpoint) = self.hold_live_checkpoint().await?;
        let held = tx
            .execute(
                "UPDATE projection_dead_letters SET attempts = attempts \
                  WHERE name = $1 AND position = $2 AND skipped_at IS NULL",
                &[name.into(), to_sql_int(position).into()],
            )
            .await?;
        if held != 1 {
            return Err(not_parked());
        }
        let others: Vec<u64> = tx
            .fetch_text_rows(
                "SELECT CAST(position AS TEXT) FROM projection_dead_letters \
                  WHERE name = $1 AND position <> $2",
                &[name.into(), to_sql_int(position).into()],
            )
            .await?
            .iter()
            .filter_map(|row| row.first().cloned().flatten()?.parse().ok())
            .collect();
        let applied = if position > checkpoint {
            self.apply_through(&mut tx, checkpoint, position, &others)
                .await
        } else {
            self.refold_at(&mut tx, &event, checkpoint, &others).await
        };
        match applied {
            Ok(()) => {
                tx.execute(
                    "DELETE FROM projection_dead_letters WHERE name = $1 AND position = $2",
                    &[name.into(), to_sql_int(position).into()],
                )
                .await?;
                tx.commit().await?;
                *lock(&self.failing) = None;
                *lock(&self.last_error) = None;
                if position > checkpoint {
                    self.applied.send_if_modified(|a| bump(a, position));
                }
                tracing::info!(projection = name, position, live, "parked event retried");
                Ok(())
            }
            Err(failure) if is_poison(&failure.error) => {
                drop(tx);
                let reason = failure.error.to_string();
                let mut tx = self.db.begin_write(0).await?;
                tx.execute(
                    "UPDATE projection_dead_letters SET error = $3, attempts = attempts + 1 \
                      WHERE name = $1 AND position = $2 AND skipped_at IS NULL",
                    &[
                        name.into(),
                        to_sql_int(position).into(),
                        reason.clone().into(),
                    ],
                )
                .await?;
                tx.commit().await?;
                Err(ProjectionError::StillFailing { position, reason })
            }
            Err(failure) => Err(failure.error),
        }
    }

    /// An operator's skip of the parked event at `position`: left unapplied for good,
    /// recorded with `actor` and the time. A halted projection goes on after it.
    pub async fn skip_parked_event(
        &self,
        position: u64,
        actor: &str,
    ) -> Result<ParkedEvent, ProjectionError> {
        let name = self.name();
        let mut tx = self.db.begin_write(0).await?;
        let skipped = tx
            .execute(
                "UPDATE projection_dead_letters SET skipped_by = $3, skipped_at = $4 \
                  WHERE name = $1 AND position = $2 AND skipped_at IS NULL",
                &[
                    name.into(),
                    to_sql_int(position).into(),
                    actor.into(),
                    now_text().into(),
                ],
            )
            .await?;
        if skipped != 1 {
            return Err(ProjectionError::NotParked {
                consumer: name.to_owned(),
                position,
            });
        }
        tx.commit().await?;
        *lock(&self.failing) = None;
        *lock(&self.last_error) = None;
        tracing::warn!(projection = name, position, actor, "parked event skipped");
        self.dead_letter(position)
            .await?
            .ok_or_else(|| ProjectionError::Corrupt(format!("dead letter {position} vanished")))
    }

    /// A write transaction on the live generation holding its checkpoint row, as a batch
    /// holds it: the generation, and the checkpoint. Retried when a swap changes the live
    /// generation between reading it and taking the row.
    async fn hold_live_checkpoint(&self) -> Result<(ReadTx, i64, u64), ProjectionError> {
        let name = self.name();
        for _ in 0..3 {
            let live = self.live_generation().await?;
            let mut tx = self.db.begin_write(live).await?;
            // The projections row first, then the checkpoint row: the order a batch and a
            // swap take them in, so none of them waits on another in a cycle.
            // A rebuild or verify that holds a claim fills a generation of its own
            // without the parked event; a retry now would reach the live rows only, and
            // the swap would then lose it. So a retry waits for the claim to end (a stale
            // one too: its holder may still swap; the next rebuild takes it over).
            let still_live = tx
                .fetch_int(
                    &format!(
                        "SELECT CASE WHEN rebuilding IS NOT NULL THEN -1 \
                                     ELSE live_generation END \
                           FROM projections WHERE name = $1{}",
                        tx.share_lock()
                    ),
                    &[name.into()],
                )
                .await?;
            if still_live == Some(-1) {
                return Err(ProjectionError::Busy(name.to_owned()));
            }
            if still_live == Some(live) {
                let checkpoint = lock_checkpoint(&mut tx, name, live).await?;
                return Ok((tx, live, checkpoint));
            }
        }
        Err(ProjectionError::Busy(name.to_owned()))
    }

    /// Applies the events after `checkpoint` up to `through` (in log order, leaving out
    /// `left_out`) and moves the checkpoint to `through`, in `tx`, which holds the
    /// checkpoint row.
    async fn apply_through(
        &self,
        tx: &mut ReadTx,
        checkpoint: u64,
        through: u64,
        left_out: &[u64],
    ) -> Result<(), Failure> {
        let filter = self.projector.filter();
        let mut next = checkpoint + 1;
        let mut events = Vec::new();
        while next <= through {
            let wanted = usize::try_from(through - next + 1).unwrap_or(usize::MAX);
            let page = self
                .store
                .read_all(next, wanted.min(self.rebuild_batch), &filter)
                .await
                .map_err(|e| Failure::unplaced(e.into()))?;
            events.extend(
                page.events
                    .into_iter()
                    .filter(|e| e.position <= through && !left_out.contains(&e.position)),
            );
            if page.next_position <= next {
                break;
            }
            next = page.next_position;
        }
        self.projector.apply(tx, &events).await?;
        let name = self.name();
        let generation = tx.generation();
        let moved = if checkpoint == 0 {
            tx.execute(
                "INSERT INTO projection_checkpoints (name, generation, position) \
                 VALUES ($1, $2, $3) ON CONFLICT (name, generation) DO NOTHING",
                &[name.into(), generation.into(), to_sql_int(through).into()],
            )
            .await
        } else {
            // The row is held since `checkpoint` was read from it (`lock_checkpoint`).
            tx.execute(
                "UPDATE projection_checkpoints SET position = $3 \
                  WHERE name = $1 AND generation = $2",
                &[name.into(), generation.into(), to_sql_int(through).into()],
            )
            .await
        }
        .map_err(Failure::unplaced)?;
        if moved != 1 {
            return Err(Failure::unplaced(ProjectionError::CheckpointMoved(
                name.to_owned(),
            )));
        }
        Ok(())
    }

    /// Re-folds the rows `event` touches from the log up to `checkpoint` (leaving out
    /// `left_out`, including `event`), in `tx`, which holds the checkpoint row.
    async fn refold_at(
        &self,
        tx: &mut ReadTx,
        event: &RecordedEvent,
        checkpoint: u64,
        left_out: &[u64],
    ) -> Result<(), Failure> {
        let filter = self.projector.filter();
        let unplaced = |e: StoreError| Failure::unplaced(e.into());
        let mut history = Vec::new();
        if self.projector.rows_follow_streams() {
            let stream = annals_store::StreamName::parse(event.stream.clone()).map_err(unplaced)?;
            let mut from = 1;
            loop {
                let page = self
                    .store
                    .read_stream(
                        &stream,
                        from,
                        annals_store::Direction::Forwards,
                        self.rebuild_batch,
                    )
                    .await
                    .map_err(unplaced)?;
                let Some(last) = page.last() else { break };
                from = last.version + 1;
                let done = page.len() < self.rebuild_batch || last.position > checkpoint;
                history.extend(page.into_iter().filter(|e| filter.matches(e)));
                if done {
                    break;
                }
            }
        } else {
            let mut next = 1;
            while next <= checkpoint {
                let page = self
                    .store
                    .read_all(next, self.rebuild_batch, &filter)
                    .await
                    .map_err(unplaced)?;
                history.extend(page.events);
                if page.next_position <= next {
                    break;
                }
                next = page.next_position;
            }
        }
        history.retain(|e| e.position <= checkpoint && !left_out.contains(&e.position));
        self.projector.refold(tx, event, &history).await
    }

    /// Applies the next batch to `generation`, stopping at `limit` when given; returns
    /// what it did and the generation's checkpoint after it.
    async fn step(
        &self,
        generation: i64,
        limit: Option<u64>,
        batch_size: usize,
    ) -> Result<(Outcome, u64), StepError> {
        let checkpoint = self.checkpoint_of(generation).await?;
        if limit.is_some_and(|limit| checkpoint >= limit) {
            return Ok((Outcome::CaughtUp, checkpoint));
        }
        let page = self
            .store
            .read_all(checkpoint + 1, batch_size, &self.projector.filter())
            .await?;
        let mut next = page.next_position.saturating_sub(1).max(checkpoint);
        let mut events = page.events;
        if let Some(limit) = limit {
            next = next.min(limit);
            events.retain(|e| e.position <= limit);
        }
        if next == checkpoint {
            return Ok((Outcome::CaughtUp, checkpoint));
        }
        let left_out = self.left_out().await?;
        let events: Vec<RecordedEvent> = events
            .into_iter()
            .filter(|e| !left_out.contains(&e.position))
            .collect();
        self.pause(PausePoint::BatchRead).await;
        let name = self.name();
        let mut tx = self.db.begin_write(generation).await?;
        // The batch commits only to a generation that is live, or claimed by a rebuild or
        // verify, when it commits: one swapped out or taken over takes nothing more. The
        // projections row is held (shared) until the commit, and a swap or a claim
        // updates it before it reads a checkpoint or drops a generation, so neither
        // misses a batch nor drops one under it.
        let current = tx
            .fetch_int(
                &format!(
                    "SELECT live_generation FROM projections \
                      WHERE name = $1 AND (live_generation = $2 OR rebuilding = $2){}",
                    tx.share_lock()
                ),
                &[name.into(), generation.into()],
            )
            .await?;
        if current.is_none() {
            return Err(StepError::Superseded(name));
        }
        // The checkpoint guard. The checkpoint row is held before any row is read, as an
        // operator's retry holds it, and the batch goes on only if the row is still at
        // the position it read its events after: a second runner, a straggler after a
        // takeover, or a retry that committed meanwhile finds it moved and applies
        // nothing; one that comes later waits.
        if lock_checkpoint(&mut tx, name, generation).await? != checkpoint {
            return Err(ProjectionError::CheckpointMoved(name.to_owned()).into());
        }
        if let Err(failure) = self.projector.apply(&mut tx, &events).await {
            drop(tx);
            return Err(self.locate(failure, generation, &events).await);
        }
        let applied = events.len();
        let moved = if checkpoint == 0 {
            tx.execute(
                "INSERT INTO projection_checkpoints (name, generation, position) \
                 VALUES ($1, $2, $3) ON CONFLICT (name, generation) DO NOTHING",
                &[name.into(), generation.into(), to_sql_int(next).into()],
            )
            .await?
        } else {
            // The row is held, and was found at `checkpoint`, above.
            tx.execute(
                "UPDATE projection_checkpoints SET position = $3 \
                  WHERE name = $1 AND generation = $2",
                &[name.into(), generation.into(), to_sql_int(next).into()],
            )
            .await?
        };
        if moved != 1 {
            // Dropping the transaction rolls the batch back.
            return Err(ProjectionError::CheckpointMoved(name.to_owned()).into());
        }
        tx.commit().await?;
        Ok((Outcome::Applied(applied), next))
    }

    /// Turns a batch's failure into a step error naming its event: when the batch could
    /// not say which event failed, the events are applied one by one (in a transaction
    /// that is then dropped) to find it.
    async fn locate(
        &self,
        failure: Failure,
        generation: i64,
        events: &[RecordedEvent],
    ) -> StepError {
        let event_type = |position: u64| {
            events
                .iter()
                .find(|e| e.position == position)
                .map_or_else(String::new, |e| e.event_type.clone())
        };
        let event_id = |position: u64| {
            events
                .iter()
                .find(|e| e.position == position)
                .map(|e| e.event_id.to_string())
        };
        if let Some(position) = failure.position {
            return StepError::Event {
                event_type: event_type(position),
                event_id: event_id(position),
                position,
                error: failure.error,
            };
        }
        if !is_poison(&failure.error) {
            return StepError::Other(failure.error);
        }
        let mut tx = match self.db.begin_write(generation).await {
            Ok(tx) => tx,
            Err(error) => return StepError::Other(error),
        };
        for event in events {
            if let Err(single) = self
                .projector
                .apply(&mut tx, std::slice::from_ref(event))
                .await
            {
                return StepError::Event {
                    position: event.position,
                    event_id: Some(event.event_id.to_string()),
                    event_type: event.event_type.clone(),
                    error: single.error,
                };
            }
        }
        StepError::Other(failure.error)
    }

    /// Steps until caught up; returns how many events were applied.
    pub async fn catch_up(&self) -> Result<usize, ProjectionError> {
        let mut applied = 0;
        while let Outcome::Applied(n) = self.run_once().await? {
            applied += n;
        }
        Ok(applied)
    }

    /// Runs until `stop` turns true, while this process holds the projection's lease
    /// (taking it over when its holder dies): steps while there is work, waits for new
    /// events (woken by the store's notification) when caught up, and backs off after a
    /// failure.
    pub async fn run_until_stopped(&self, mut stop: watch::Receiver<bool>) {
        let mut lease: Option<Box<dyn annals_store::Lease>> = None;
        let mut backoff = Duration::from_millis(100);
        while !*stop.borrow() {
            let holding = match lease.as_mut() {
                Some(held) => held.held().await,
                None => false,
            };
            if !holding {
                if let Some(lost) = lease.take() {
                    tracing::warn!(projection = self.name(), "lease lost");
                    lost.release().await;
                }
                match self.db.try_lease(self.name()).await {
                    Ok(Some(taken)) => {
                        tracing::info!(projection = self.name(), "lease taken; running");
                        lease = Some(taken);
                    }
                    // At debug level: a standby process says, each time it looks, that it
                    // found the lease taken (what a test of a takeover waits for).
                    Ok(None) => {
                        tracing::debug!(
                            projection = self.name(),
                            "lease held elsewhere; standing by"
                        )
                    }
                    Err(error) => {
                        tracing::warn!(projection = self.name(), %error, "taking the lease failed")
                    }
                }
                if lease.is_none() {
                    tokio::select! {
                        _ = stop.changed() => {}
                        () = tokio::time::sleep(LEASE_RETRY) => {}
                    }
                    continue;
                }
            }
            match self.run_once().await {
                Ok(Outcome::Applied(_)) => backoff = Duration::from_millis(100),
                Ok(Outcome::CaughtUp | Outcome::Halted) => {
                    let after = *self.applied.borrow();
                    tokio::select! {
                        _ = stop.changed() => {}
                        waited = self.store.wait_for_events(after, Duration::from_secs(5)) => {
                            if let Err(error) = waited {
                                tracing::warn!(projection = self.name(), %error, "waiting for events failed");
                            }
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(projection = self.name(), %error, "projection step failed; retrying");
                    tokio::select! {
                        _ = stop.changed() => {}
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        if let Some(held) = lease {
            held.release().await;
        }
    }

    /// Waits until the live generation has applied the log up to `position`, or
    /// `timeout`; returns whether it has (read-your-writes for `min_position`).
    pub async fn wait_for(&self, position: u64, timeout: Duration) -> bool {
        let mut applied = self.applied.subscribe();
        tokio::time::timeout(timeout, applied.wait_for(|a| *a >= position))
            .await
            .is_ok_and(|seen| seen.is_ok())
    }

    pub async fn status(&self) -> Result<ProjectionStatus, ProjectionError> {
        let checkpoint = self.checkpoint().await?;
        let head = self.store.head().await?;
        let mut tx = self.db.begin_read(0).await?;
        let rebuilding = tx
            .fetch_int(
                "SELECT rebuilding FROM projections \
                  WHERE name = $1 AND rebuild_seen_micros >= $2",
                &[self.name().into(), self.stale_before().into()],
            )
            .await?;
        tx.commit().await?;
        let lag = head.saturating_sub(checkpoint);
        let parked = self.parked().await?;
        let status = if self.policy == FailurePolicy::Halt && !parked.is_empty() {
            "halted"
        } else if rebuilding.is_some() {
            "rebuilding"
        } else if lag > self.batch_size as u64 {
            "catching_up"
        } else {
            "running"
        };
        Ok(ProjectionStatus {
            name: self.name().to_owned(),
            checkpoint,
            head,
            lag,
            status,
            last_error: lock(&self.last_error).clone().or_else(|| {
                parked
                    .first()
                    .map(|p| format!("position {}: {}", p.position, p.error))
            }),
        })
    }

    /// Claims the projection for a rebuild or a verify and takes a spare generation, in
    /// one transaction: the claim (the projection free, or its claim left stale by a
    /// process that stopped renewing it) takes the next number of the projection's
    /// generation counter and reads which generation is live, and the leftovers of
    /// earlier claims (neither live nor this one) are dropped under it. No swap can come
    /// between reading the live generation and the drop: only a claim's holder swaps.
    /// Returns (live, spare).
    async fn claim_spare_generation(&self) -> Result<(i64, i64), ProjectionError> {
        // Registers the projection on first use.
        self.live_generation().await?;
        self.pause(PausePoint::Claim).await;
        let name = self.name();
        let mut tx = self.db.begin_write(0).await?;
        let claimed = tx
            .fetch_text_rows(
                "UPDATE projections \
                    SET rebuilding = next_generation, next_generation = next_generation + 1, \
                        rebuild_seen_micros = $2 \
                  WHERE name = $1 AND (rebuilding IS NULL OR rebuild_seen_micros IS NULL \
                                       OR rebuild_seen_micros < $3) \
                  RETURNING CAST(live_generation AS TEXT), CAST(rebuilding AS TEXT)",
                &[name.into(), now_micros().into(), self.stale_before().into()],
            )
            .await?;
        let Some(row) = claimed.first() else {
            return Err(ProjectionError::Busy(name.to_owned()));
        };
        let generation = |i: usize| {
            i64::read(row.get(i), "generation")
                .map_err(|_| ProjectionError::Corrupt(format!("projections row of {name}")))
        };
        let (live, spare) = (generation(0)?, generation(1)?);
        // Every generation with rows has a checkpoint row: they commit together.
        let leftovers = tx
            .fetch_text_rows(
                "SELECT CAST(generation AS TEXT) FROM projection_checkpoints \
                  WHERE name = $1 AND generation <> $2 AND generation <> $3",
                &[name.into(), live.into(), spare.into()],
            )
            .await?;
        for leftover in &leftovers {
            if let Some(generation) = Option::<i64>::read(leftover.first(), "generation")? {
                self.delete_generation(&mut tx, generation).await?;
            }
        }
        tx.commit().await?;
        self.pause(PausePoint::Claimed).await;
        Ok((live, spare))
    }

    /// Renews the claim on `spare`; fails when another process has taken it over.
    async fn renew_claim(&self, spare: i64) -> Result<(), ProjectionError> {
        let mut tx = self.db.begin_write(0).await?;
        let renewed = self.hold_claim(&mut tx, spare).await?;
        tx.commit().await?;
        if renewed.is_none() {
            return Err(ProjectionError::Busy(self.name().to_owned()));
        }
        Ok(())
    }

    /// Renews the claim on `spare` in `tx`, holding the projections row until `tx` ends
    /// (no batch commits, no swap or claim happens meanwhile); the live generation, or
    /// `None` when the claim is no longer this runner's.
    async fn hold_claim(
        &self,
        tx: &mut ReadTx,
        spare: i64,
    ) -> Result<Option<i64>, ProjectionError> {
        tx.fetch_int(
            "UPDATE projections SET rebuild_seen_micros = $3 \
              WHERE name = $1 AND rebuilding = $2 RETURNING live_generation",
            &[self.name().into(), spare.into(), now_micros().into()],
        )
        .await
    }

    /// Ends the claim on `claimed` and drops `generation` (when given) in the same
    /// transaction: only while the claim is still this runner's (one taken over may have
    /// the taker's work in it), and never the live generation. Returns whether the claim
    /// was still this runner's.
    async fn release_claim(
        &self,
        claimed: i64,
        generation: Option<i64>,
    ) -> Result<bool, ProjectionError> {
        let mut tx = self.db.begin_write(0).await?;
        let live = tx
            .fetch_int(
                "UPDATE projections SET rebuilding = NULL \
                  WHERE name = $1 AND rebuilding = $2 RETURNING live_generation",
                &[self.name().into(), claimed.into()],
            )
            .await?;
        let Some(live) = live else {
            return Ok(false);
        };
        if let Some(generation) = generation.filter(|g| *g != live) {
            self.delete_generation(&mut tx, generation).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Deletes one generation's rows and checkpoint, in the caller's transaction (which
    /// holds the claim: see `release_claim` and `claim_spare_generation`).
    async fn delete_generation(
        &self,
        tx: &mut ReadTx,
        generation: i64,
    ) -> Result<(), ProjectionError> {
        for table in self.projector.tables() {
            tx.execute(
                &format!("DELETE FROM {} WHERE generation = $1", table.name),
                &[generation.into()],
            )
            .await?;
        }
        tx.execute(
            "DELETE FROM projection_checkpoints WHERE name = $1 AND generation = $2",
            &[self.name().into(), generation.into()],
        )
        .await?;
        Ok(())
    }

    /// Brings `generation` up to the head of the log (or `limit`), in large batches,
    /// renewing the claim on `spare` after each.
    async fn fill(
        &self,
        generation: i64,
        limit: Option<u64>,
        spare: i64,
    ) -> Result<(), ProjectionError> {
        loop {
            match self.step(generation, limit, self.rebuild_batch).await {
                Ok((outcome, reached)) => {
                    self.progress.send_replace(reached);
                    self.renew_claim(spare).await?;
                    if !matches!(outcome, Outcome::Applied(_)) {
                        return Ok(());
                    }
                    self.pause(PausePoint::FillBatch).await;
                }
                Err(StepError::Superseded(name)) => {
                    return Err(ProjectionError::Busy(name.to_owned()));
                }
                Err(failure) => return Err(failure.into_error()),
            }
        }
    }

    /// Rebuilds the projection from position 0 beside the live generation and swaps when
    /// the new one has caught up; readers see the old one until the swap, then the new.
    pub async fn rebuild(&self) -> Result<(), ProjectionError> {
        let claim = self.claim_rebuild().await?;
        self.finish_rebuild(claim).await
    }

    /// The first half of `rebuild`: claims the projection (`Busy` when a rebuild or
    /// verify holds it), so a caller can answer at once and rebuild in the background.
    pub async fn claim_rebuild(&self) -> Result<RebuildClaim, ProjectionError> {
        let (_, new) = self.claim_spare_generation().await?;
        Ok(RebuildClaim { new })
    }

    /// The second half of `rebuild`: fills the claimed generation and swaps it in, then
    /// drops the generation it replaced. On failure it drops its own, if its claim is
    /// still its own.
    pub async fn finish_rebuild(&self, claim: RebuildClaim) -> Result<(), ProjectionError> {
        let RebuildClaim { new } = claim;
        match self.build_and_swap(new).await {
            Ok(old) => {
                self.release_claim(new, Some(old)).await?;
                Ok(())
            }
            Err(error) => {
                self.release_claim(new, Some(new)).await?;
                Err(error)
            }
        }
    }

    /// Fills `new` and makes it live once it has reached the live generation; returns
    /// the generation it replaced. The claim is kept (for dropping the old generation).
    async fn build_and_swap(&self, new: i64) -> Result<i64, ProjectionError> {
        let name = self.name();
        loop {
            self.fill(new, None, new).await?;
            // The claim's row first: a live batch holds it until it commits, so the
            // checkpoints read after it are final until the swap commits.
            let mut tx = self.db.begin_write(0).await?;
            let Some(live) = self.hold_claim(&mut tx, new).await? else {
                return Err(ProjectionError::Busy(name.to_owned()));
            };
            let live_at = read_checkpoint_of(&mut tx, name, live).await?;
            let new_at = read_checkpoint_of(&mut tx, name, new).await?;
            if new_at >= live_at {
                tx.execute(
                    "UPDATE projections SET live_generation = $2 WHERE name = $1",
                    &[name.into(), new.into()],
                )
                .await?;
                tx.commit().await?;
                self.applied.send_if_modified(|a| bump(a, new_at));
                return Ok(live);
            }
            // The live generation moved on meanwhile: catch up again.
        }
    }

    /// Rebuilds into a scratch generation and compares it with the live one, at the
    /// same log position; the live read model is left as it is. The comparison holds up
    /// no writer: it reads one snapshot, a page at a time.
    pub async fn verify(&self) -> Result<VerifyReport, ProjectionError> {
        let (live, scratch) = self.claim_spare_generation().await?;
        let result = self.compare(live, scratch).await;
        let released = self.release_claim(scratch, Some(scratch)).await;
        let report = result?;
        released?;
        Ok(report)
    }

    /// Brings the scratch and the live generation to one position, then compares them
    /// in one read-only snapshot in which both checkpoints are equal: the live runner
    /// goes on beside it, unseen by the snapshot.
    async fn compare(&self, live: i64, scratch: i64) -> Result<VerifyReport, ProjectionError> {
        let name = self.name();
        self.fill(scratch, None, scratch).await?;
        loop {
            self.pause(PausePoint::Compare).await;
            let mut snapshot = self.db.begin_snapshot().await?;
            let live_at = read_checkpoint_of(&mut snapshot, name, live).await?;
            let scratch_at = read_checkpoint_of(&mut snapshot, name, scratch).await?;
            if live_at == scratch_at {
                let report = self
                    .compare_pages(&mut snapshot, live, scratch, live_at)
                    .await?;
                snapshot.commit().await?;
                return Ok(report);
            }
            drop(snapshot);
            // Bring whichever is behind to the other's position; applying the live
            // generation here is safe, its checkpoint guard keeps it exactly once (a
            // batch the live runner applied first is refused here: look again). Each
            // round closes the gap the live runner opened during the last one.
            if scratch_at < live_at {
                self.fill(scratch, Some(live_at), scratch).await?;
            } else {
                match self.fill(live, Some(scratch_at), scratch).await {
                    Ok(()) | Err(ProjectionError::CheckpointMoved(_)) => {}
                    Err(error) => return Err(error),
                }
            }
        }
    }

    /// Compares two generations table by table, by key: each page reads the next
    /// `verify_page` rows of each generation after the last key compared and joins them
    /// on the key, in the database's order of keys (so the order is the index's, and no
    /// collation has to be repeated here). Stops at the tenth difference.
    async fn compare_pages(
        &self,
        tx: &mut ReadTx,
        live: i64,
        scratch: i64,
        position: u64,
    ) -> Result<VerifyReport, ProjectionError> {
        const MOST: usize = 10;
        let limit = self.verify_page;
        let mut differences = Vec::new();
        let (mut pages, mut largest_page) = (0, 0);
        let mut renewed = tokio::time::Instant::now();
        'tables: for table in self.projector.tables() {
            let width = table.columns.len();
            let values = |side: &str| {
                (0..width)
                    .map(|i| format!("{side}.v{i}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let side = |generation: &str, after: bool| {
                format!(
                    "SELECT {key} AS k, {columns} FROM {table} \
                      WHERE generation = {generation}{after} ORDER BY {key} LIMIT {limit}",
                    key = table.key,
                    columns = table
                        .columns
                        .iter()
                        .enumerate()
                        .map(|(i, c)| format!("CAST({c} AS TEXT) AS v{i}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    table = table.name,
                    after = if after {
                        format!(" AND {} > $3", table.key)
                    } else {
                        String::new()
                    },
                )
            };
            let page_sql = |after: bool| {
                format!(
                    "WITH l AS ({}), r AS ({}) \
                     SELECT l.k, r.k, {}, {} FROM l FULL OUTER JOIN r ON l.k = r.k \
                      ORDER BY COALESCE(l.k, r.k)",
                    side("$1", after),
                    side("$2", after),
                    values("l"),
                    values("r")
                )
            };
            let (first, next) = (page_sql(false), page_sql(true));
            let mut after: Option<String> = None;
            loop {
                let rows = match &after {
                    None => {
                        tx.fetch_text_rows(&first, &[live.into(), scratch.into()])
                            .await?
                    }
                    Some(key) => {
                        tx.fetch_text_rows(
                            &next,
                            &[live.into(), scratch.into(), key.clone().into()],
                        )
                        .await?
                    }
                };
                pages += 1;
                largest_page = largest_page.max(rows.len());
                let present = |row: &Vec<Option<String>>, i: usize| row[i].is_some();
                // A side that filled its page may have more rows after its last key: only
                // keys up to the first such last key are compared now.
                let last_of = |i: usize| {
                    let count = rows.iter().filter(|row| present(row, i)).count();
                    if count < limit {
                        None
                    } else {
                        rows.iter().rposition(|row| present(row, i))
                    }
                };
                let bound = match (last_of(0), last_of(1)) {
                    (None, None) => None,
                    (l, r) => Some(l.unwrap_or(usize::MAX).min(r.unwrap_or(usize::MAX))),
                };
                let compared = bound.map_or(rows.len(), |b| b + 1);
                for row in &rows[..compared] {
                    let key = row[0]
                        .clone()
                        .or_else(|| row[1].clone())
                        .unwrap_or_default();
                    let difference = |kind, column: Option<usize>| Difference {
                        table: table.name.to_owned(),
                        key: key.clone(),
                        kind,
                        column: column.map(|i| table.columns[i].to_owned()),
                        live: column.and_then(|i| row[2 + i].clone()),
                        rebuilt: column.and_then(|i| row[2 + width + i].clone()),
                    };
                    match (row[0].is_some(), row[1].is_some()) {
                        (true, false) => differences.push(difference(DifferenceKind::Extra, None)),
                        (false, true) => {
                            differences.push(difference(DifferenceKind::Missing, None))
                        }
                        _ => differences.extend(
                            (0..width)
                                .filter(|i| row[2 + i] != row[2 + width + i])
                                .map(|i| difference(DifferenceKind::Changed, Some(i))),
                        ),
                    }
                    if differences.len() >= MOST {
                        differences.truncate(MOST);
                        break 'tables;
                    }
                }
                self.pause(PausePoint::ComparePage).await;
                // A long comparison keeps its claim, so it is not taken for a dead one.
                if renewed.elapsed() > self.claim_stale / 3 {
                    self.renew_claim(scratch).await?;
                    renewed = tokio::time::Instant::now();
                }
                match bound {
                    None => break,
                    Some(b) => after = rows[b][0].clone().or_else(|| rows[b][1].clone()),
                }
            }
        }
        Ok(VerifyReport {
            equal: differences.is_empty(),
            position,
            differences,
            pages,
            largest_page,
        })
    }
}

async fn read_checkpoint(tx: &mut ReadTx, name: &str) -> Result<u64, ProjectionError> {
    let generation = tx.generation();
    read_checkpoint_of(tx, name, generation).await
}

async fn read_checkpoint_of(
    tx: &mut ReadTx,
    name: &str,
    generation: i64,
) -> Result<u64, ProjectionError> {
    let position = tx
        .fetch_int(
            "SELECT position FROM projection_checkpoints WHERE name = $1 AND generation = $2",
            &[name.into(), generation.into()],
        )
        .await?
        .unwrap_or(0);
    Ok(u64::try_from(position).unwrap_or(0))
}

/// Reads a checkpoint and holds its row until the transaction ends (a no-op update: a
/// row lock on PostgreSQL; SQLite's write transaction already excludes other writers).
async fn lock_checkpoint(
    tx: &mut ReadTx,
    name: &str,
    generation: i64,
) -> Result<u64, ProjectionError> {
    tx.execute(
        "UPDATE projection_checkpoints SET position = position WHERE name = $1 AND generation = $2",
        &[name.into(), generation.into()],
    )
    .await?;
    read_checkpoint_of(tx, name, generation).await
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn bump(current: &mut u64, to: u64) -> bool {
    let newer = to > *current;
    if newer {
        *current = to;
    }
    newer
}

/// Reads a stored event as a domain event (upcast to its current schema).
pub(crate) fn decode<E: annals_domain::Event>(event: &RecordedEvent) -> Result<E, ProjectionError> {
    E::decode(&annals_domain::StoredForm {
        event_type: event.event_type.clone(),
        schema_version: event.schema_version,
        data: event.data.clone(),
    })
    .map_err(|e| ProjectionError::Apply {
        position: event.position,
        event_type: event.event_type.clone(),
        reason: e.to_string(),
    })
}

/// The aggregate id of an event's stream (`lead-42` → `42`).
pub(crate) fn aggregate_id(event: &RecordedEvent) -> String {
    event
        .stream
        .split_once('-')
        .map_or(event.stream.as_str(), |(_, id)| id)
        .to_owned()
}

/// The time of an event as read models store it: RFC 3339 UTC with microseconds, which
/// sorts as text.
pub(crate) fn time_text(event: &RecordedEvent) -> String {
    event
        .recorded_at
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

#[cfg(test)]
mod tests {
    use annals_store::StoreConfig;

    use super::{ProjectionError, is_poison};

    /// Only the read-model database's refusal is an event's own failure: the same refusal
    /// met while reading the log is not, so a retry that meets it neither counts an
    /// attempt nor says the event still fails.
    #[tokio::test]
    async fn only_a_refusal_of_the_read_model_database_is_the_events_own_failure() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("poison.db").display());
        let backend = annals_store::open(&url, StoreConfig::default())
            .await
            .unwrap();
        let refusal = backend
            .tables()
            .fetch_int("SELECT no_such_column FROM log_head", &[])
            .await
            .unwrap_err();
        assert!(refusal.is_refusal(), "{refusal:?}");
        assert!(is_poison(&ProjectionError::Database(refusal.clone())));
        assert!(!is_poison(&ProjectionError::Store(refusal)));
    }
}
