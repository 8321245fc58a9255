//! The store's one error enum. Rejections an append can meet are typed so that callers
//! (and later the HTTP layer) never see database text; database failures keep their
//! cause as a `#[source]`, boxed (`BackendError`: no backend's type is in the contract),
//! and are split into "unavailable" (retry later) and the rest.

use std::sync::Arc;

use uuid::Uuid;

use crate::model::{ExpectedVersion, IdempotencyRecord};

/// A backend's own error, kept as the source of a `StoreError` for logs and for
/// `is_unavailable`-style classification inside the store; callers match on the kind.
pub type BackendError = Arc<dyn std::error::Error + Send + Sync>;

/// Why the store refused or failed an operation.
///
/// The error is `Clone` because one group commit answers many callers: a failure of the
/// shared transaction is handed to each of them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The stream was not at the version the append expected; nothing was written.
    #[error("stream {stream} is at version {actual}, the append expected {expected}")]
    WrongExpectedVersion {
        stream: String,
        expected: ExpectedVersion,
        actual: u64,
    },
    /// A unique key the append wanted to claim is held by another stream.
    #[error("claim {key} is held by stream {holder}")]
    ClaimHeld { key: String, holder: String },
    /// An event id is already stored, but not as this event at this place in this stream.
    #[error("event id {event_id} is already used by another event")]
    EventIdReused { event_id: Uuid },
    /// The append's idempotency key is already stored (with another append).
    #[error("idempotency key {} is already used", record.key)]
    IdempotencyKeyUsed { record: Box<IdempotencyRecord> },
    /// The input breaks a rule of the store's contract (see `InvalidInput`).
    #[error("invalid input: {0}")]
    InvalidInput(#[from] InvalidInput),
    /// The database could not be reached or dropped the connection, a bound of the write
    /// path ran out (the wait for the writers' lock, a statement, a commit; see
    /// `StoreConfig`), or the writer task failed and was restarted; the operation may be
    /// retried. After a dropped commit the append may or may not be stored: retry it with
    /// the same event ids and the idempotent append sorts it out.
    #[error("the event store is unavailable")]
    Unavailable(#[source] BackendError),
    /// Any other database failure.
    #[error("event store database error")]
    Database(#[source] BackendError),
    /// The schema migrations could not be applied.
    #[error("event store migration failed")]
    Migration(#[source] BackendError),
    /// A stored row could not be read back (corrupt JSON, a value out of range).
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The master key is malformed, or is not the key this database's data keys were
    /// wrapped with (see `vault`).
    #[error("master key: {0}")]
    MasterKey(String),
    /// The subject's data key was shredded (its personal data erased): it takes no new
    /// personal data.
    #[error("the personal data of {subject} was erased")]
    Shredded { subject: String },
    /// The database URL names no backend this store has.
    #[error("unsupported database URL: it must start with sqlite: or postgres://")]
    UnsupportedUrl,
    /// The store's writer task is gone (the store was closed).
    #[error("the event store is shut down")]
    Closed,
}

/// The input rules of the store's contract, each a distinct case so tests and callers can
/// match on them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error("an append must carry at least one event")]
    EmptyAppend,
    #[error("an append carries at most {max} events, this one has {len}")]
    TooManyEvents { len: usize, max: usize },
    #[error("stream name {name:?} is invalid: {reason}")]
    StreamName { name: String, reason: &'static str },
    #[error("expected version {0} is below zero")]
    NegativeExpectedVersion(i64),
    #[error(
        "event type {event_type:?} is invalid: it must be 1 to 200 characters without control characters"
    )]
    EventType { event_type: String },
    #[error("event {event_id}: data must be a JSON object")]
    DataNotObject { event_id: Uuid },
    #[error("event {event_id}: text may not contain the NUL character")]
    NulCharacter { event_id: Uuid },
    #[error("event {event_id}: metadata key {key:?} is reserved")]
    ReservedMetadataKey { event_id: Uuid, key: String },
    #[error("event id {event_id} appears twice in one append")]
    DuplicateEventId { event_id: Uuid },
    #[error("claim key {key:?} is invalid: it must be 1 to 200 characters")]
    ClaimKey { key: String },
    #[error("an idempotency key must be 1 to 400 characters, with a request hash")]
    IdempotencyKey,
    #[error("snapshot of {stream} must have a version of at least 1")]
    SnapshotVersion { stream: String },
}

impl StoreError {
    /// Classifies a sqlx error: lost or refused connections are `Unavailable`.
    pub(crate) fn from_sqlx(error: sqlx::Error) -> Self {
        if is_unavailable(&error) {
            StoreError::Unavailable(Arc::new(error))
        } else {
            StoreError::Database(Arc::new(error))
        }
    }

    /// Whether the database refused what was asked (a constraint, a type, a value), as
    /// opposed to failing: the same statement would be refused again. An outage is
    /// `Unavailable`, never a refusal.
    pub fn is_refusal(&self) -> bool {
        self.refusal().is_some()
    }

    /// The database's refusal behind a `Database` error, if that is what it is.
    pub(crate) fn refusal(&self) -> Option<&dyn sqlx::error::DatabaseError> {
        match self {
            StoreError::Database(error) => error
                .downcast_ref::<sqlx::Error>()
                .and_then(sqlx::Error::as_database_error),
            _ => None,
        }
    }

    /// A bound of the write path ran out (`what` says which).
    pub(crate) fn timed_out(what: &'static str) -> Self {
        let error = std::io::Error::new(std::io::ErrorKind::TimedOut, what);
        StoreError::Unavailable(Arc::new(sqlx::Error::Io(error)))
    }

    /// The writer task failed while it held the append (it is restarted).
    pub(crate) fn writer_crashed() -> Self {
        StoreError::Unavailable(Arc::new(sqlx::Error::WorkerCrashed))
    }
}

/// Whether a database error means "not reachable now, retry later" (a lost or refused
/// connection, a server shutting down, a busy SQLite file) rather than a refusal.
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(refusal) => is_outage_code(refusal.as_ref()),
        _ => false,
    }
}

/// Whether a database's refusal is an outage (retry later), not a refusal of what was
/// asked: the one list every crate classifies by.
fn is_outage_code(error: &dyn sqlx::error::DatabaseError) -> bool {
    let Some(code) = error.code() else {
        return false;
    };
    if error
        .try_downcast_ref::<sqlx::sqlite::SqliteError>()
        .is_some()
    {
        // SQLite reports extended result codes, which keep the primary code in their low
        // byte: BUSY (5) and LOCKED (6) mean another writer held the file past the busy
        // timeout; IOERR (10) and FULL (13) are the disk's.
        return code
            .parse::<i64>()
            .is_ok_and(|code| matches!(code & 0xff, 5 | 6 | 10 | 13));
    }
    // PostgreSQL's SQLSTATE: 08 connection exception, 40001 serialization failure,
    // 40P01 deadlock, 40003 completion unknown, 53 insufficient resources, 55P03 lock
    // not available (lock_timeout), 57 operator intervention (57014: statement_timeout
    // or a cancel; 57P01-3: shutdown, crash), 58 system error, 25P03 idle in
    // transaction session timeout (the write path's bounds, see `StoreConfig`).
    ["08", "53", "57", "58"]
        .iter()
        .any(|class| code.starts_with(class))
        || ["40001", "40P01", "40003", "55P03", "25P03"].contains(&code.as_ref())
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        StoreError::from_sqlx(error)
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        StoreError::Migration(Arc::new(error))
    }
}
