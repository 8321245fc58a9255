//! The consumer contract: the three kinds of consumer and what the engine asks of each,
//! what one step did, and what a consumer does with an event it cannot take.
//!
//! Invariant: the engine sees events only as the store records them (`RecordedEvent`);
//! a consumer's business (its commands, its receiver) stays behind these traits.

use std::sync::Arc;

use annals_store::{LogFilter, RecordedEvent};
use async_trait::async_trait;
use serde::Serialize;

use crate::{ConsumerError, Failure, ReadTx, Table};

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
    pub(crate) async fn act(&self, event: &RecordedEvent) -> Result<(), ConsumerError> {
        let acted = match self {
            Consumer::ReadModel(projector) => {
                return Err(ConsumerError::Apply {
                    position: event.position,
                    event_type: event.event_type.clone(),
                    reason: format!(
                        "{} applies events in its batch's transaction",
                        projector.name()
                    ),
                });
            }
            Consumer::Process(process) => process.handle(event).await,
            Consumer::Outbound(outbound) => outbound.deliver(event).await,
        };
        acted.map_err(ConsumerError::Action)
    }
}

/// A process: decides commands from events. It may act on an event more than once (after
/// a crash, or when a straggler and the lease's new holder both do), so every command it
/// sends carries an idempotency key derived from the causing event's id, and acting twice
/// has the effect of acting once. A refusal it cannot get past (the business refuses
/// its command, the event cannot be decoded) is the event's own failure
/// (`ActionError::Refused`) and parks it; an outage of the store, a lost race or a
/// command still in flight elsewhere (`ActionError::NotNow`) is retried with backoff.
#[async_trait]
pub trait Process: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    fn filter(&self) -> LogFilter;
    async fn handle(&self, event: &RecordedEvent) -> Result<(), ActionError>;
}

/// An outbound consumer: delivers each event it takes to something outside, at least
/// once; a delivery's id is its event's `event_id`, the same on every redelivery, so the
/// receiver can drop duplicates.
#[async_trait]
pub trait Outbound: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    fn filter(&self) -> LogFilter;
    async fn deliver(&self, event: &RecordedEvent) -> Result<(), ActionError>;
}

/// Any error, boxed: what a process's or an outbound consumer's action failed with, in
/// the words of the crate it comes from (the engine only sorts it).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a process's or an outbound consumer's action on an event failed, as the engine
/// sorts it: the consumer that knows its errors says which.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// The event's own failure, for good (the business refused the command it made, the
    /// receiver refused it, it cannot be decoded): after its attempts it is parked.
    #[error("refused: {0}")]
    Refused(#[source] BoxError),
    /// Not now (the store or the receiver is down, another writer won a race, the same
    /// command is in flight elsewhere): retried with backoff, never parked.
    #[error("not now: {0}")]
    NotNow(#[source] BoxError),
}

impl ActionError {
    pub fn refused(error: impl Into<BoxError>) -> Self {
        ActionError::Refused(error.into())
    }

    pub fn not_now(error: impl Into<BoxError>) -> Self {
        ActionError::NotNow(error.into())
    }

    /// The error it carries, when it is a `T` (a test, or a consumer that reads its own
    /// errors back).
    pub fn downcast_ref<T: std::error::Error + 'static>(&self) -> Option<&T> {
        match self {
            ActionError::Refused(error) | ActionError::NotNow(error) => error.downcast_ref(),
        }
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
            error: ConsumerError::Apply {
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
