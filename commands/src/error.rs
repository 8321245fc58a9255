//! Why a command was not carried out.

use annals_domain::{DecodeError, DomainError};
use annals_store::StoreError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum CommandError {
    /// The business refused the command (invalid, conflict or not found).
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// The caller asked for a version (`If-Match`) the aggregate is not at; nothing was
    /// appended and nothing is retried.
    #[error("the aggregate is at version {actual}, the command expected {expected}")]
    VersionMismatch { expected: u64, actual: u64 },
    /// Other writers kept changing the aggregate; the command was decided again on their
    /// result this many times and gave up.
    #[error("the aggregate kept changing; gave up after {attempts} attempts")]
    ConcurrencyConflict { attempts: u32 },
    /// The idempotency key was used before with another request.
    #[error("the idempotency key was used with another request")]
    IdempotencyKeyReused,
    /// The idempotency key's first request is still being carried out; nothing was
    /// done. Retry shortly: the retry gets the first request's answer.
    #[error("a request with this idempotency key is still being carried out")]
    IdempotencyKeyInUse,
    /// The caller's deadline passed before the command's append: nothing was written, and
    /// the command may be sent again as it is.
    #[error("the command was not carried out in time; nothing was written")]
    TimedOut,
    /// The aggregate id does not make a valid stream name.
    #[error("{0} is not a valid aggregate id")]
    InvalidId(String),
    /// A stored event of the aggregate cannot be read.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The event store failed (unavailable, or another technical failure).
    #[error(transparent)]
    Store(#[from] StoreError),
}
