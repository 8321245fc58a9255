//! The engine's one error: what a step, an operator's action on a consumer, or a query of
//! a read model can fail with; and a batch's failure, placed at its event when known.

use annals_store::StoreError;

use crate::ActionError;

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
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
    /// A process's or an outbound consumer's action failed: a refusal (`is_poison`)
    /// parks the event; anything else is retried.
    #[error("acting on the event failed: {0}")]
    Action(#[source] ActionError),
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
    pub error: ConsumerError,
}

impl Failure {
    /// A failure of the batch as a whole (writing it), not of one event.
    pub fn unplaced(error: ConsumerError) -> Self {
        Failure {
            position: None,
            error,
        }
    }
}
