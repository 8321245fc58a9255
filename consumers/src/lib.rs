//! What follows the log, on the consumer engine (`annals-engine`): the read models
//! (`read_models`: the boards, the account 360 view, recurring revenue, the due
//! timers, and `queries`, what their readers share), the processes (`processes`: the
//! lead conversion, lead routing and the order saga, deciding commands from events),
//! and the durable timers processes wait through (`timers`: scheduling, the clock, the
//! scheduler). Every consumer here is one file; the one list of them all is the
//! registry of the crate that assembles the system (`annals-api`'s `registry`).
//!
//! Invariants: a read model is a pure function of the log (no clock, no randomness), so
//! a rebuild from position 0 gives the same rows, and never appends events; a process
//! acts only through commands whose idempotency keys derive from the causing event, and
//! is never rebuilt.

pub mod processes;
pub mod queries;
pub mod read_models;
pub mod timers;

use annals_engine::ConsumerError;
use annals_store::RecordedEvent;

/// Reads a stored event as a domain event (upcast to its current schema).
pub(crate) fn decode<E: annals_domain::Event>(event: &RecordedEvent) -> Result<E, ConsumerError> {
    E::decode(&annals_domain::StoredForm {
        event_type: event.event_type.clone(),
        schema_version: event.schema_version,
        data: event.data.clone(),
    })
    .map_err(|e| ConsumerError::Apply {
        position: event.position,
        event_type: event.event_type.clone(),
        reason: e.to_string(),
    })
}

/// The aggregate id of an event's stream (`lead-42` → `42`).
pub(crate) fn aggregate_id(event: &RecordedEvent) -> String {
    event
        .stream
        .split_once('-')
        .map_or(event.stream.as_str(), |(_, id)| id)
        .to_owned()
}

/// The time of an event as read models store it: RFC 3339 UTC with microseconds, which
/// sorts as text.
pub(crate) fn time_text(event: &RecordedEvent) -> String {
    event
        .recorded_at
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}
