//! Group commit, the part that does not touch a database: validating appends, and
//! planning one transaction for a batch of them.
//!
//! A backend takes its write lock, reads the `LogFacts` the batch needs (stream heads,
//! already stored event ids, claim holders, the last position), and `plan` decides each
//! append on its own against those facts *and the appends before it in the batch*: an
//! append that fails (wrong version, held claim, reused id) is left out without touching
//! the others. The backend then writes the planned rows and claim changes and commits
//! once. Because every writer holds the lock while it reads facts and writes, the facts
//! cannot go stale between the two steps.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::chain::{self, GENESIS, Hash, Link};
use crate::error::{InvalidInput, StoreError};
use crate::model::{
    AppendOutcome, AppendRequest, Claim, IdempotencyRecord, MAX_EVENTS_PER_APPEND,
    MAX_IDEMPOTENCY_KEY_LEN, MAX_NAME_LEN, RESERVED_METADATA_KEYS,
};

/// An append that passed the input rules, with its JSON already in canonical form.
#[derive(Debug)]
pub(crate) struct ValidAppend {
    pub request: AppendRequest,
    /// Canonical JSON of each event's data and metadata, in event order.
    pub data: Vec<String>,
    pub metadata: Vec<String>,
}

pub(crate) fn validate(request: AppendRequest) -> Result<ValidAppend, StoreError> {
    if request.events.is_empty() {
        return Err(InvalidInput::EmptyAppend.into());
    }
    if request.events.len() > MAX_EVENTS_PER_APPEND {
        return Err(InvalidInput::TooManyEvents {
            len: request.events.len(),
            max: MAX_EVENTS_PER_APPEND,
        }
        .into());
    }
    let mut data = Vec::with_capacity(request.events.len());
    let mut metadata = Vec::with_capacity(request.events.len());
    for (i, event) in request.events.iter().enumerate() {
        let id = event.event_id;
        let type_ok = !event.event_type.is_empty()
            && event.event_type.chars().count() <= MAX_NAME_LEN
            && !event.event_type.chars().any(char::is_control);
        if !type_ok {
            return Err(InvalidInput::EventType {
                event_type: event.event_type.clone(),
            }
            .into());
        }
        if !event.data.is_object() {
            return Err(InvalidInput::DataNotObject { event_id: id }.into());
        }
        if let Some(key) = event
            .metadata
            .extra
            .keys()
            .find(|k| RESERVED_METADATA_KEYS.contains(&k.as_str()))
        {
            return Err(InvalidInput::ReservedMetadataKey {
                event_id: id,
                key: key.clone(),
            }
            .into());
        }
        let metadata_value = serde_json::to_value(&event.metadata)
            .map_err(|e| StoreError::Corrupt(format!("metadata does not serialise: {e}")))?;
        // A NUL in the event type needs no check here: it is a control character, which
        // the event type rule above refuses.
        if chain::contains_nul(&event.data) || chain::contains_nul(&metadata_value) {
            return Err(InvalidInput::NulCharacter { event_id: id }.into());
        }
        if request.events[..i].iter().any(|e| e.event_id == id) {
            return Err(InvalidInput::DuplicateEventId { event_id: id }.into());
        }
        data.push(chain::canonical_json(&event.data));
        metadata.push(chain::canonical_json(&metadata_value));
    }
    for claim in &request.claims {
        let key = claim.key();
        if key.is_empty() || key.chars().count() > MAX_NAME_LEN || key.contains('\0') {
            return Err(InvalidInput::ClaimKey {
                key: key.to_owned(),
            }
            .into());
        }
    }
    if let Some(idempotency) = &request.idempotency {
        let key_len = idempotency.key.chars().count();
        if key_len == 0
            || key_len > MAX_IDEMPOTENCY_KEY_LEN
            || idempotency.key.contains('\0')
            || idempotency.request_hash.is_empty()
            || idempotency.request_hash.contains('\0')
            || idempotency.request_hash.len() > MAX_NAME_LEN
            || chain::contains_nul(&idempotency.payload)
        {
            return Err(InvalidInput::IdempotencyKey.into());
        }
    }
    Ok(ValidAppend {
        request,
        data,
        metadata,
    })
}

/// An event already in the log, as much of it as idempotency needs.
#[derive(Debug, Clone)]
pub(crate) struct StoredEvent {
    pub stream: String,
    pub version: u64,
    pub position: u64,
    pub event_type: String,
    pub schema_version: u32,
    /// Canonical JSON of the stored data.
    pub data: String,
}

/// What the database says about the streams, ids and claims a batch touches, read under
/// the write lock (or remembered from this writer's own commits, see `HeadCache`).
#[derive(Debug, Default)]
pub(crate) struct LogFacts {
    /// Version and last hash of each touched stream that exists.
    pub heads: HashMap<String, (u64, Hash)>,
    /// Stored events whose ids the batch uses (read only when a retry is suspected).
    pub stored: HashMap<Uuid, StoredEvent>,
    /// Holder stream of each claim key the batch touches that is held.
    pub claims: HashMap<String, String>,
    /// Stored idempotency keys the batch uses (read with the event ids).
    pub idempotency: HashMap<String, IdempotencyRecord>,
    /// The last position given, from the log's head row (never `MAX(position)`: a
    /// deleted tail's positions are not given again), and its log hash.
    pub last_position: u64,
    pub last_log_hash: Hash,
}

/// The keys a backend looks up for a batch.
#[derive(Debug)]
pub(crate) struct Wanted {
    pub streams: Vec<String>,
    pub event_ids: Vec<Uuid>,
    pub claim_keys: Vec<String>,
    pub idempotency_keys: Vec<String>,
}

impl LogFacts {
    /// The keys a backend must look up for this batch.
    pub fn wanted(batch: &[ValidAppend]) -> Wanted {
        let mut streams: Vec<String> = batch
            .iter()
            .map(|a| a.request.stream.as_str().to_owned())
            .collect();
        streams.sort_unstable();
        streams.dedup();
        let event_ids = batch
            .iter()
            .flat_map(|a| a.request.events.iter().map(|e| e.event_id))
            .collect();
        let mut claim_keys: Vec<String> = batch
            .iter()
            .flat_map(|a| a.request.claims.iter().map(|c| c.key().to_owned()))
            .collect();
        claim_keys.sort_unstable();
        claim_keys.dedup();
        let idempotency_keys = batch
            .iter()
            .filter_map(|a| a.request.idempotency.as_ref().map(|i| i.key.clone()))
            .collect();
        Wanted {
            streams,
            event_ids,
            claim_keys,
            idempotency_keys,
        }
    }
}

/// A row to insert into the events table.
#[derive(Debug)]
pub(crate) struct EventRow {
    pub position: u64,
    pub stream: String,
    pub category: String,
    pub version: u64,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: u32,
    pub data: String,
    pub metadata: String,
    pub recorded_at: DateTime<Utc>,
    pub hash: Hash,
    /// The log chain's link at `position` (see `chain`).
    pub log_hash: Hash,
}

/// The transaction a batch turns into, and each append's answer.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub rows: Vec<EventRow>,
    /// Claim keys to set to a holder (insert or overwrite), with the position of the
    /// append's first event.
    pub claims_taken: Vec<(String, String, u64)>,
    /// Claim keys to delete.
    pub claims_released: Vec<String>,
    /// Idempotency keys to record.
    pub idempotency: Vec<IdempotencyRecord>,
    /// Subjects whose data keys to destroy (each once).
    pub shredded: Vec<String>,
    /// Data keys to store: (subject, wrapped, master key check).
    pub new_keys: Vec<(String, Vec<u8>, Vec<u8>)>,
    pub outcomes: Vec<Result<AppendOutcome, StoreError>>,
    /// The log's head after this plan, for its head row.
    pub last_position: u64,
    pub last_log_hash: Hash,
    /// Every touched stream's version and last hash after this plan: what the writer
    /// may remember once the plan is committed.
    pub heads: HashMap<String, (u64, Hash)>,
}

impl Plan {
    /// Whether an append was refused for a reason that facts without event ids cannot
    /// settle: a wrong version, or a claim held by another stream (the claim may have
    /// moved since), may be a retry of an append already stored, whose answer is its
    /// first outcome.
    pub fn needs_stored_ids(&self) -> bool {
        self.outcomes.iter().any(|o| {
            matches!(
                o,
                Err(StoreError::WrongExpectedVersion { .. } | StoreError::ClaimHeld { .. })
            )
        })
    }
}

/// Decides every append of the batch in order against the facts and the batch so far.
pub(crate) fn plan(batch: &[ValidAppend], mut facts: LogFacts, recorded_at: DateTime<Utc>) -> Plan {
    // Truncated to what both databases keep, so the hash can be recomputed from the row.
    let micros = recorded_at.timestamp_micros();
    let recorded_at = DateTime::from_timestamp_micros(micros).unwrap_or(recorded_at);
    let initial_claims = facts.claims.clone();
    // The head fields are set from the facts once every append is planned (`plan_one`
    // reads and moves the facts' head, never the plan's).
    let mut plan = Plan::default();
    for append in batch {
        let outcome = plan_one(append, &mut facts, &mut plan, recorded_at, micros);
        plan.outcomes.push(outcome);
    }
    plan.last_position = facts.last_position;
    plan.last_log_hash = facts.last_log_hash;
    plan.heads = std::mem::take(&mut facts.heads);
    // Only the net change per key is written, so a key released and taken again in one
    // batch becomes one overwrite.
    let mut touched: Vec<&String> = facts.claims.keys().chain(initial_claims.keys()).collect();
    touched.sort_unstable();
    touched.dedup();
    for key in touched {
        match (initial_claims.get(key), facts.claims.get(key)) {
            (before, Some(holder)) if before != Some(holder) => {
                let position = plan
                    .rows
                    .iter()
                    .find(|r| &r.stream == holder)
                    .map_or(0, |r| r.position);
                plan.claims_taken
                    .push((key.clone(), holder.clone(), position));
            }
            (Some(_), None) => plan.claims_released.push(key.clone()),
            _ => {}
        }
    }
    plan
}

/// Decides one append against the facts and the batch before it: a replay of an
/// append already stored is answered as it was; otherwise the idempotency key, the
/// expected version and the claims are checked, in that order, before anything moves.
/// Only an append that passes moves the facts and adds to the plan.
fn plan_one(
    append: &ValidAppend,
    facts: &mut LogFacts,
    plan: &mut Plan,
    recorded_at: DateTime<Utc>,
    micros: i64,
) -> Result<AppendOutcome, StoreError> {
    let request = &append.request;
    let stream = request.stream.as_str();

    if let Some(replayed) = already_stored(append, facts)? {
        return Ok(replayed);
    }
    if let Some(key) = &request.idempotency
        && let Some(record) = facts.idempotency.get(&key.key)
    {
        return Err(StoreError::IdempotencyKeyUsed {
            record: Box::new(record.clone()),
        });
    }

    let head = facts.heads.get(stream).copied().unwrap_or((0, GENESIS));
    if !request.expected.admits(head.0) {
        return Err(StoreError::WrongExpectedVersion {
            stream: stream.to_owned(),
            expected: request.expected,
            actual: head.0,
        });
    }
    facts.claims = claims_after(request, &facts.claims)?;

    let (version, positions) = chain_events(append, head, facts, plan, recorded_at, micros);
    if let Some(key) = &request.idempotency {
        let record = IdempotencyRecord {
            key: key.key.clone(),
            request_hash: key.request_hash.clone(),
            payload: key.payload.clone(),
            stream: stream.to_owned(),
            version,
            last_position: facts.last_position,
            recorded_at,
        };
        facts.idempotency.insert(key.key.clone(), record.clone());
        plan.idempotency.push(record);
    }
    for subject in &request.shred {
        if !plan.shredded.contains(subject) {
            plan.shredded.push(subject.clone());
        }
    }
    if let Some(key) = &request.new_key {
        plan.new_keys.push(key.clone());
    }
    Ok(AppendOutcome { version, positions })
}

/// The claim holders once the request's claims are taken and released, in its order;
/// `ClaimHeld` when another stream holds one of them. Worked on a copy, so a refused
/// append leaves the holders as they were.
fn claims_after(
    request: &AppendRequest,
    holders: &HashMap<String, String>,
) -> Result<HashMap<String, String>, StoreError> {
    let stream = request.stream.as_str();
    let mut claims = holders.clone();
    for claim in &request.claims {
        match claim {
            Claim::Take(key) => match claims.get(key) {
                Some(holder) if holder != stream => {
                    return Err(StoreError::ClaimHeld {
                        key: key.clone(),
                        holder: holder.clone(),
                    });
                }
                _ => {
                    claims.insert(key.clone(), stream.to_owned());
                }
            },
            Claim::Release(key) => match claims.get(key) {
                Some(holder) if holder != stream => {
                    return Err(StoreError::ClaimHeld {
                        key: key.clone(),
                        holder: holder.clone(),
                    });
                }
                _ => {
                    claims.remove(key);
                }
            },
        }
    }
    Ok(claims)
}

/// Chains the append's events onto its stream (at `head`: version and last hash) and
/// onto the log, as rows of the plan; moves the facts' heads past them and remembers
/// them as stored, so a later append of the batch that reuses an id sees them. Returns
/// the stream's new version and the events' positions.
fn chain_events(
    append: &ValidAppend,
    head: (u64, Hash),
    facts: &mut LogFacts,
    plan: &mut Plan,
    recorded_at: DateTime<Utc>,
    micros: i64,
) -> (u64, Vec<u64>) {
    let request = &append.request;
    let stream = request.stream.as_str();
    let category = request.stream.category().to_owned();
    let (mut version, mut previous) = head;
    let mut positions = Vec::with_capacity(request.events.len());
    for (i, event) in request.events.iter().enumerate() {
        version += 1;
        facts.last_position += 1;
        let hash = chain::link_hash(
            &previous,
            &Link {
                stream,
                version,
                event_id: event.event_id,
                event_type: &event.event_type,
                schema_version: event.schema_version,
                data: &append.data[i],
                metadata: &append.metadata[i],
                recorded_at_micros: micros,
            },
        );
        previous = hash;
        facts.last_log_hash =
            chain::log_link_hash(&facts.last_log_hash, facts.last_position, &category, &hash);
        positions.push(facts.last_position);
        facts.stored.insert(
            event.event_id,
            StoredEvent {
                stream: stream.to_owned(),
                version,
                position: facts.last_position,
                event_type: event.event_type.clone(),
                schema_version: event.schema_version,
                data: append.data[i].clone(),
            },
        );
        plan.rows.push(EventRow {
            position: facts.last_position,
            stream: stream.to_owned(),
            category: category.clone(),
            version,
            event_id: event.event_id,
            event_type: event.event_type.clone(),
            schema_version: event.schema_version,
            data: append.data[i].clone(),
            metadata: append.metadata[i].clone(),
            recorded_at,
            hash,
            log_hash: facts.last_log_hash,
        });
    }
    facts.heads.insert(stream.to_owned(), (version, previous));
    (version, positions)
}

/// `Some(first result)` when every event of the append is already stored, as the same
/// events at consecutive versions of the same stream; `EventIdReused` when some id is
/// stored as anything else; `None` when no id is stored.
fn already_stored(
    append: &ValidAppend,
    facts: &LogFacts,
) -> Result<Option<AppendOutcome>, StoreError> {
    let events = &append.request.events;
    let Some(first_found) = events
        .iter()
        .find(|e| facts.stored.contains_key(&e.event_id))
    else {
        return Ok(None);
    };
    let mut positions = Vec::with_capacity(events.len());
    let mut expected_version = None;
    for (i, event) in events.iter().enumerate() {
        let same = facts.stored.get(&event.event_id).filter(|stored| {
            stored.stream == append.request.stream.as_str()
                && expected_version.is_none_or(|v| stored.version == v)
                && stored.event_type == event.event_type
                && stored.schema_version == event.schema_version
                && stored.data == append.data[i]
        });
        match same {
            Some(stored) => {
                expected_version = Some(stored.version + 1);
                positions.push(stored.position);
            }
            None => {
                let event_id = if facts.stored.contains_key(&event.event_id) {
                    event.event_id
                } else {
                    first_found.event_id
                };
                return Err(StoreError::EventIdReused { event_id });
            }
        }
    }
    let version = expected_version.map_or(0, |next| next - 1);
    Ok(Some(AppendOutcome { version, positions }))
}

/// Where a write attempt takes its facts from, cheapest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FactsSource {
    /// The writer's memory of its own commits: no reads at all. If another writer has
    /// appended since, the write finds the log's head row moved (or trips a unique
    /// constraint, as a stale stream version does) and the batch is tried again from the
    /// database.
    Remembered,
    /// Stream heads, claims and the log's head row, read under the lock.
    Read,
    /// All of the above, the stored events that reuse the batch's ids and the stored
    /// idempotency keys it carries.
    ReadWithIds,
}

/// The stream heads and last position this writer committed last, so that appends to
/// streams it wrote recently need no reads before the insert.
#[derive(Debug, Default)]
pub(crate) struct HeadCache {
    heads: HashMap<String, (u64, Hash)>,
    last_position: Option<(u64, Hash)>,
}

/// Streams remembered at most; past it the memory starts afresh.
const HEAD_CACHE_CAPACITY: usize = 100_000;

impl HeadCache {
    /// Facts from memory, when memory covers the whole batch: every stream known, and no
    /// claims (claim holders are always read).
    pub fn facts(&self, batch: &[ValidAppend]) -> Option<LogFacts> {
        let (last_position, last_log_hash) = self.last_position?;
        let mut heads = HashMap::new();
        for append in batch {
            if !append.request.claims.is_empty() {
                return None;
            }
            let stream = append.request.stream.as_str();
            heads.insert(stream.to_owned(), *self.heads.get(stream)?);
        }
        Some(LogFacts {
            heads,
            last_position,
            last_log_hash,
            ..LogFacts::default()
        })
    }

    /// Remembers a committed plan.
    pub fn remember(&mut self, plan: &Plan) {
        if self.heads.len() + plan.heads.len() > HEAD_CACHE_CAPACITY {
            self.heads.clear();
        }
        self.heads
            .extend(plan.heads.iter().map(|(s, head)| (s.clone(), *head)));
        self.last_position = Some((plan.last_position, plan.last_log_hash));
    }

    /// Forgets everything, after any failure whose effect on the log is unknown.
    pub fn forget(&mut self) {
        self.heads.clear();
        self.last_position = None;
    }
}

/// The SQLSTATE with which PostgreSQL's `annals_append` refuses a plan made on stale facts.
const STALE_PLAN_SQLSTATE: &str = "ANS01";

/// What an insert's failure means for the attempt: a unique constraint (or PostgreSQL's
/// stale-plan check) that fired before every fact was read says the facts were stale
/// (`Ok(true)`: roll back, read more).
pub(crate) fn stale_facts(
    insert: Result<(), StoreError>,
    source: FactsSource,
) -> Result<bool, StoreError> {
    match insert {
        Ok(()) => Ok(false),
        Err(error)
            if source != FactsSource::ReadWithIds
                && error.refusal().is_some_and(|e| {
                    e.is_unique_violation() || e.code().as_deref() == Some(STALE_PLAN_SQLSTATE)
                }) =>
        {
            Ok(true)
        }
        Err(error) => Err(error),
    }
}
