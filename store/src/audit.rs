//! Re-checking the hash chains (see `chain`) from the stored rows, the same way for every
//! backend, in two walks over one snapshot of the database: the streams' chains (rows
//! ordered by stream, then version), then the log's chain (rows ordered by position)
//! ending at the log's head row.
//!
//! **What `verify` detects**, in rows written through the store, by anyone who edits the
//! database without recomputing hashes:
//! - an edit of any stored column of an event: stream, version, event id, type, schema
//!   version, data, metadata, recorded-at (the stream chain), position and category (the
//!   log chain), a stored hash itself; on PostgreSQL also a `jsonb` column edited apart
//!   from the text it was hashed as;
//! - a deleted event or stream anywhere in the log (a gap in versions or positions
//!   breaks the next link), a deleted tail of the log, down to every event (the last
//!   event left, or none, is not the one the head row records), and events reordered
//!   (positions swapped);
//! - a missing or emptied head row.
//!
//! **What it cannot detect**: a rewrite by someone who can write to the database and
//! recomputes the hashes (the algorithm is public and keyless). Cutting the tail and
//! moving the head row back to the new last event needs no hash computation at all. The
//! answer is an anchor kept outside the database (`annals audit anchor` prints the head's
//! position and log hash): `annals audit verify --anchor <hash>` then checks that the
//! chains are intact *and* that the log still holds that hash, which binds everything
//! up to the anchor's position. Events after the last anchor taken stay unprotected
//! against such a rewrite.
//!
//! Rows stored before the log chain existed were chained into it when the store first
//! opened the upgraded database (`backfill`); the anchor of that moment vouches for them
//! only from then on.

use futures::{Stream, StreamExt};
use uuid::Uuid;

use crate::chain::{self, GENESIS, Hash, Link};
use crate::error::StoreError;
use crate::model::{Anchor, AuditReport, BrokenLink};

/// One stored event, as a stream's chain sees it.
#[derive(Debug)]
pub(crate) struct AuditRow {
    pub stream: String,
    pub version: u64,
    pub position: u64,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: u32,
    /// The data as hashed: the text the store wrote (see `chain`).
    pub data: String,
    /// The metadata as hashed.
    pub metadata: String,
    pub recorded_at_micros: i64,
    pub hash: Vec<u8>,
}

/// One stored event, as the log's chain sees it.
#[derive(Debug)]
pub(crate) struct LogRow {
    pub position: u64,
    pub stream: String,
    pub version: u64,
    pub category: String,
    pub hash: Vec<u8>,
    /// `None` for a row the upgrade never reached.
    pub log_hash: Option<Vec<u8>>,
}

/// The log's head row: `None` when the row is missing; its columns `None` when the
/// upgrade never filled them.
pub(crate) type HeadRow = Option<(Option<u64>, Option<Vec<u8>>)>;

/// The report of both walks: the streams' first break is reported first.
pub(crate) fn combine(
    mut report: AuditReport,
    (anchor, broken): (Anchor, Option<BrokenLink>),
) -> AuditReport {
    report.head = anchor;
    if report.first_broken_link.is_none() {
        report.first_broken_link = broken;
    }
    report
}

/// Walks every stream's chain; rows arrive ordered by stream, then version.
pub(crate) async fn walk_streams<S>(rows: S) -> Result<AuditReport, StoreError>
where
    S: Stream<Item = Result<AuditRow, StoreError>>,
{
    let mut rows = std::pin::pin!(rows);
    let mut report = AuditReport {
        streams: 0,
        events: 0,
        first_broken_link: None,
        head: Anchor {
            position: 0,
            hash: hex::encode(GENESIS),
        },
    };
    let mut current_stream: Option<String> = None;
    let mut previous: Hash = GENESIS;
    let mut next_version = 1;
    while let Some(row) = rows.next().await {
        let row = row?;
        if current_stream.as_deref() != Some(row.stream.as_str()) {
            report.streams += 1;
            current_stream = Some(row.stream.clone());
            previous = GENESIS;
            next_version = 1;
        }
        report.events += 1;
        // A missing version breaks the link to the next one, since that event's hash was
        // computed over its real predecessor: hashing in the found version shows it.
        let expected = chain::link_hash(
            &previous,
            &Link {
                stream: &row.stream,
                version: row.version,
                event_id: row.event_id,
                event_type: &row.event_type,
                schema_version: row.schema_version,
                data: &row.data,
                metadata: &row.metadata,
                recorded_at_micros: row.recorded_at_micros,
            },
        );
        let broken = expected.as_slice() != row.hash.as_slice() || row.version != next_version;
        if broken && report.first_broken_link.is_none() {
            let reason = if row.version != next_version {
                format!(
                    "the stream's version {next_version} is missing: the next event stored is \
                     version {}",
                    row.version
                )
            } else {
                "the stored hash is not the one recomputed from the event and its \
                 predecessor in the stream"
                    .to_owned()
            };
            report.first_broken_link = Some(BrokenLink {
                stream: row.stream.clone(),
                version: row.version,
                position: row.position,
                expected: hex::encode(expected),
                found: hex::encode(&row.hash),
                reason,
            });
        }
        // Go on from the stored hash, so one edit is reported once, not for every later
        // event of the stream.
        previous = row.hash.as_slice().try_into().unwrap_or(expected);
        next_version = row.version + 1;
    }
    Ok(report)
}

/// Walks the log's chain (rows ordered by position) and checks the head row against its
/// end.
pub(crate) async fn walk_log<L>(
    rows: L,
    head: HeadRow,
) -> Result<(Anchor, Option<BrokenLink>), StoreError>
where
    L: Stream<Item = Result<LogRow, StoreError>>,
{
    let mut rows = std::pin::pin!(rows);
    let mut broken: Option<BrokenLink> = None;
    let mut previous: Hash = GENESIS;
    let mut last_position = 0;
    let mut last_event = (String::new(), 0);
    while let Some(row) = rows.next().await {
        let row = row?;
        let expected = chain::log_link_hash(&previous, row.position, &row.category, &row.hash);
        let stored = row.log_hash.as_deref().unwrap_or_default();
        if broken.is_none() && (expected.as_slice() != stored || row.position != last_position + 1)
        {
            let reason = if row.log_hash.is_none() {
                "the event has no log hash".to_owned()
            } else if row.position != last_position + 1 {
                format!(
                    "positions {} to {} are missing from the log",
                    last_position + 1,
                    row.position.saturating_sub(1)
                )
            } else {
                "the stored log hash is not the one recomputed from the event's position, \
                 category and hash and its predecessor in the log"
                    .to_owned()
            };
            broken = Some(BrokenLink {
                stream: row.stream.clone(),
                version: row.version,
                position: row.position,
                expected: hex::encode(expected),
                found: hex::encode(stored),
                reason,
            });
        }
        previous = stored.try_into().unwrap_or(expected);
        last_position = row.position;
        last_event = (row.stream, row.version);
    }
    let anchor = Anchor {
        position: last_position,
        hash: hex::encode(previous),
    };
    let head_problem = match &head {
        None => Some((0, Vec::new(), "the log's head row is missing".to_owned())),
        Some((Some(position), Some(hash)))
            if *position == last_position && hash.as_slice() == previous.as_slice() =>
        {
            None
        }
        Some((Some(position), Some(hash))) if *position > last_position => Some((
            *position,
            hash.clone(),
            format!(
                "the log ends at position {last_position}, but its head row records position \
                 {position}: events at the end of the log were deleted"
            ),
        )),
        Some((Some(position), Some(hash))) if *position == last_position => Some((
            *position,
            hash.clone(),
            format!(
                "the log's head row records position {position} with a hash that is not \
                 the log hash of the last event"
            ),
        )),
        Some((Some(position), Some(hash))) => Some((
            *position,
            hash.clone(),
            format!(
                "the log's head row records position {position}, which does not match the \
                 last event (position {last_position})"
            ),
        )),
        Some(_) => Some((0, Vec::new(), "the log's head row is empty".to_owned())),
    };
    if broken.is_none()
        && let Some((position, hash, reason)) = head_problem
    {
        broken = Some(BrokenLink {
            stream: last_event.0,
            version: last_event.1,
            position,
            expected: hex::encode(hash),
            found: hex::encode(previous),
            reason,
        });
    }
    Ok((anchor, broken))
}

/// The log hashes for rows written before the log chain existed, in position order,
/// continuing from `previous`: what `backfill` stores.
pub(crate) fn chain_rows(previous: &mut Hash, rows: &[(u64, String, Vec<u8>)]) -> Vec<Hash> {
    rows.iter()
        .map(|(position, category, hash)| {
            *previous = chain::log_link_hash(previous, *position, category, hash);
            *previous
        })
        .collect()
}
