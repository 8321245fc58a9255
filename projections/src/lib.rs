//! The projector runtime and the read models: projectors follow the global log and apply
//! each event exactly once, committing their rows and their checkpoint in one
//! transaction of the event store's own database.
//!
//! Invariants: a checkpoint only moves in the transaction that applied the events up to
//! it, and only from the value the runner read (a runner that lost the race applies
//! nothing); a read model is a pure function of the log (no clock, no randomness), so a
//! rebuild from position 0 gives the same rows. Projectors never append events;
//! processes act only through commands.

pub mod lead_board;
mod sql;

use std::sync::Arc;
use std::time::Duration;

use annals_store::{EventStore, LogFilter, RecordedEvent, StoreError};
use async_trait::async_trait;
use tokio::sync::watch;

pub use sql::{Param, ReadDatabase, ReadTx};

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
}

/// Turns events into rows of a read model.
#[async_trait]
pub trait Projector: Send + Sync + std::fmt::Debug {
    /// The projection's stable name (its checkpoint's key).
    fn name(&self) -> &'static str;
    /// The events it wants; others are skipped without a call.
    fn filter(&self) -> LogFilter;
    /// Applies one event inside the batch's transaction. Must not read the clock or
    /// anything but the event and its own rows.
    async fn apply(&self, tx: &mut ReadTx, event: &RecordedEvent) -> Result<(), ProjectionError>;
}

/// What one step of a runner did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Events were applied (or skipped by the filter) and the checkpoint moved.
    Applied(usize),
    /// Nothing new in the log.
    CaughtUp,
}

/// Runs one projector: reads the log after its checkpoint in batches, and applies each
/// batch and moves the checkpoint in one transaction.
#[derive(Debug)]
pub struct ProjectionRunner {
    store: Arc<dyn EventStore>,
    db: ReadDatabase,
    projector: Arc<dyn Projector>,
    batch_size: usize,
    /// The last checkpoint this runner committed (or read), for `wait_for`.
    applied: watch::Sender<u64>,
}

const READ_CHECKPOINT: &str = "SELECT position FROM projection_checkpoints WHERE name = $1";

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
        }
    }

    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    pub fn name(&self) -> &'static str {
        self.projector.name()
    }

    /// The position up to which the projection has applied the log.
    pub async fn checkpoint(&self) -> Result<u64, ProjectionError> {
        let mut tx = self.db.begin().await?;
        let position = tx
            .fetch_int(READ_CHECKPOINT, &[self.name().into()])
            .await?
            .unwrap_or(0);
        tx.commit().await?;
        Ok(u64::try_from(position).unwrap_or(0))
    }

    /// One step: the next batch after the checkpoint, applied and checkpointed in one
    /// transaction. A failure rolls the whole batch back and leaves the checkpoint.
    pub async fn run_once(&self) -> Result<Outcome, ProjectionError> {
        let checkpoint = self.checkpoint().await?;
        let page = self
            .store
            .read_all(checkpoint + 1, self.batch_size, &self.projector.filter())
            .await?;
        let next_checkpoint = page.next_position.saturating_sub(1).max(checkpoint);
        if next_checkpoint == checkpoint {
            self.applied.send_if_modified(|a| bump(a, checkpoint));
            return Ok(Outcome::CaughtUp);
        }
        let mut tx = self.db.begin().await?;
        for event in &page.events {
            self.projector.apply(&mut tx, event).await?;
        }
        let name = self.name();
        let moved =
            if checkpoint == 0 {
                tx.execute(
                    "INSERT INTO projection_checkpoints (name, position) VALUES ($1, $2) \
                 ON CONFLICT (name) DO NOTHING",
                    &[name.into(), sql_int(next_checkpoint).into()],
                )
                .await?
            } else {
                tx.execute(
                "UPDATE projection_checkpoints SET position = $2 WHERE name = $1 AND position = $3",
                &[name.into(), sql_int(next_checkpoint).into(), sql_int(checkpoint).into()],
            )
            .await?
            };
        if moved != 1 {
            // Dropping the transaction rolls the batch back.
            return Err(ProjectionError::CheckpointMoved(name.to_owned()));
        }
        tx.commit().await?;
        self.applied.send_if_modified(|a| bump(a, next_checkpoint));
        Ok(Outcome::Applied(page.events.len()))
    }

    /// Steps until caught up; returns how many events were applied.
    pub async fn catch_up(&self) -> Result<usize, ProjectionError> {
        let mut applied = 0;
        while let Outcome::Applied(n) = self.run_once().await? {
            applied += n;
        }
        Ok(applied)
    }

    /// Runs until `stop` turns true: steps while there is work, waits for new events
    /// (woken by the store's notification) when caught up, and backs off after a failure.
    pub async fn run_until_stopped(&self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        while !*stop.borrow() {
            match self.run_once().await {
                Ok(Outcome::Applied(_)) => backoff = Duration::from_millis(100),
                Ok(Outcome::CaughtUp) => {
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
    }

    /// Waits until this runner has applied the log up to `position`, or `timeout`;
    /// returns whether it has (read-your-writes for `min_position`).
    pub async fn wait_for(&self, position: u64, timeout: Duration) -> bool {
        let mut applied = self.applied.subscribe();
        tokio::time::timeout(timeout, applied.wait_for(|a| *a >= position))
            .await
            .is_ok_and(|seen| seen.is_ok())
    }
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

/// The time of an event as read models store it: RFC 3339 UTC with microseconds, which
/// sorts as text.
pub(crate) fn time_text(event: &RecordedEvent) -> String {
    event
        .recorded_at
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}
