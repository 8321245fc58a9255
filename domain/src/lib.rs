//! The business of Annals as plain data and pure functions: value objects, and for each
//! aggregate (lead, account, deal, order, subscription, the lead routing rules, durable
//! timers) its commands, events, state, `decide` and `evolve`, with the rules of
//! `shared/spec/domain.md`.
//!
//! It must stay pure: no IO, no async, no database, no clock, no randomness. Facts from
//! outside (new ids, whether an account exists) arrive inside commands, filled in by the
//! command handler. Every event has a stable type name and a schema version; older
//! versions are upcast before `evolve` ever sees them, so stored events always load.

pub mod account;
pub mod conversion;
pub mod deal;
mod error;
pub mod lead;
pub mod order;
pub mod routing;
pub mod subscription;
pub mod timer;
pub mod values;

use std::fmt::Debug;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use uuid::Uuid;

pub use error::{DomainError, RejectionKind};

/// An aggregate: the state one stream's events build, and the rules its commands meet.
pub trait Aggregate: Default + Clone + Debug + Serialize + DeserializeOwned + Send + Sync {
    type Command: Command;
    type Event: Event;

    /// The stream category: the aggregate with id `x` lives in stream `{CATEGORY}-{x}`,
    /// unless `stream_name` says otherwise.
    const CATEGORY: &'static str;
    /// The schema version of the state as a snapshot; raise it whenever the state's
    /// shape changes, and older snapshots are ignored (rebuilt from events).
    const SNAPSHOT_VERSION: u32;

    /// Decides what a command does to the current state: the events to append, or why
    /// not. Appending nothing is not an outcome: a command either changes something or
    /// is refused.
    fn decide(&self, command: Self::Command) -> Result<Vec<Self::Event>, DomainError>;

    /// The state after one event. Total: every event applies to the state it was
    /// decided on.
    fn evolve(self, event: &Self::Event) -> Self;

    /// The stream of the aggregate with this id: `{CATEGORY}-{id}`, one stream per
    /// aggregate. An aggregate that is one stream for the whole category (the routing
    /// rules) names that stream whatever the id.
    fn stream_name(id: Uuid) -> String {
        format!("{}-{id}", Self::CATEGORY)
    }

    /// The unique keys `event` takes or gives back, decided on the state before it: the
    /// event's own (`Event::claims`), unless only the state knows a key to give back.
    fn claims(&self, event: &Self::Event) -> Vec<ClaimChange> {
        event.claims()
    }

    /// What it means that another stream holds a unique key this aggregate's events
    /// wanted to take (see `Event::claims`).
    fn claim_held(key: &str, _holder_stream: &str) -> DomainError {
        DomainError::KeyTaken(key.to_owned())
    }

    /// The state after a sequence of events.
    fn replay<'a>(self, events: impl IntoIterator<Item = &'a Self::Event>) -> Self
    where
        Self::Event: 'a,
    {
        events.into_iter().fold(self, Self::evolve)
    }
}

/// A command's name, recorded in the metadata of the events it causes.
pub trait Command: Debug + Clone + Send {
    fn name(&self) -> &'static str;
}

/// A unique key an event takes or gives back. The event store holds keys atomically with
/// the events, which is how a rule like "one lead per email" holds under concurrency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimChange {
    Take(String),
    Release(String),
}

/// An event as it is stored: type name, schema version, JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredForm {
    pub event_type: String,
    pub schema_version: u32,
    pub data: Value,
}

/// Why a stored event could not be read back as a domain event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored event {event_type} v{schema_version} cannot be read: {reason}")]
pub struct DecodeError {
    pub event_type: String,
    pub schema_version: u32,
    pub reason: String,
}

/// A domain event: serde data with a stable type name and a schema version.
///
/// Implementations are enums tagged `#[serde(tag = "type", content = "data")]`, whose
/// variant names are the type names; `encode` and `decode` rely on that shape.
pub trait Event: Debug + Clone + PartialEq + Serialize + DeserializeOwned + Send + Sync {
    /// The stable type name (the variant's name).
    fn event_type(&self) -> &'static str;

    /// The current schema version of an event type (1 unless it has changed).
    fn current_version(event_type: &str) -> u32;

    /// Turns the data of `event_type` at `schema_version` into the next version's. Only
    /// called for versions below the current one.
    fn upcast_step(
        event_type: &str,
        schema_version: u32,
        _data: Value,
    ) -> Result<Value, DecodeError> {
        Err(DecodeError {
            event_type: event_type.to_owned(),
            schema_version,
            reason: "no upcaster from this version".into(),
        })
    }

    /// The fields of each event type that hold personal data (`domain.md`, Erasure):
    /// stored sealed under the key of the event's stream, and read as `null` once that
    /// key is destroyed.
    const PERSONAL_FIELDS: &'static [(&'static str, &'static [&'static str])] = &[];

    /// The unique keys this event takes or gives back (none, for most events).
    fn claims(&self) -> Vec<ClaimChange> {
        Vec::new()
    }

    /// Whether this event destroys its stream's data key (an erasure), in its append.
    fn erases_subject(&self) -> bool {
        false
    }

    /// The stored form of the event, at its current schema version.
    fn encode(&self) -> StoredForm {
        let event_type = self.event_type();
        let data = match serde_json::to_value(self) {
            Ok(Value::Object(mut tagged)) => tagged.remove("data"),
            _ => None,
        };
        StoredForm {
            event_type: event_type.to_owned(),
            schema_version: Self::current_version(event_type),
            // Every event is a struct variant, so its data is an object.
            data: data.unwrap_or_else(|| Value::Object(Default::default())),
        }
    }

    /// Reads a stored event, upcasting older schema versions one step at a time.
    fn decode(stored: &StoredForm) -> Result<Self, DecodeError> {
        let current = Self::current_version(&stored.event_type);
        let fail = |reason: String| DecodeError {
            event_type: stored.event_type.clone(),
            schema_version: stored.schema_version,
            reason,
        };
        if stored.schema_version > current {
            return Err(fail(format!("this build knows versions up to {current}")));
        }
        let mut data = stored.data.clone();
        let mut version = stored.schema_version;
        while version < current {
            data = Self::upcast_step(&stored.event_type, version, data)?;
            version += 1;
        }
        let tagged = serde_json::json!({ "type": stored.event_type, "data": data });
        serde_json::from_value(tagged).map_err(|e| fail(e.to_string()))
    }
}
