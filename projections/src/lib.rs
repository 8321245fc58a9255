//! The consumers of the log and their one runtime. A consumer follows the global log in
//! position order from a checkpoint of its own, and is one of three kinds: a read model
//! (its rows and its checkpoint commit in one transaction of the event store's own
//! database: exactly once), a process (it sends commands whose idempotency keys derive
//! from the causing event: at least once, with the effect of once) or an outbound
//! consumer (it delivers outside, at least once, with the event's id).
//!
//! Rooms: this file holds the contract (`Consumer`, `Projector`, `Process`, `Outbound`,
//! `Table`, the errors and reports), `consumers()` (the one list of consumers) and the
//! runner's settings; `runner` the live runner (registration, batches, status); `lease`
//! the lease it runs under (renewed in the background, fencing every checkpoint move);
//! `dead_letters` parking and the operator's retry and skip; `generations`
//! claims, rebuilds and swaps; `verify` the comparison; `timers` the durable timers'
//! scheduler and clock; each consumer is a file of its own.
//!
//! Every read-model row belongs to a *generation* of its projection; readers see only the
//! live one. A rebuild fills a new generation from position 0 beside the live one and
//! swaps by changing one value, so readers never see a half-built read model; verify
//! fills a scratch generation and compares it with the live one at the same position.
//!
//! Invariants: a checkpoint only moves in the transaction that applied the events up to
//! it, and only from the value the runner read (a runner that lost a race applies
//! nothing); under a lease, only while the lease is still its holder's at its epoch
//! (a holder that stalled past its lease's life commits nothing when it wakes); a read
//! model is a pure function of the log (no clock, no randomness), so a rebuild from
//! position 0 gives the same rows. Projectors never append events;
//! processes act only through commands, and are never rebuilt (they have no generations).
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
mod dead_letters;
pub mod deal_board;
pub mod due_timers;
mod generations;
pub mod lead_board;
pub mod lead_conversion;
pub mod lead_response;
pub mod lead_routing;
mod lease;
pub mod order_board;
pub mod order_saga;
pub mod queries;
pub mod revenue;
pub mod rows;
mod runner;
mod sql;
pub mod subscription_board;
pub mod timers;
mod verify;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use annals_commands::{CommandError, Handlers};
use annals_store::{EventStore, LogFilter, RecordedEvent, StoreError, to_sql_int};
use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::watch;

pub use annals_store::Param;
pub use lease::LEASE_LIFE;
pub use sql::{ReadDatabase, ReadTx};

/// Every consumer of the log, in a stable order: the one list a new consumer joins.
/// Processes act through `handlers`, and read the time (an invoice's, say) from `clock`.
pub fn consumers(
    handlers: &Handlers,
    settings: &ProcessSettings,
    clock: Arc<dyn timers::Clock>,
) -> Vec<Consumer> {
    vec![
        Consumer::ReadModel(Arc::new(lead_board::LeadBoard)),
        Consumer::ReadModel(Arc::new(deal_board::DealBoard)),
        Consumer::ReadModel(Arc::new(account_360::Account360)),
        Consumer::ReadModel(Arc::new(due_timers::DueTimers)),
        Consumer::ReadModel(Arc::new(lead_response::LeadResponse)),
        Consumer::ReadModel(Arc::new(order_board::OrderBoard)),
        Consumer::ReadModel(Arc::new(subscription_board::SubscriptionBoard)),
        Consumer::ReadModel(Arc::new(revenue::Revenue)),
        Consumer::Process(Arc::new(lead_conversion::LeadConversion::new(handlers))),
        Consumer::Process(Arc::new(lead_routing::LeadRouting::new(
            handlers.store(),
            handlers,
            settings.lead_response_deadline,
            clock.clone(),
        ))),
        Consumer::Process(Arc::new(order_saga::OrderSaga::new(
            handlers,
            settings.payment_timeout,
            clock,
        ))),
    ]
}

/// How the processes behave, as a deployment sets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessSettings {
    /// How long a routed lead's owner has to act on it before it goes to the pool's next
    /// owner (24 hours unless set).
    pub lead_response_deadline: chrono::Duration,
    /// How long a customer has to pay an invoice before the order process cancels the
    /// order (7 days unless set).
    pub payment_timeout: chrono::Duration,
    /// How long a lease on a consumer or the timer scheduler lives unless renewed (10 s
    /// unless set; every process of a deployment must use the same): the bound on a
    /// take-over after its holder stalls or dies (`runner`, `lease`).
    pub lease_life: chrono::Duration,
}

impl Default for ProcessSettings {
    fn default() -> Self {
        ProcessSettings {
            lead_response_deadline: chrono::Duration::hours(24),
            payment_timeout: chrono::Duration::days(7),
            lease_life: chrono::Duration::seconds(10),
        }
    }
}

/// A consumer of the log, of one of three kinds; the runtime (`ConsumerRunner`) gives
/// each the same checkpoint, lease, dead letters, backoff, status and stop, and differs
/// only in what taking an event means.
#[derive(Debug, Clone)]
pub enum Consumer {
    /// Rows and checkpoint in one transaction: each event applied exactly once.
    ReadModel(Arc<dyn Projector>),
    /// Acts on events through commands, at least once; the commands' idempotency keys
    /// derive from the causing event's id, so the effect happens exactly once.
    Process(Arc<dyn Process>),
    /// Delivers events to something outside, at least once, each with its event's id as
    /// the delivery's id (the same on every redelivery).
    Outbound(Arc<dyn Outbound>),
}

/// The kinds of consumer, as an operator sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsumerKind {
    ReadModel,
    Process,
    Outbound,
}

impl ConsumerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsumerKind::ReadModel => "read_model",
            ConsumerKind::Process => "process",
            ConsumerKind::Outbound => "outbound",
        }
    }
}

impl Consumer {
    /// The consumer's stable name: its checkpoint's, lease's and dead letters' key.
    pub fn name(&self) -> &'static str {
        match self {
            Consumer::ReadModel(projector) => projector.name(),
            Consumer::Process(process) => process.name(),
            Consumer::Outbound(outbound) => outbound.name(),
        }
    }

    pub fn kind(&self) -> ConsumerKind {
        match self {
            Consumer::ReadModel(_) => ConsumerKind::ReadModel,
            Consumer::Process(_) => ConsumerKind::Process,
            Consumer::Outbound(_) => ConsumerKind::Outbound,
        }
    }

    /// The events it takes; others move its checkpoint without a call.
    pub fn filter(&self) -> LogFilter {
        match self {
            Consumer::ReadModel(projector) => projector.filter(),
            Consumer::Process(process) => process.filter(),
            Consumer::Outbound(outbound) => outbound.filter(),
        }
    }

    /// The tables it writes (a read model's; none for the others).
    pub fn tables(&self) -> &'static [Table] {
        match self {
            Consumer::ReadModel(projector) => projector.tables(),
            Consumer::Process(_) | Consumer::Outbound(_) => &[],
        }
    }

    /// Acts on one event outside any transaction (a process or an outbound consumer).
    async fn act(&self, event: &RecordedEvent) -> Result<(), ProjectionError> {
        match self {
            Consumer::ReadModel(projector) => Err(ProjectionError::Apply {
                position: event.position,
                event_type: event.event_type.clone(),
                reason: format!(
                    "{} applies events in its batch's transaction",
                    projector.name()
                ),
            }),
            Consumer::Process(process) => process
                .handle(event)
                .await
                .map_err(ProjectionError::Command),
            Consumer::Outbound(outbound) => {
                outbound.deliver(event).await.map_err(|error| match error {
                    DeliveryError::Refused(reason) => ProjectionError::Apply {
                        position: event.position,
                        event_type: event.event_type.clone(),
                        reason,
                    },
                    DeliveryError::Unreachable(reason) => ProjectionError::Unreachable(reason),
                })
            }
        }
    }
}

/// A process: decides commands from events. It may act on an event more than once (after
/// a crash, or when a straggler and the lease's new holder both do), so every command it
/// sends carries an idempotency key derived from the causing event's id, and acting twice
/// has the effect of acting once. A refusal it cannot get past (a `DomainError`, an
/// undecodable event) is the event's own failure and parks it; an outage of the store
/// (or a command still in flight elsewhere) is retried with backoff.
#[async_trait]
pub trait Process: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    fn filter(&self) -> LogFilter;
    async fn handle(&self, event: &RecordedEvent) -> Result<(), CommandError>;
}

/// An outbound consumer: delivers each event it takes to something outside, at least
/// once; a delivery's id is its event's `event_id`, the same on every redelivery, so the
/// receiver can drop duplicates.
#[async_trait]
pub trait Outbound: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    fn filter(&self) -> LogFilter;
    async fn deliver(&self, event: &RecordedEvent) -> Result<(), DeliveryError>;
}

/// Why a delivery failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The receiver refused this event for good: it is parked.
    #[error("the receiver refused the event: {0}")]
    Refused(String),
    /// The receiver could not be reached, or failed: retried with backoff, never parked.
    #[error("the receiver is unreachable: {0}")]
    Unreachable(String),
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
    /// This process's lease on the consumer was taken over, or not renewed within its
    /// life: what it was doing is refused, and it stands by.
    #[error("{0}'s lease is no longer this process's; it stands down")]
    LeaseLost(String),
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
    /// A process's command failed: a refusal (`is_poison`) parks the event; an outage or
    /// a command still in flight elsewhere is retried.
    #[error("the process's command failed: {0}")]
    Command(#[source] CommandError),
    /// An outbound consumer's receiver could not be reached; retried, never parked.
    #[error("the receiver is unreachable: {0}")]
    Unreachable(String),
    /// Rebuild and verify are for read models; other consumers have no rows.
    #[error("{0} is not a read model: it has no rows to rebuild or verify")]
    NotAReadModel(String),
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
pub struct ConsumerStatus {
    pub name: String,
    pub kind: ConsumerKind,
    pub checkpoint: u64,
    pub head: u64,
    pub lag: u64,
    /// `running`, `catching_up` (more than a batch behind), `rebuilding`, `halted`, or
    /// `stalled` (it has lag, and its checkpoint has not moved for longer than a lease's
    /// life, whoever holds it).
    pub status: &'static str,
    pub last_error: Option<String>,
    /// How many events it has parked (and nobody skipped).
    pub parked: u64,
    /// Who holds its lease (`host:scope:pid:random`), when anyone ever took it.
    pub holder: Option<String>,
    /// When that lease expires, or expired (RFC 3339, by the database's clock).
    pub lease_expires_at: Option<String>,
    /// When its checkpoint last moved (RFC 3339, by the database's clock).
    pub moved_at: Option<String>,
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

/// A projection claimed for a rebuild (see `ConsumerRunner::claim_rebuild`). A claim
/// that is never finished goes stale and may be taken over.
#[derive(Debug)]
#[must_use = "a claim holds the projection until it is finished or goes stale"]
pub struct RebuildClaim {
    /// The generation this claim took from the counter; only its holder writes it.
    new: i64,
}

/// A point in a runner's work where a test can pause it (see
/// `ConsumerRunner::with_pause_hook`).
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
    /// A process or an outbound consumer, after acting on an event and before moving its
    /// checkpoint past it: a crash here acts on the event again.
    Acted,
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

/// Runs one consumer: reads the log after its checkpoint in batches; a read model applies
/// each batch and moves the checkpoint in one transaction, a process or an outbound
/// consumer acts on each event and then moves the checkpoint past it.
#[derive(Debug)]
pub struct ConsumerRunner {
    store: Arc<dyn EventStore>,
    db: ReadDatabase,
    consumer: Consumer,
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
    /// How long the consumer's lease lives unless renewed (`LEASE_LIFE` unless set).
    lease_life: Duration,
    /// Tests' hook for forcing interleavings; `None` in production.
    pause: Option<Pause>,
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

/// How often a process that does not hold a consumer's lease tries to take it: a
/// take-over comes within this of the lease's expiry.
const LEASE_RETRY: Duration = Duration::from_secs(2);

impl ConsumerRunner {
    pub fn new(store: Arc<dyn EventStore>, db: ReadDatabase, consumer: Consumer) -> Self {
        // A process's or an outbound consumer's event is slow to take (commands, a
        // delivery), and a stop waits for its batch: smaller batches.
        let batch_size = match consumer {
            Consumer::ReadModel(_) => 1_000,
            Consumer::Process(_) | Consumer::Outbound(_) => 100,
        };
        ConsumerRunner {
            store,
            db,
            consumer,
            batch_size,
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
            lease_life: LEASE_LIFE,
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

    /// How long the consumer's lease lives unless renewed (10 s unless set; every process
    /// of a deployment must use the same): a holder that stalls longer is taken over.
    pub fn with_lease_life(mut self, life: Duration) -> Self {
        self.lease_life = life.max(Duration::from_millis(30));
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
        self.consumer.name()
    }

    pub fn kind(&self) -> ConsumerKind {
        self.consumer.kind()
    }

    /// The read model this runner runs; rebuild, verify and a re-fold need one.
    pub(crate) fn projector(&self) -> Result<&Arc<dyn Projector>, ProjectionError> {
        match &self.consumer {
            Consumer::ReadModel(projector) => Ok(projector),
            _ => Err(ProjectionError::NotAReadModel(self.name().to_owned())),
        }
    }

    /// The log position the current rebuild or verify has reached (the last one's, when
    /// none runs), for a progress bar.
    pub fn progress(&self) -> watch::Receiver<u64> {
        self.progress.subscribe()
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

/// Moves the checkpoint of `tx`'s generation from `from`, the value read from its row (0
/// when it has none), to `to`, in the transaction of the batch that applied the events up
/// to `to`: the first batch makes the row, a later one updates the row its transaction
/// holds. A runner whose row another made or moved first changes nothing and gets
/// `CheckpointMoved`, and its batch must be rolled back.
async fn move_checkpoint(
    tx: &mut ReadTx,
    name: &str,
    from: u64,
    to: u64,
) -> Result<(), ProjectionError> {
    let params = [name.into(), tx.generation().into(), to_sql_int(to).into()];
    // When it moved, by the database's clock: what tells a stalled consumer (`status`).
    let now = tx.now_micros();
    let moved = if from == 0 {
        tx.execute(
            &format!(
                "INSERT INTO projection_checkpoints (name, generation, position, moved_micros) \
                 VALUES ($1, $2, $3, {now}) ON CONFLICT (name, generation) DO NOTHING"
            ),
            &params,
        )
        .await?
    } else {
        tx.execute(
            &format!(
                "UPDATE projection_checkpoints SET position = $3, moved_micros = {now} \
                  WHERE name = $1 AND generation = $2"
            ),
            &params,
        )
        .await?
    };
    if moved != 1 {
        return Err(ProjectionError::CheckpointMoved(name.to_owned()));
    }
    Ok(())
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

    use crate::ProjectionError;
    use crate::runner::is_poison;

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
