//! Re-checking every stream's hash chain from the stored rows, the same way for every
//! backend: rows arrive ordered by stream, then version.

use futures::{Stream, StreamExt};
use serde_json::Value;
use uuid::Uuid;

use crate::chain::{self, GENESIS, Hash, Link};
use crate::error::StoreError;
use crate::model::{AuditReport, BrokenLink};

/// One stored event, as the chain sees it.
#[derive(Debug)]
pub(crate) struct AuditRow {
    pub stream: String,
    pub version: u64,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: u32,
    pub data: Value,
    pub metadata: Value,
    pub recorded_at_micros: i64,
    pub hash: Vec<u8>,
}

pub(crate) async fn walk<S>(rows: S) -> Result<AuditReport, StoreError>
where
    S: Stream<Item = Result<AuditRow, StoreError>>,
{
    let mut rows = std::pin::pin!(rows);
    let mut report = AuditReport {
        streams: 0,
        events: 0,
        first_broken_link: None,
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
        let data = chain::canonical_json(&row.data);
        let metadata = chain::canonical_json(&row.metadata);
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
                data: &data,
                metadata: &metadata,
                recorded_at_micros: row.recorded_at_micros,
            },
        );
        let broken = expected.as_slice() != row.hash.as_slice() || row.version != next_version;
        if broken && report.first_broken_link.is_none() {
            report.first_broken_link = Some(BrokenLink {
                stream: row.stream.clone(),
                version: row.version,
                expected: hex::encode(expected),
                found: hex::encode(&row.hash),
            });
        }
        // Go on from the stored hash, so one edit is reported once, not for every later
        // event of the stream.
        previous = row.hash.as_slice().try_into().unwrap_or(expected);
        next_version = row.version + 1;
    }
    Ok(report)
}
