//! The lead routing process (`domain.md`, Lead routing): a lead that qualifies without an
//! owner is routed by the first rule that matches it, round-robin within the rule's pool,
//! and when its response deadline passes and the owner has not acted on it (acting is
//! recording a signal as that owner, disqualifying or converting), it is reassigned to
//! the pool's next owner (reason `response-deadline`). A lead an operator assigned by
//! hand is never routed again.
//!
//! A routing goes in three steps, each recognised from the store when the event that
//! called for it is acted on again (after a crash, and whatever the age of the keys):
//! 1. the decision (`Route`/`Reassign`, decided on the routing's state) is made durable
//!    as the owner's response deadline, a timer keyed by the causing event that carries
//!    the decision (found by its id on a retry, and then reused);
//! 2. it is applied: the lead is assigned to that owner at the version the process read
//!    it at (an assignment by hand meanwhile wins; the event is acted on again, finds the
//!    lead no longer calling for a routing, and withdraws the decision: its timer is
//!    cancelled) — recognised by the lead's `LeadAssigned` by this process caused by the
//!    event;
//! 3. only then it is recorded (`LeadRouted` in the `routing` stream, which the cursor and
//!    speed to lead count), unless the routing stream already holds the record caused by
//!    the event (looked for among the events since the assignment, and appended at the
//!    stream's version that search saw).
//!
//! So a decision that is never applied leaves no trace that read models or the cursor
//! count, and one that is applied is recorded once. The round-robin cursor is the
//! `routing` stream's state, so a replay of the log gives the same owners.

use std::sync::Arc;

use annals_commands::{CommandError, CommandHandler, Handlers};
use annals_domain::DomainError;
use annals_domain::lead::{Lead, LeadCommand, LeadEvent};
use annals_domain::routing::{
    ROUTER, ROUTING_ID, Response, Routing, RoutingCommand, RoutingEvent, response,
};
use annals_domain::timer::{Timer, TimerCommand, TimerStatus, timer_id};
use annals_domain::values::{Owner, RoutingReason, RuleName};
use annals_domain::{Aggregate, DecodeError, Event, StoredForm};
use annals_store::{Direction, EventStore, LogFilter, RecordedEvent, StreamName};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{action_error, caused_by};
use crate::timers::{Clock, fired_for, schedule};
use annals_engine::{ActionError, Process};

/// The process's name: its checkpoint's key and, as `process:lead_routing`, the actor of
/// its commands.
pub const NAME: &str = "lead_routing";

/// A routing decided, as its deadline's timer keeps it and hands it back: the lead, the
/// rule and the owner it goes to, and (for a reassignment) the owner it leaves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Decision {
    lead_id: Uuid,
    rule: RuleName,
    owner: Owner,
    /// Absent in the timers of an older build, which set them only once recorded.
    #[serde(default)]
    previous_owner: Option<Owner>,
    #[serde(default = "qualified")]
    reason: RoutingReason,
}

fn qualified() -> RoutingReason {
    RoutingReason::Qualified
}

/// One event of a lead's stream, with what the process reads of its envelope.
#[derive(Debug)]
struct Step {
    actor: String,
    causation: Option<String>,
    position: u64,
    event: LeadEvent,
}

#[derive(Debug)]
pub struct LeadRouting {
    store: Arc<dyn EventStore>,
    leads: Arc<CommandHandler<Lead>>,
    routing: Arc<CommandHandler<Routing>>,
    timers: Arc<CommandHandler<Timer>>,
    /// How long an owner has to act on a routed lead.
    deadline: chrono::Duration,
    /// When a routing is decided (its deadline runs from then).
    clock: Arc<dyn Clock>,
}

impl LeadRouting {
    pub fn new(
        store: Arc<dyn EventStore>,
        handlers: &Handlers,
        deadline: chrono::Duration,
        clock: Arc<dyn Clock>,
    ) -> Self {
        LeadRouting {
            store,
            leads: handlers.of::<Lead>(),
            routing: handlers.of::<Routing>(),
            timers: handlers.of::<Timer>(),
            deadline,
            clock,
        }
    }

    /// Routes a lead that qualified (`event`), when it has no owner and is open.
    async fn qualified(&self, event: &RecordedEvent) -> Result<(), CommandError> {
        let LeadEvent::LeadQualified { score } = decode::<LeadEvent>(event)? else {
            return Ok(());
        };
        let lead_id = lead_of(event)?;
        self.route(event, lead_id, |lead, _| {
            let (Some(source), Some(email)) = (lead.source, &lead.email) else {
                return None;
            };
            if lead.owner.is_some() || !lead.status.is_open() {
                return None;
            }
            let email_domain = email
                .as_str()
                .rsplit_once('@')
                .map_or("", |(_, domain)| domain)
                .to_owned();
            Some(RoutingCommand::Route {
                lead_id,
                source,
                score,
                email_domain,
            })
        })
        .await
    }

    /// Checks a routed lead at its deadline: reassigned when its owner has not acted.
    async fn deadline(&self, event: &RecordedEvent, routed: Decision) -> Result<(), CommandError> {
        self.route(event, routed.lead_id, |lead, history| {
            if lead.owner.as_ref() != Some(&routed.owner) {
                // Assigned to someone else since: by hand, or by an earlier deadline.
                return None;
            }
            // The events since the lead was last routed to this owner.
            let routed_at = history.iter().rposition(|step| {
                step.actor == ROUTER
                    && matches!(&step.event, LeadEvent::LeadAssigned { owner, .. } if *owner == routed.owner)
            })?;
            let since = history[routed_at + 1..]
                .iter()
                .map(|step| (step.actor.as_str(), &step.event));
            (response(routed.owner.as_str(), ROUTER, since) == Response::Waiting).then(|| {
                RoutingCommand::Reassign {
                    lead_id: routed.lead_id,
                    rule: routed.rule.clone(),
                    current_owner: routed.owner.clone(),
                }
            })
        })
        .await
    }

    /// Carries out the routing that `cause` calls for: `calls` says, from the lead as it
    /// is now (and its events), which routing command it calls for, if any. Each step
    /// done already for `cause` is recognised from the store and not done again (see the
    /// module's docs).
    async fn route(
        &self,
        cause: &RecordedEvent,
        lead_id: Uuid,
        calls: impl FnOnce(&Lead, &[Step]) -> Option<RoutingCommand>,
    ) -> Result<(), CommandError> {
        let decision_id = timer_id(NAME, &cause.event_id.to_string());
        let cause_id = cause.event_id.to_string();
        let (lead, version, history) = self.lead(lead_id).await?;
        let decided = self.decision(decision_id).await?;
        // Applied already: the lead holds this process's assignment caused by `cause`.
        let applied = history.iter().rev().find(|step| {
            step.actor == ROUTER
                && step.causation.as_deref() == Some(cause_id.as_str())
                && matches!(step.event, LeadEvent::LeadAssigned { .. })
        });
        if let Some(assignment) = applied {
            let mut decision = decided.ok_or_else(|| {
                undecodable(cause, "the routing applied has no decision".to_owned())
            })?;
            // What is recorded is what was applied.
            if let LeadEvent::LeadAssigned {
                owner,
                previous_owner,
            } = &assignment.event
            {
                decision.owner = owner.clone();
                decision.previous_owner = previous_owner.clone();
            }
            return self.record(cause, &decision, assignment.position).await;
        }
        let Some(command) = calls(&lead, &history) else {
            // Never to be applied: a decision made for it is withdrawn.
            return self.withdraw(cause, decision_id).await;
        };
        let decision = match decided {
            Some(decision) => decision,
            None => match self.decide(cause, command).await? {
                Some(decision) => decision,
                // No rule takes the lead, or its pool has no one else: nothing to do.
                None => return Ok(()),
            },
        };
        let mut context = caused_by(NAME, cause, "assign");
        // Never over an assignment made meanwhile (by hand): a VersionMismatch is acted
        // on again, and the lead then no longer calls for the routing.
        context.expected_version = Some(version);
        let assign = LeadCommand::Assign {
            owner: decision.owner.clone(),
        };
        let assigned = match self.leads.execute(lead_id, assign, &context).await {
            Ok(outcome) => outcome,
            // Closed since it was read: nobody to route it to.
            Err(CommandError::Domain(DomainError::LeadClosed { .. })) => {
                return self.withdraw(cause, decision_id).await;
            }
            Err(error) => return Err(error),
        };
        self.record(cause, &decision, assigned.position).await
    }

    /// Decides the routing `command` asks for on the routing as stored now, and makes
    /// the decision durable: the new owner's deadline, a timer keyed by `cause` that
    /// carries it. `None` when no rule takes the lead or its pool has no one else.
    async fn decide(
        &self,
        cause: &RecordedEvent,
        command: RoutingCommand,
    ) -> Result<Option<Decision>, CommandError> {
        let routing = self.routing.current(ROUTING_ID).await?.state;
        let events = match routing.decide(command) {
            Ok(events) => events,
            Err(DomainError::NoRoutingRuleMatches | DomainError::NoOtherOwner { .. }) => {
                return Ok(None);
            }
            Err(refusal) => return Err(refusal.into()),
        };
        let Some(RoutingEvent::LeadRouted {
            lead_id,
            rule,
            owner,
            previous_owner,
            reason,
        }) = events.into_iter().next()
        else {
            return Ok(None);
        };
        let decision = Decision {
            lead_id,
            rule,
            owner,
            previous_owner,
            reason,
        };
        let payload = serde_json::to_value(&decision)
            .map_err(|e| undecodable(cause, format!("the deadline's payload: {e}")))?;
        let timer = schedule(
            &self.timers,
            NAME,
            &cause.event_id.to_string(),
            self.clock.now() + self.deadline,
            payload,
            &caused_by(NAME, cause, "deadline"),
        )
        .await?;
        // An attempt beside this one (a stalled server waking) may have made the
        // decision first, on another routing state: the timer's is the one applied.
        Ok(self.decision(timer).await?.or(Some(decision)))
    }

    /// The decision made for a cause: the payload of its deadline's timer, once
    /// scheduled (whether it fired or was withdrawn since).
    async fn decision(&self, timer: Uuid) -> Result<Option<Decision>, CommandError> {
        let timer = self.timers.current(timer).await?.state;
        if timer.status == TimerStatus::Absent {
            return Ok(None);
        }
        Ok(serde_json::from_value(timer.payload).ok())
    }

    /// Withdraws a decision that will never be applied: its deadline is cancelled.
    async fn withdraw(&self, cause: &RecordedEvent, timer: Uuid) -> Result<(), CommandError> {
        match self
            .timers
            .execute(
                timer,
                TimerCommand::Cancel {},
                &caused_by(NAME, cause, "withdraw"),
            )
            .await
        {
            Ok(_)
            | Err(CommandError::Domain(
                DomainError::TimerClosed { .. } | DomainError::TimerNotFound,
            )) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Records an applied routing (`LeadRouted`), unless the routing stream holds it
    /// already: one caused by `cause` after `assigned_at`, the assignment's position (the
    /// record always follows it). Appended at the stream's version that search saw, so
    /// two attempts at once record it once.
    async fn record(
        &self,
        cause: &RecordedEvent,
        decision: &Decision,
        assigned_at: u64,
    ) -> Result<(), CommandError> {
        const PAGE: usize = 100;
        let stream =
            StreamName::parse(Routing::stream_name(ROUTING_ID)).map_err(CommandError::Store)?;
        let cause_id = cause.event_id.to_string();
        let mut version = None;
        let mut from = u64::MAX;
        'search: loop {
            let page = self
                .store
                .read_stream(&stream, from, Direction::Backwards, PAGE)
                .await?;
            for event in &page {
                version.get_or_insert(event.version);
                if event.position < assigned_at {
                    break 'search;
                }
                if event.metadata.causation_id.as_deref() == Some(cause_id.as_str())
                    && event.event_type == "LeadRouted"
                {
                    return Ok(());
                }
            }
            match page.last() {
                Some(last) if page.len() == PAGE && last.version > 1 => from = last.version - 1,
                _ => break,
            }
        }
        let record = RoutingCommand::Record {
            lead_id: decision.lead_id,
            rule: decision.rule.clone(),
            owner: decision.owner.clone(),
            previous_owner: decision.previous_owner.clone(),
            reason: decision.reason,
        };
        let mut context = caused_by(NAME, cause, "route");
        context.expected_version = Some(version.unwrap_or(0));
        self.routing
            .execute(ROUTING_ID, record, &context)
            .await
            .map(|_| ())
    }

    /// The lead as the store has it now (never a cache: another server may have changed
    /// it), its version, and its events with what the process reads of their envelopes.
    async fn lead(&self, lead_id: Uuid) -> Result<(Lead, u64, Vec<Step>), CommandError> {
        let history = self.history(lead_id).await?;
        let lead = Lead::default().replay(history.iter().map(|step| &step.event));
        Ok((lead, history.len() as u64, history))
    }

    /// The lead's events, in order.
    async fn history(&self, lead_id: Uuid) -> Result<Vec<Step>, CommandError> {
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
                history.push(Step {
                    actor: recorded.metadata.actor.clone().unwrap_or_default(),
                    causation: recorded.metadata.causation_id.clone(),
                    position: recorded.position,
                    event: decode::<LeadEvent>(recorded)?,
                });
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

impl LeadRouting {
    /// Acts on one event it follows.
    async fn act(&self, event: &RecordedEvent) -> Result<(), CommandError> {
        if event.event_type == "LeadQualified" {
            return self.qualified(event).await;
        }
        let Some(payload) = fired_for(NAME, event)? else {
            return Ok(());
        };
        let routed: Decision = serde_json::from_value(payload)
            .map_err(|e| undecodable(event, format!("the deadline's payload: {e}")))?;
        self.deadline(event, routed).await
    }
}

#[async_trait]
impl Process for LeadRouting {
    fn name(&self) -> &'static str {
        NAME
    }

    fn filter(&self) -> LogFilter {
        LogFilter::event_types(["LeadQualified", "TimerFired"])
    }

    async fn handle(&self, event: &RecordedEvent) -> Result<(), ActionError> {
        self.act(event).await.map_err(action_error)
    }
}
