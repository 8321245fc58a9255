//! The lead routing process (`domain.md`, Lead routing): a lead that qualifies without an
//! owner is routed by the first rule that matches it, round-robin within the rule's pool
//! (`LeadRouted` in the `routing` stream, then the lead's `LeadAssigned`), and a timer is
//! set for the response deadline; when it fires and the owner has not acted on the lead
//! (acting is recording a signal as that owner, disqualifying or converting), the lead is
//! reassigned to the pool's next owner (`LeadRouted` with reason `response-deadline`) and
//! the next deadline is set. A lead an operator assigned by hand is never routed again.
//!
//! Exactly-once effect: every command carries an idempotency key derived from the event
//! it answers (the qualification, or the fired timer), and each deadline's timer is keyed
//! by that event too, so acting on one event twice routes, assigns and schedules once.
//! The round-robin cursor is the `routing` stream's state, so a replay of the log gives
//! the same owners.

use std::sync::Arc;

use annals_commands::{CommandError, CommandHandler, Handlers};
use annals_domain::DomainError;
use annals_domain::lead::{Lead, LeadCommand, LeadEvent};
use annals_domain::routing::{
    ROUTING_ID, Response, Routing, RoutingCommand, RoutingEvent, response,
};
use annals_domain::timer::Timer;
use annals_domain::values::{Owner, RuleName};
use annals_domain::{Aggregate, DecodeError, Event, StoredForm};
use annals_store::{Direction, EventStore, LogFilter, RecordedEvent, StreamName};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Process;
use crate::lead_conversion::caused_by;
use crate::timers::{fired_for, schedule};

/// The process's name: its checkpoint's key and, as `process:lead_routing`, the actor of
/// its commands.
pub const NAME: &str = "lead_routing";

/// The actor of the process's commands: an assignment by anyone else is by hand.
pub const ROUTER: &str = "process:lead_routing";

/// What a deadline's timer hands back: the routing it checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Deadline {
    lead_id: Uuid,
    rule: RuleName,
    owner: Owner,
}

#[derive(Debug)]
pub struct LeadRouting {
    store: Arc<dyn EventStore>,
    leads: Arc<CommandHandler<Lead>>,
    routing: Arc<CommandHandler<Routing>>,
    timers: Arc<CommandHandler<Timer>>,
    /// How long an owner has to act on a routed lead.
    deadline: chrono::Duration,
}

impl LeadRouting {
    pub fn new(
        store: Arc<dyn EventStore>,
        handlers: &Handlers,
        deadline: chrono::Duration,
    ) -> Self {
        LeadRouting {
            store,
            leads: handlers.of::<Lead>(),
            routing: handlers.of::<Routing>(),
            timers: handlers.of::<Timer>(),
            deadline,
        }
    }

    /// Routes a lead that qualified (`event`), when it has no owner and is open.
    async fn qualified(&self, event: &RecordedEvent) -> Result<(), CommandError> {
        let LeadEvent::LeadQualified { score } = decode::<LeadEvent>(event)? else {
            return Ok(());
        };
        let lead_id = lead_of(event)?;
        let (lead, version, _) = self.lead(lead_id).await?;
        let (Some(source), Some(email)) = (lead.source, &lead.email) else {
            return Ok(());
        };
        if lead.owner.is_some() || !lead.status.is_open() {
            return Ok(());
        }
        let email_domain = email
            .as_str()
            .rsplit_once('@')
            .map_or("", |(_, domain)| domain)
            .to_owned();
        let route = RoutingCommand::Route {
            lead_id,
            source,
            score,
            email_domain,
        };
        self.route(event, route, version).await
    }

    /// Checks a routed lead at its deadline: reassigned when its owner has not acted.
    async fn deadline(
        &self,
        event: &RecordedEvent,
        deadline: Deadline,
    ) -> Result<(), CommandError> {
        let (lead, version, history) = self.lead(deadline.lead_id).await?;
        if lead.owner.as_ref() != Some(&deadline.owner) {
            // Assigned to someone else since: by hand, or by an earlier deadline.
            return Ok(());
        }
        // The events since the lead was last routed to this owner.
        let routed_at = history.iter().rposition(|(actor, event)| {
            actor == ROUTER
                && matches!(event, LeadEvent::LeadAssigned { owner, .. } if *owner == deadline.owner)
        });
        let Some(routed_at) = routed_at else {
            return Ok(());
        };
        let since = history[routed_at + 1..]
            .iter()
            .map(|(actor, event)| (actor.as_str(), event));
        if response(deadline.owner.as_str(), ROUTER, since) != Response::Waiting {
            return Ok(());
        }
        let reassign = RoutingCommand::Reassign {
            lead_id: deadline.lead_id,
            rule: deadline.rule,
            current_owner: deadline.owner,
        };
        self.route(event, reassign, version).await
    }

    /// Records the routing `command` decides in reply to `cause`, sets the new owner's
    /// deadline, then assigns the lead to them, if it is still at `seen`, the version the
    /// decision was made on (else the event is acted on again, and decides anew). In that
    /// order, so that acting again after a failure anywhere finishes the step: until the
    /// assignment the lead looks as it did, and routing and scheduling again are the
    /// same decisions (their keys derive from `cause`).
    async fn route(
        &self,
        cause: &RecordedEvent,
        command: RoutingCommand,
        seen: u64,
    ) -> Result<(), CommandError> {
        let outcome = match self
            .routing
            .execute(ROUTING_ID, command, &caused_by(NAME, cause, "route"))
            .await
        {
            Ok(outcome) => outcome,
            // No rule takes the lead, or its pool has no one else: nothing to do.
            Err(CommandError::Domain(
                DomainError::NoRoutingRuleMatches | DomainError::NoOtherOwner { .. },
            )) => return Ok(()),
            Err(error) => return Err(error),
        };
        // The routing this command recorded (the first try's, when this is a retry).
        let stream =
            StreamName::parse(Routing::stream_name(ROUTING_ID)).map_err(CommandError::Store)?;
        let routed = self
            .store
            .read_stream(&stream, outcome.version, Direction::Forwards, 1)
            .await?;
        let Some(routed) = routed.first() else {
            return Ok(());
        };
        let RoutingEvent::LeadRouted {
            lead_id,
            rule,
            owner,
            ..
        } = decode::<RoutingEvent>(routed)?
        else {
            return Ok(());
        };
        let payload = Deadline {
            lead_id,
            rule,
            owner: owner.clone(),
        };
        let payload = serde_json::to_value(&payload)
            .map_err(|e| undecodable(routed, format!("the deadline's payload: {e}")))?;
        schedule(
            &self.timers,
            NAME,
            &cause.event_id.to_string(),
            routed.recorded_at + self.deadline,
            payload,
            &caused_by(NAME, cause, "deadline"),
        )
        .await?;
        let mut context = caused_by(NAME, cause, "assign");
        // Never over an assignment made meanwhile (by hand): a VersionMismatch is acted
        // on again, and the lead then looks assigned.
        context.expected_version = Some(seen);
        match self
            .leads
            .execute(lead_id, LeadCommand::Assign { owner }, &context)
            .await
        {
            // Closed since it was read: nobody to wait for (its deadline finds it so).
            Ok(_) | Err(CommandError::Domain(DomainError::LeadClosed { .. })) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// The lead as the store has it now (never a cache: another server may have changed
    /// it), its version, and its events with the actor of each.
    async fn lead(
        &self,
        lead_id: Uuid,
    ) -> Result<(Lead, u64, Vec<(String, LeadEvent)>), CommandError> {
        let history = self.history(lead_id).await?;
        let lead = Lead::default().replay(history.iter().map(|(_, event)| event));
        Ok((lead, history.len() as u64, history))
    }

    /// The lead's events, each with the actor that recorded it, in order.
    async fn history(&self, lead_id: Uuid) -> Result<Vec<(String, LeadEvent)>, CommandError> {
        const PAGE: usize = 1_000;
        let stream = CommandHandler::<Lead>::stream(lead_id)?;
        let mut history = Vec::new();
        let mut from = 1;
        loop {
            let page = self
                .store
                .read_stream(&stream, from, Direction::Forwards, PAGE)
                .await?;
            for recorded in &page {
                let actor = recorded.metadata.actor.clone().unwrap_or_default();
                history.push((actor, decode::<LeadEvent>(recorded)?));
            }
            match page.last() {
                Some(last) if page.len() == PAGE => from = last.version + 1,
                _ => return Ok(history),
            }
        }
    }
}

fn decode<E: Event>(recorded: &RecordedEvent) -> Result<E, CommandError> {
    Ok(E::decode(&StoredForm {
        event_type: recorded.event_type.clone(),
        schema_version: recorded.schema_version,
        data: recorded.data.clone(),
    })?)
}

/// An event this process cannot read: its own failure, which parks it.
fn undecodable(recorded: &RecordedEvent, reason: String) -> CommandError {
    CommandError::Decode(DecodeError {
        event_type: recorded.event_type.clone(),
        schema_version: recorded.schema_version,
        reason,
    })
}

/// The lead whose stream `event` is in.
fn lead_of(event: &RecordedEvent) -> Result<Uuid, CommandError> {
    let id = crate::aggregate_id(event);
    Uuid::parse_str(&id).map_err(|_| CommandError::InvalidId(id))
}

#[async_trait]
impl Process for LeadRouting {
    fn name(&self) -> &'static str {
        NAME
    }

    fn filter(&self) -> LogFilter {
        LogFilter::event_types(["LeadQualified", "TimerFired"])
    }

    async fn handle(&self, event: &RecordedEvent) -> Result<(), CommandError> {
        if event.event_type == "LeadQualified" {
            return self.qualified(event).await;
        }
        let Some(payload) = fired_for(NAME, event)? else {
            return Ok(());
        };
        let deadline: Deadline = serde_json::from_value(payload)
            .map_err(|e| undecodable(event, format!("the deadline's payload: {e}")))?;
        self.deadline(event, deadline).await
    }
}
