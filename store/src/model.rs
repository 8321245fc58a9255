//! The data the store speaks: stream names, expected versions, events going in and coming
//! out, claims, snapshots and audit reports. No SQL here: these types are the contract
//! every backend (and a future non-SQL one) serves.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::{InvalidInput, StoreError};

/// The most events one append may carry.
pub const MAX_EVENTS_PER_APPEND: usize = 10_000;
/// The longest stream name, event type or claim key, in characters.
pub const MAX_NAME_LEN: usize = 200;
/// The longest idempotency key the store keeps, in characters (room for a caller's
/// scope before a client's 200-character key).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 400;

/// A validated stream name: 1–200 characters of `[A-Za-z0-9_.:-]`.
///
/// Its category is the part before the first `-` (`lead` for `lead-42`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct StreamName(String);

impl StreamName {
    pub fn parse(name: impl Into<String>) -> Result<Self, StoreError> {
        let name = name.into();
        let reason = if name.is_empty() {
            Some("it is empty")
        } else if name.chars().count() > MAX_NAME_LEN {
            Some("it is longer than 200 characters")
        } else if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'))
        {
            Some("only A-Z, a-z, 0-9, '_', '.', ':' and '-' are allowed")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(InvalidInput::StreamName { name, reason }.into()),
            None => Ok(StreamName(name)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the first `-`, or the whole name when it has none.
    pub fn category(&self) -> &str {
        category_of(&self.0)
    }
}

pub(crate) fn category_of(stream: &str) -> &str {
    stream
        .split_once('-')
        .map_or(stream, |(category, _)| category)
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an append expects of the stream's current version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// Append whatever the version.
    Any,
    /// The stream must not exist yet (it has no events).
    NoStream,
    /// The stream must be at exactly this version (0 means it has no events).
    Exact(u64),
}

impl ExpectedVersion {
    /// An exact expected version from a signed number, as it arrives from outside (an
    /// `If-Match` header); negative numbers are refused.
    pub fn exact(version: i64) -> Result<Self, StoreError> {
        u64::try_from(version)
            .map(ExpectedVersion::Exact)
            .map_err(|_| InvalidInput::NegativeExpectedVersion(version).into())
    }

    pub(crate) fn admits(self, current: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current == 0,
            ExpectedVersion::Exact(version) => current == version,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any version"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Exact(version) => write!(f, "version {version}"),
        }
    }
}

/// Who and what caused an event. Tenant ids and other context go in `extra`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Free keys; they may not reuse the names of the fields above.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

pub(crate) const RESERVED_METADATA_KEYS: [&str; 3] = ["correlation_id", "causation_id", "actor"];

/// An event to append. `event_id` makes the append idempotent: appending the same event
/// again at the same place is a no-op.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: u32,
    /// Must be a JSON object.
    pub data: Value,
    pub metadata: Metadata,
}

impl NewEvent {
    /// An event with a fresh UUIDv7 id, schema version 1 and empty metadata.
    pub fn new(event_type: impl Into<String>, data: Value) -> Self {
        NewEvent {
            event_id: Uuid::now_v7(),
            event_type: event_type.into(),
            schema_version: 1,
            data,
            metadata: Metadata::default(),
        }
    }

    pub fn with_id(mut self, event_id: Uuid) -> Self {
        self.event_id = event_id;
        self
    }

    pub fn with_schema_version(mut self, schema_version: u32) -> Self {
        self.schema_version = schema_version;
        self
    }

    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }
}

/// A unique key taken or given back together with an append's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Take the key for the appending stream; fails with `ClaimHeld` when another stream
    /// holds it. Taking a key the stream already holds is a no-op.
    Take(String),
    /// Give the key back. Releasing a key nobody holds is a no-op; releasing one held by
    /// another stream fails with `ClaimHeld`.
    Release(String),
}

impl Claim {
    pub fn key(&self) -> &str {
        match self {
            Claim::Take(key) | Claim::Release(key) => key,
        }
    }
}

/// The idempotency key of the command that caused an append, stored in the same
/// transaction as its events, so a retry finds either both or neither.
#[derive(Debug, Clone, PartialEq)]
pub struct IdempotencyKey {
    pub key: String,
    /// A digest of the request, to tell a retry from another request reusing the key.
    pub request_hash: String,
    /// What the caller wants back on a retry, besides the append's outcome.
    pub payload: Value,
}

/// An idempotency key as stored, with the outcome of the append it came with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IdempotencyRecord {
    pub key: String,
    pub request_hash: String,
    pub payload: Value,
    pub stream: String,
    /// The stream's version after the append.
    pub version: u64,
    /// The position of the append's last event.
    pub last_position: u64,
    pub recorded_at: DateTime<Utc>,
}

/// One atomic append: all its events, claims, idempotency key and shredded data keys are
/// stored, or none.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendRequest {
    pub stream: StreamName,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
    pub claims: Vec<Claim>,
    pub idempotency: Option<IdempotencyKey>,
    /// Subjects whose data key (see `DataKeys`) the append destroys, in its transaction:
    /// their rows stay, without a key, as tombstones.
    pub shred: Vec<String>,
    /// A data key stored in the append's transaction, for an append that creates its
    /// stream: `(subject, wrapped, the check of the master key that wrapped it)`.
    pub new_key: Option<(String, Vec<u8>, Vec<u8>)>,
}

impl AppendRequest {
    pub fn new(stream: StreamName, expected: ExpectedVersion, events: Vec<NewEvent>) -> Self {
        AppendRequest {
            stream,
            expected,
            events,
            claims: Vec::new(),
            idempotency: None,
            shred: Vec::new(),
            new_key: None,
        }
    }

    /// Destroys the data keys of these subjects with the append (crypto-shredding).
    pub fn with_shredded(mut self, subjects: Vec<String>) -> Self {
        self.shred = subjects;
        self
    }

    pub fn with_idempotency(mut self, key: IdempotencyKey) -> Self {
        self.idempotency = Some(key);
        self
    }

    pub fn with_claims(mut self, claims: Vec<Claim>) -> Self {
        self.claims = claims;
        self
    }
}

/// What a successful append did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppendOutcome {
    /// The stream's version after the append (the version of its last event).
    pub version: u64,
    /// The global positions of the appended events, in order.
    pub positions: Vec<u64>,
}

impl AppendOutcome {
    /// The position of the append's last event: the consistency token of the API.
    pub fn last_position(&self) -> u64 {
        self.positions.last().copied().unwrap_or(0)
    }
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecordedEvent {
    pub position: u64,
    pub stream: String,
    pub version: u64,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: u32,
    pub data: Value,
    pub metadata: Metadata,
    pub recorded_at: DateTime<Utc>,
    /// SHA-256 over the previous event's hash and this event's canonical bytes.
    #[serde(serialize_with = "hex_hash")]
    pub hash: [u8; 32],
}

fn hex_hash<S: serde::Serializer>(hash: &[u8; 32], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&hex::encode(hash))
}

/// Which way `read_stream` walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Versions from `from_version` upwards.
    Forwards,
    /// Versions from `from_version` downwards (`u64::MAX` starts at the last event).
    Backwards,
}

/// Which events of the global log `read_all` returns. Empty lists match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogFilter {
    pub event_types: Vec<String>,
    /// Stream categories: the part of the stream name before the first `-`.
    pub categories: Vec<String>,
}

impl LogFilter {
    pub fn all() -> Self {
        LogFilter::default()
    }

    pub fn event_types<I: IntoIterator<Item = S>, S: Into<String>>(types: I) -> Self {
        LogFilter {
            event_types: types.into_iter().map(Into::into).collect(),
            categories: Vec::new(),
        }
    }

    pub fn categories<I: IntoIterator<Item = S>, S: Into<String>>(categories: I) -> Self {
        LogFilter {
            event_types: Vec::new(),
            categories: categories.into_iter().map(Into::into).collect(),
        }
    }

    pub fn matches(&self, event: &RecordedEvent) -> bool {
        (self.event_types.is_empty() || self.event_types.contains(&event.event_type))
            && (self.categories.is_empty()
                || self
                    .categories
                    .iter()
                    .any(|c| c == category_of(&event.stream)))
    }
}

/// One page of the global log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogPage {
    /// Matching events in increasing position.
    pub events: Vec<RecordedEvent>,
    /// Where the next read should start: every position below it has been looked at, so
    /// a reader may checkpoint `next_position - 1` even when the filter matched nothing.
    pub next_position: u64,
    /// The last position of the log when the page was read.
    pub head: u64,
}

/// The latest saved state of a stream's aggregate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub stream: String,
    /// The stream version the state includes.
    pub version: u64,
    /// The version of the state's own schema; a reader that does not know it rebuilds
    /// from events instead.
    pub schema_version: u32,
    pub state: Value,
}

/// The result of walking the hash chains of every stream and of the whole log (see
/// `audit` for what it proves and what it cannot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditReport {
    pub streams: u64,
    pub events: u64,
    /// The first broken link: of the streams' chains (in stream name, then version
    /// order) if any, else of the log's chain (in position order, then its head).
    pub first_broken_link: Option<BrokenLink>,
    /// The last position walked and its log hash: an anchor the log holds now.
    pub head: Anchor,
}

impl AuditReport {
    pub fn ok(&self) -> bool {
        self.first_broken_link.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BrokenLink {
    /// The event where the break shows (for a cut tail, the last event left; empty and
    /// 0 when no event is left).
    pub stream: String,
    pub version: u64,
    /// Its position in the log (for a cut tail, the last position the log's head row
    /// records).
    pub position: u64,
    /// The hash recomputed from the stored contents (hex); for a cut tail, the hash the
    /// head row records.
    pub expected: String,
    /// The hash stored in the row (hex); for a cut tail, the last event's log hash.
    pub found: String,
    /// What is wrong, in one sentence.
    pub reason: String,
}

/// A point of the log: a position and the log hash there, which stands for everything up
/// to it. Kept somewhere the database's writers cannot reach, it shows a rewrite that
/// recomputed every hash (see `EventStore::find_anchor`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Anchor {
    pub position: u64,
    /// The log hash at `position` (64 hex digits; all zeros for the empty log).
    pub hash: String,
}

/// Builds a `RecordedEvent` from a row's columns, refusing values no append could store.
#[allow(clippy::too_many_arguments)] // One argument per column of the events table.
pub(crate) fn recorded_event(
    position: i64,
    stream: String,
    version: i64,
    event_id: Uuid,
    event_type: String,
    schema_version: i64,
    data: Value,
    metadata: Value,
    recorded_at: DateTime<Utc>,
    hash: &[u8],
) -> Result<RecordedEvent, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("{what} of event {event_id}"));
    Ok(RecordedEvent {
        position: u64::try_from(position).map_err(|_| corrupt("position"))?,
        version: u64::try_from(version).map_err(|_| corrupt("version"))?,
        schema_version: u32::try_from(schema_version).map_err(|_| corrupt("schema version"))?,
        metadata: serde_json::from_value(metadata).map_err(|_| corrupt("metadata"))?,
        hash: hash.try_into().map_err(|_| corrupt("hash"))?,
        stream,
        event_id,
        event_type,
        data,
        recorded_at,
    })
}

/// Numbers cross into SQL as `i64`; the store never hands out more than `i64::MAX`.
pub fn to_sql_int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A page of the log: where the next read starts is after the last event when the page
/// is full, otherwise after the head the read looked at.
pub(crate) fn page(events: Vec<RecordedEvent>, from: u64, limit: usize, head: u64) -> LogPage {
    let next_position = match events.last() {
        _ if limit == 0 => from,
        Some(last) if events.len() >= limit => last.position + 1,
        _ => head.max(from.saturating_sub(1)) + 1,
    };
    LogPage {
        events,
        next_position,
        head,
    }
}

pub(crate) fn check_snapshot(snapshot: &Snapshot) -> Result<(), StoreError> {
    StreamName::parse(snapshot.stream.as_str())?;
    if snapshot.version == 0 {
        return Err(InvalidInput::SnapshotVersion {
            stream: snapshot.stream.clone(),
        }
        .into());
    }
    Ok(())
}
