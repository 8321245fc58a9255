//! What an operator sees of a consumer: its status, its parked events, what verify found.

use serde::Serialize;

use crate::ConsumerKind;

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
