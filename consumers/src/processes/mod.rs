//! The processes: each decides commands from the events it follows, through the
//! command handlers, and may wait for time through durable timers (`crate::timers`).
//! Each is one file; this module holds what they share: the context of a command sent
//! in reply to an event, how a command's failure is sorted for the engine, and the
//! settings a deployment gives them.
//!
//! Invariant: every command a process sends carries an idempotency key derived from the
//! causing event's id and the step (`caused_by`), so acting on an event again (after a
//! crash, by a straggler) has the effect of acting once.

pub mod lead_conversion;
pub mod lead_routing;
pub mod order_saga;

use annals_commands::{CommandContext, CommandError};
use annals_engine::ActionError;
use annals_store::{RecordedEvent, StoreError};

/// How the processes behave, as a deployment sets them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSettings {
    /// How long a routed lead's owner has to act on it before it goes to the pool's next
    /// owner (24 hours unless set).
    pub lead_response_deadline: chrono::Duration,
    /// How long a customer has to pay an invoice before the order process cancels the
    /// order (7 days unless set).
    pub payment_timeout: chrono::Duration,
}

impl Default for ProcessSettings {
    fn default() -> Self {
        ProcessSettings {
            lead_response_deadline: chrono::Duration::hours(24),
            payment_timeout: chrono::Duration::days(7),
        }
    }
}

/// The actor of a process's commands (`process:lead_routing`).
pub(crate) fn actor(process: &str) -> String {
    format!("process:{process}")
}

/// The context of a command the process sends in reply to `recorded`, for its `step`:
/// the causing event's correlation, and a key derived from its id.
pub(crate) fn caused_by(process: &str, recorded: &RecordedEvent, step: &str) -> CommandContext {
    CommandContext {
        actor: actor(process),
        correlation_id: recorded.metadata.correlation_id.clone(),
        causation_id: Some(recorded.event_id.to_string()),
        expected_version: None,
        idempotency_key: Some(format!("{}/{step}", recorded.event_id)),
        request_hash: Some(format!("{}/{step}", recorded.event_id)),
        deadline: None,
    }
}

/// A process's failed command, as the engine sorts it: the business's, the handler's or
/// the store's refusal is the event's own (parked after its attempts); the store
/// failing, other writers (also past a version the process read), or the same command
/// in flight elsewhere (or a deadline passed before the append) are not now: acting
/// again decides anew.
pub fn action_error(error: CommandError) -> ActionError {
    let refused = match &error {
        CommandError::Store(error) => {
            matches!(error, StoreError::InvalidInput(_)) || error.is_refusal()
        }
        error => !matches!(
            error,
            CommandError::ConcurrencyConflict { .. }
                | CommandError::VersionMismatch { .. }
                | CommandError::IdempotencyKeyInUse
                | CommandError::TimedOut
        ),
    };
    if refused {
        ActionError::refused(error)
    } else {
        ActionError::not_now(error)
    }
}

#[cfg(test)]
mod tests {
    use annals_commands::CommandError;
    use annals_domain::DomainError;
    use annals_engine::ActionError;
    use annals_store::{InvalidInput, StoreError};

    use super::{action_error, actor, lead_routing};

    /// The lead response board tells the router's assignments by their actor.
    #[test]
    fn the_routing_process_acts_as_the_router_the_domain_names() {
        assert_eq!(actor(lead_routing::NAME), annals_domain::routing::ROUTER);
    }

    #[test]
    fn the_business_refusing_parks_and_an_outage_or_a_lost_race_is_retried() {
        let refused = |error| matches!(action_error(error), ActionError::Refused(_));
        assert!(refused(CommandError::Domain(DomainError::LeadClosed {
            status: "disqualified"
        })));
        assert!(refused(CommandError::Store(StoreError::InvalidInput(
            InvalidInput::EmptyAppend
        ))));
        assert!(!refused(CommandError::Store(StoreError::Closed)));
        assert!(!refused(CommandError::IdempotencyKeyInUse));
        assert!(!refused(CommandError::ConcurrencyConflict { attempts: 3 }));
        assert!(!refused(CommandError::TimedOut));
    }
}
