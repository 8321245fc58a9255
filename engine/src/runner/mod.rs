//! The runner of one consumer (`ConsumerRunner`): its settings and its hooks here; its
//! work in the rooms beside: `register` (a read model's tables as declared), `step`
//! (reading the log after its checkpoint in batches, a read model applying each batch
//! and moving the checkpoint in one transaction, a process or an outbound consumer
//! acting on each event and then moving the checkpoint past it), `status` (the
//! checkpoint, the wait for a position, what an operator sees), and as a `Duty`, run
//! where its lease is (one process of several); `dead_letters` (parking, the operator's
//! retry and skip), `generations` (claims, rebuilds, swaps), `verify` (the comparison).
//!
//! Invariant: a checkpoint only moves in the transaction that applied the events up to
//! it, and only from the value the runner read; under a lease, only while that
//! transaction finds the lease still its holder's (`Fence::check`); an outage is retried
//! with backoff and never parks an event.

mod dead_letters;
mod generations;
mod register;
mod status;
mod step;
mod verify;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use annals_store::EventStore;
use tokio::sync::watch;

use crate::lease::LEASE_LIFE;
use crate::{
    ActionError, Consumer, ConsumerError, ConsumerKind, FailurePolicy, Projector, ReadDatabase,
};

/// A projection claimed for a rebuild (see `ConsumerRunner::claim_rebuild`). A claim
/// that is never finished goes stale and may be taken over.
#[derive(Debug)]
#[must_use = "a claim holds the projection until it is finished or goes stale"]
pub struct RebuildClaim {
    /// The generation this claim took from the counter; only its holder writes it.
    pub(crate) new: i64,
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
pub(crate) struct Pause(PauseHook);

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
    pub(crate) store: Arc<dyn EventStore>,
    pub(crate) db: ReadDatabase,
    pub(crate) consumer: Consumer,
    pub(crate) batch_size: usize,
    /// Events per batch (and transaction) when a rebuild or verify fills its generation.
    pub(crate) rebuild_batch: usize,
    /// The last checkpoint of the live generation this runner saw, for `wait_for`.
    pub(crate) applied: watch::Sender<u64>,
    /// The checkpoint the last batch of a rebuild or verify reached, for `progress`.
    pub(crate) progress: watch::Sender<u64>,
    pub(crate) last_error: Mutex<Option<String>>,
    pub(crate) registered: AtomicBool,
    pub(crate) policy: FailurePolicy,
    pub(crate) max_attempts: u32,
    /// The event that is failing now, and how often it has.
    pub(crate) failing: Mutex<Option<(u64, u32)>>,
    /// Rows per page (of each generation) when verify compares.
    pub(crate) verify_page: usize,
    /// How long a claim may go without renewal before another process may take it.
    pub(crate) claim_stale: Duration,
    /// How long the consumer's lease lives unless renewed (`LEASE_LIFE` unless set).
    pub(crate) lease_life: Duration,
    /// Tests' hook for forcing interleavings; `None` in production.
    pub(crate) pause: Option<Pause>,
}

/// Events per batch when a rebuild or verify fills its generation, and per page when a
/// retry reads the log (unless `with_rebuild_batch_size` says otherwise).
const REBUILD_BATCH: usize = 5_000;
/// A rebuild or verify renews its claim after every batch (and a comparison every third
/// of this); a claim not renewed for this long belongs to a process that died, and
/// another may take it over (unless `with_claim_stale` says otherwise).
const CLAIM_STALE: Duration = Duration::from_secs(30);

pub(crate) fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Now, as dead letters record it: RFC 3339 UTC with microseconds.
pub(crate) fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

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
    pub(crate) fn stale_before(&self) -> i64 {
        now_micros().saturating_sub(i64::try_from(self.claim_stale.as_micros()).unwrap_or(i64::MAX))
    }

    /// Calls `hook` at each `PausePoint` this runner reaches and waits for it: lets a
    /// test pause the runner there, act elsewhere, and resume it, to force an
    /// interleaving. Production code sets none.
    pub fn with_pause_hook(mut self, hook: PauseHook) -> Self {
        self.pause = Some(Pause(hook));
        self
    }

    pub(crate) async fn pause(&self, at: PausePoint) {
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
    pub(crate) fn projector(&self) -> Result<&Arc<dyn Projector>, ConsumerError> {
        match &self.consumer {
            Consumer::ReadModel(projector) => Ok(projector),
            _ => Err(ConsumerError::NotAReadModel(self.name().to_owned())),
        }
    }

    /// The log position the current rebuild or verify has reached (the last one's, when
    /// none runs), for a progress bar.
    pub fn progress(&self) -> watch::Receiver<u64> {
        self.progress.subscribe()
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn bump(current: &mut u64, to: u64) -> bool {
    let newer = to > *current;
    if newer {
        *current = to;
    }
    newer
}

/// Why a step failed: at an event (which may be parked), or around it.
pub(crate) enum StepError {
    Event {
        position: u64,
        event_id: Option<String>,
        event_type: String,
        error: ConsumerError,
    },
    /// The generation is neither live nor claimed any more (a rebuild swapped it out, or
    /// took its claim over); the batch took nothing.
    Superseded(&'static str),
    Other(ConsumerError),
}

impl<E: Into<ConsumerError>> From<E> for StepError {
    fn from(error: E) -> Self {
        StepError::Other(error.into())
    }
}

impl StepError {
    pub(crate) fn into_error(self) -> ConsumerError {
        match self {
            StepError::Event { error, .. } | StepError::Other(error) => error,
            StepError::Superseded(name) => ConsumerError::CheckpointMoved(name.to_owned()),
        }
    }
}

/// Whether a failure is the event's own (the projector refused it, or the database
/// refused what it made of it), as opposed to an outage, which is retried with backoff
/// forever and never parks an event.
pub(crate) fn is_poison(error: &ConsumerError) -> bool {
    match error {
        ConsumerError::Apply { .. } => true,
        ConsumerError::Database(error) => error.is_refusal(),
        ConsumerError::Action(error) => matches!(error, ActionError::Refused(_)),
        _ => false,
    }
}
#[cfg(test)]
mod tests {
    use annals_store::StoreConfig;

    use super::is_poison;
    use crate::ConsumerError;

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
        assert!(is_poison(&ConsumerError::Database(refusal.clone())));
        assert!(!is_poison(&ConsumerError::Store(refusal)));
    }
}
