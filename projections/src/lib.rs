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

pub mod account_360;
pub mod deal_board;
pub mod lead_board;
mod lease;
pub mod queries;
pub mod rows;
mod sql;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use annals_store::{EventStore, LogFilter, RecordedEvent, StoreError};
use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::watch;

pub use sql::{Param, ReadDatabase, ReadTx, generations_except};

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("reading the log failed")]
    Store(#[from] StoreError),
    #[error("read-model database error")]
    Database(#[from] sqlx::Error),
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
    #[error("the cursor is not one this server gave out")]
    InvalidCursor,
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

/// A read-model table, as rebuild and verify see it.
#[derive(Debug, Clone, Copy)]
pub struct Table {
    pub name: &'static str,
    /// The columns compared by verify (all but `generation`).
    pub columns: &'static [&'static str],
    /// The key columns, for a stable order.
    pub key: &'static str,
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

/// An event a projection could not apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParkedEvent {
    pub position: u64,
    pub event_type: String,
    pub error: String,
    pub attempts: u64,
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub table: String,
    /// The row in the live read model (`None`: missing there).
    pub live: Option<Vec<Option<String>>>,
    /// The row a rebuild from position 0 gives (`None`: missing there).
    pub rebuilt: Option<Vec<Option<String>>>,
}

/// A projection claimed for a rebuild (see `ProjectionRunner::claim_rebuild`). A claim
/// that is never finished goes stale and may be taken over.
#[derive(Debug)]
#[must_use = "a claim holds the projection until it is finished or goes stale"]
pub struct RebuildClaim {
    old: i64,
    new: i64,
}

/// Runs one projector: reads the log after its checkpoint in batches, and applies each
/// batch and moves the checkpoint in one transaction.
#[derive(Debug)]
pub struct ProjectionRunner {
    store: Arc<dyn EventStore>,
    db: ReadDatabase,
    projector: Arc<dyn Projector>,
    batch_size: usize,
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
}

/// Why a step failed: at an event (which may be parked), or around it.
enum StepError {
    Event {
        position: u64,
        event_type: String,
        error: ProjectionError,
    },
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
        }
    }
}

/// Whether a failure is the event's own (the projector refused it, or the database
/// refused what it made of it), as opposed to an outage, which is retried forever.
fn is_poison(error: &ProjectionError) -> bool {
    matches!(
        error,
        ProjectionError::Apply { .. } | ProjectionError::Database(sqlx::Error::Database(_))
    )
}

const REBUILD_BATCH: usize = 5_000;
/// A rebuild or verify renews its claim after every batch; a claim not renewed for this
/// long belongs to a process that died, and another may take it over.
const CLAIM_STALE: Duration = Duration::from_secs(30);

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

fn stale_before() -> i64 {
    now_micros() - CLAIM_STALE.as_micros() as i64
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
            applied: watch::Sender::new(0),
            progress: watch::Sender::new(0),
            last_error: Mutex::new(None),
            registered: AtomicBool::new(false),
            policy: FailurePolicy::Halt,
            max_attempts: 3,
            failing: Mutex::new(None),
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

    pub fn name(&self) -> &'static str {
        self.projector.name()
    }

    /// The log position the current rebuild or verify has reached (the last one's, when
    /// none runs), for a progress bar.
    pub fn progress(&self) -> watch::Receiver<u64> {
        self.progress.subscribe()
    }

    /// The generation readers see (registering the projection on first use).
    pub async fn live_generation(&self) -> Result<i64, ProjectionError> {
        let name = self.name();
        if !self.registered.load(Ordering::Relaxed) {
            let mut tx = self.db.begin(0).await?;
            tx.execute(
                "INSERT INTO projections (name, live_generation, rebuilding) \
                 VALUES ($1, 1, NULL) ON CONFLICT (name) DO NOTHING",
                &[name.into()],
            )
            .await?;
            tx.commit().await?;
            self.registered.store(true, Ordering::Relaxed);
        }
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
    /// process does not run the projection.
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
        let live = self.live_generation().await?;
        let limit = halted_at.map(|position| position.saturating_sub(1));
        match self.step(live, limit, self.batch_size).await {
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
                self.park(position, &event_type, &reason, attempts).await?;
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

    async fn park(
        &self,
        position: u64,
        event_type: &str,
        error: &str,
        attempts: u32,
    ) -> Result<(), ProjectionError> {
        let mut tx = self.db.begin(0).await?;
        tx.execute(
            "INSERT INTO projection_dead_letters (name, position, event_type, error, attempts) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (name, position) DO UPDATE \
                SET error = excluded.error, attempts = excluded.attempts",
            &[
                self.name().into(),
                sql_int(position).into(),
                event_type.into(),
                error.into(),
                i64::from(attempts).into(),
            ],
        )
        .await?;
        tx.commit().await
    }

    /// The events this projection parked, oldest first.
    pub async fn parked(&self) -> Result<Vec<ParkedEvent>, ProjectionError> {
        let mut tx = self.db.begin_read(0).await?;
        let rows = tx
            .fetch_text_rows(
                "SELECT CAST(position AS TEXT), event_type, error, CAST(attempts AS TEXT) \
                   FROM projection_dead_letters WHERE name = $1 ORDER BY position",
                &[self.name().into()],
            )
            .await?;
        tx.commit().await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let text = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
                ParkedEvent {
                    position: text(0).parse().unwrap_or(0),
                    event_type: text(1),
                    error: text(2),
                    attempts: text(3).parse().unwrap_or(0),
                }
            })
            .collect())
    }

    /// An operator's retry of the parked events. A halted projection forgets them and
    /// tries again from its checkpoint; a skipping one applies each now, out of order,
    /// and keeps those that still fail. Returns how many are still parked.
    pub async fn retry_parked(&self) -> Result<usize, ProjectionError> {
        let name = self.name();
        if self.policy == FailurePolicy::Halt {
            let mut tx = self.db.begin(0).await?;
            tx.execute(
                "DELETE FROM projection_dead_letters WHERE name = $1",
                &[name.into()],
            )
            .await?;
            tx.commit().await?;
            *lock(&self.failing) = None;
            return Ok(0);
        }
        let live = self.live_generation().await?;
        let mut still = 0;
        for parked in self.parked().await? {
            let page = self
                .store
                .read_all(parked.position, 1, &LogFilter::all())
                .await?;
            let Some(event) = page
                .events
                .into_iter()
                .find(|e| e.position == parked.position)
            else {
                continue;
            };
            let mut tx = self.db.begin(live).await?;
            match self
                .projector
                .apply(&mut tx, std::slice::from_ref(&event))
                .await
            {
                Ok(()) => {
                    tx.execute(
                        "DELETE FROM projection_dead_letters WHERE name = $1 AND position = $2",
                        &[name.into(), sql_int(parked.position).into()],
                    )
                    .await?;
                    tx.commit().await?;
                }
                Err(failure) => {
                    drop(tx);
                    still += 1;
                    let attempts = u32::try_from(parked.attempts + 1).unwrap_or(u32::MAX);
                    let error = failure.error.to_string();
                    self.park(parked.position, &parked.event_type, &error, attempts)
                        .await?;
                }
            }
        }
        Ok(still)
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
        let skipped: Vec<u64> = match self.policy {
            FailurePolicy::Skip => self.parked().await?.iter().map(|p| p.position).collect(),
            FailurePolicy::Halt => Vec::new(),
        };
        let events: Vec<RecordedEvent> = events
            .into_iter()
            .filter(|e| !skipped.contains(&e.position))
            .collect();
        let mut tx = self.db.begin(generation).await?;
        if let Err(failure) = self.projector.apply(&mut tx, &events).await {
            drop(tx);
            return Err(self.locate(failure, generation, &events).await);
        }
        let applied = events.len();
        let name = self.name();
        let moved = if checkpoint == 0 {
            tx.execute(
                "INSERT INTO projection_checkpoints (name, generation, position) \
                 VALUES ($1, $2, $3) ON CONFLICT (name, generation) DO NOTHING",
                &[name.into(), generation.into(), sql_int(next).into()],
            )
            .await?
        } else {
            tx.execute(
                "UPDATE projection_checkpoints SET position = $3 \
                  WHERE name = $1 AND generation = $2 AND position = $4",
                &[
                    name.into(),
                    generation.into(),
                    sql_int(next).into(),
                    sql_int(checkpoint).into(),
                ],
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
        if let Some(position) = failure.position {
            return StepError::Event {
                event_type: event_type(position),
                position,
                error: failure.error,
            };
        }
        if !is_poison(&failure.error) {
            return StepError::Other(failure.error);
        }
        let mut tx = match self.db.begin(generation).await {
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
        let mut lease: Option<lease::Lease> = None;
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
                match lease::Lease::try_acquire(&self.db, self.name()).await {
                    Ok(Some(taken)) => {
                        tracing::info!(projection = self.name(), "lease taken; running");
                        lease = Some(taken);
                    }
                    Ok(None) => {}
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
                &[self.name().into(), stale_before().into()],
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

    /// Takes a generation beside the live one for a rebuild or a verify.
    async fn claim_spare_generation(&self) -> Result<(i64, i64), ProjectionError> {
        let live = self.live_generation().await?;
        let mut tx = self.db.begin(0).await?;
        let name = self.name();
        let highest = tx
            .fetch_int(
                "SELECT MAX(generation) FROM projection_checkpoints WHERE name = $1",
                &[name.into()],
            )
            .await?
            .unwrap_or(live)
            .max(live);
        let spare = highest + 1;
        // Free, or left behind by a process that stopped renewing it.
        let claimed = tx
            .execute(
                "UPDATE projections SET rebuilding = $2, rebuild_seen_micros = $3 \
                  WHERE name = $1 AND (rebuilding IS NULL OR rebuild_seen_micros IS NULL \
                                       OR rebuild_seen_micros < $4)",
                &[
                    name.into(),
                    spare.into(),
                    now_micros().into(),
                    stale_before().into(),
                ],
            )
            .await?;
        if claimed != 1 {
            return Err(ProjectionError::Busy(name.to_owned()));
        }
        tx.commit().await?;
        // Leftovers of generations that are neither live nor this one (an interrupted
        // rebuild, a batch that committed to a generation just swapped out) go first.
        self.drop_generations_except(&[live]).await?;
        Ok((live, spare))
    }

    /// Renews the claim on `spare`; fails when another process has taken it over.
    async fn renew_claim(&self, spare: i64) -> Result<(), ProjectionError> {
        let mut tx = self.db.begin(0).await?;
        let renewed = tx
            .execute(
                "UPDATE projections SET rebuild_seen_micros = $3 \
                  WHERE name = $1 AND rebuilding = $2",
                &[self.name().into(), spare.into(), now_micros().into()],
            )
            .await?;
        tx.commit().await?;
        if renewed != 1 {
            return Err(ProjectionError::Busy(self.name().to_owned()));
        }
        Ok(())
    }

    /// Gives the claim on `spare` back, if it is still this runner's.
    async fn release_spare_generation(&self, spare: i64) -> Result<(), ProjectionError> {
        let mut tx = self.db.begin(0).await?;
        tx.execute(
            "UPDATE projections SET rebuilding = NULL WHERE name = $1 AND rebuilding = $2",
            &[self.name().into(), spare.into()],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Deletes one generation's rows and checkpoint.
    async fn drop_generation(&self, generation: i64) -> Result<(), ProjectionError> {
        let mut tx = self.db.begin(0).await?;
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
        tx.commit().await
    }

    async fn drop_generations_except(&self, keep: &[i64]) -> Result<(), ProjectionError> {
        let mut tx = self.db.begin(0).await?;
        // Ranges, so the index led by the generation finds the rows to delete.
        let kept = |column: &str| sql::generations_except(column, keep);
        for table in self.projector.tables() {
            tx.execute(
                &format!("DELETE FROM {} WHERE {}", table.name, kept("generation")),
                &[],
            )
            .await?;
        }
        tx.execute(
            &format!(
                "DELETE FROM projection_checkpoints WHERE name = $1 AND {}",
                kept("generation")
            ),
            &[self.name().into()],
        )
        .await?;
        tx.commit().await
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
            match self.step(generation, limit, REBUILD_BATCH).await {
                Ok((outcome, reached)) => {
                    self.progress.send_replace(reached);
                    self.renew_claim(spare).await?;
                    if !matches!(outcome, Outcome::Applied(_)) {
                        return Ok(());
                    }
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
        let (old, new) = self.claim_spare_generation().await?;
        Ok(RebuildClaim { old, new })
    }

    /// The second half of `rebuild`: fills the claimed generation and swaps it in.
    pub async fn finish_rebuild(&self, claim: RebuildClaim) -> Result<(), ProjectionError> {
        let RebuildClaim { old, new } = claim;
        if let Err(error) = self.build_and_swap(old, new).await {
            self.release_spare_generation(new).await?;
            return Err(error);
        }
        self.drop_generation(old).await
    }

    async fn build_and_swap(&self, old: i64, new: i64) -> Result<(), ProjectionError> {
        loop {
            self.fill(new, None, new).await?;
            // The swap, under a lock on the live checkpoint row, so the live runner
            // cannot move it between the comparison and the swap.
            let mut tx = self.db.begin(0).await?;
            let live_at = lock_checkpoint(&mut tx, self.name(), old).await?;
            let new_at = read_checkpoint_of(&mut tx, self.name(), new).await?;
            if new_at >= live_at {
                let swapped = tx
                    .execute(
                        "UPDATE projections SET live_generation = $2, rebuilding = NULL \
                          WHERE name = $1 AND rebuilding = $2",
                        &[self.name().into(), new.into()],
                    )
                    .await?;
                if swapped != 1 {
                    return Err(ProjectionError::Busy(self.name().to_owned()));
                }
                tx.commit().await?;
                self.applied.send_if_modified(|a| bump(a, new_at));
                return Ok(());
            }
            // The live generation moved on meanwhile: catch up again.
        }
    }

    /// Rebuilds into a scratch generation and compares it with the live one, at the
    /// same log position; the live read model is left as it is.
    pub async fn verify(&self) -> Result<VerifyReport, ProjectionError> {
        let (live, scratch) = self.claim_spare_generation().await?;
        let result = self.compare(live, scratch).await;
        self.drop_generation(scratch).await?;
        self.release_spare_generation(scratch).await?;
        result
    }

    async fn compare(&self, live: i64, scratch: i64) -> Result<VerifyReport, ProjectionError> {
        self.fill(scratch, None, scratch).await?;
        loop {
            let mut tx = self.db.begin(0).await?;
            let live_at = lock_checkpoint(&mut tx, self.name(), live).await?;
            let scratch_at = read_checkpoint_of(&mut tx, self.name(), scratch).await?;
            if live_at == scratch_at {
                let mut differences = Vec::new();
                for table in self.projector.tables() {
                    let select = format!(
                        "SELECT {} FROM {} WHERE generation = $1 ORDER BY {}",
                        table
                            .columns
                            .iter()
                            .map(|c| format!("CAST({c} AS TEXT)"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        table.name,
                        table.key
                    );
                    let live_rows = tx.fetch_text_rows(&select, &[live.into()]).await?;
                    let rebuilt_rows = tx.fetch_text_rows(&select, &[scratch.into()]).await?;
                    let longest = live_rows.len().max(rebuilt_rows.len());
                    for i in 0..longest {
                        let (l, r) = (live_rows.get(i), rebuilt_rows.get(i));
                        if l != r && differences.len() < 10 {
                            differences.push(Difference {
                                table: table.name.to_owned(),
                                live: l.cloned(),
                                rebuilt: r.cloned(),
                            });
                        }
                    }
                }
                tx.commit().await?;
                return Ok(VerifyReport {
                    equal: differences.is_empty(),
                    position: live_at,
                    differences,
                });
            }
            drop(tx);
            // Bring whichever is behind to the other's position; applying the live
            // generation here is safe, its checkpoint guard keeps it exactly once.
            if scratch_at < live_at {
                self.fill(scratch, Some(live_at), scratch).await?;
            } else {
                self.fill(live, Some(scratch_at), scratch).await?;
            }
        }
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

pub(crate) fn sql_int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
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
