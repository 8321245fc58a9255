//! Lead routing (`domain.md`, Lead routing): the operators' ordered rules, each a match
//! and a pool of owners, and the owner each routed lead gets. One stream for all of it,
//! named `routing`.
//!
//! Invariants: a set of rules holds at most 100 rules with unique names, each with 1–50
//! owners, none twice; a lead goes to the first rule that matches it, and within that
//! rule round-robin: the rule's cursor counts the leads it routed as qualified, and is
//! rebuilt from the `LeadRouted` events, so a replay gives the same owners. Cursors
//! outlive a new set of rules. The stream keeps no state per lead: whether a lead's owner
//! acted on it is read from the lead's own events (`response`).
//!
//! A routing is decided (`Route`, `Reassign`: pure, on the state the process read),
//! applied to the lead (its `LeadAssigned`), and only then recorded (`Record`, the
//! `LeadRouted` the cursor counts): a decision that is never applied leaves no trace.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::lead::LeadEvent;
use crate::values::{DomainPattern, Owner, RoutingReason, RuleName, Source};
use crate::{Aggregate, Command, DomainError, Event};

/// The id the command handler is called with for the one `routing` stream.
pub const ROUTING_ID: Uuid = Uuid::nil();

/// The actor of the router's commands (the lead routing process): an assignment by
/// anyone else is by hand, and the routing answers for nothing after it.
pub const ROUTER: &str = "process:lead_routing";

/// Which leads a rule takes. Every criterion given must hold; none given matches every
/// lead. A list given is never empty (`RoutingRules::new` refuses one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleMatch {
    /// The lead's source is one of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<Vec<Source>>,
    /// The lead's score is at least this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_score: Option<u32>,
    /// The domain of the lead's email matches one of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_domains: Option<Vec<DomainPattern>>,
}

impl RuleMatch {
    /// Whether a lead from `source`, at `score`, with an email at `email_domain` meets
    /// every criterion given.
    pub fn admits(&self, source: Source, score: u32, email_domain: &str) -> bool {
        self.sources
            .as_ref()
            .is_none_or(|sources| sources.contains(&source))
            && self.min_score.is_none_or(|min| score >= min)
            && self
                .email_domains
                .as_ref()
                .is_none_or(|patterns| patterns.iter().any(|pattern| pattern.matches(email_domain)))
    }
}

/// One routing rule: the leads it takes, and the pool of owners it hands them to in turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingRule {
    pub name: RuleName,
    #[serde(rename = "match")]
    pub matches: RuleMatch,
    /// 1–50 owners, none twice, in the order the round-robin follows.
    pub owners: Vec<Owner>,
}

impl RoutingRule {
    /// The most owners a rule's pool holds.
    pub const MAX_OWNERS: usize = 50;

    /// The owner whose turn it is after the rule routed `cursor` leads.
    fn owner_at(&self, cursor: u64) -> Option<&Owner> {
        let len = u64::try_from(self.owners.len())
            .ok()
            .filter(|len| *len > 0)?;
        let turn = usize::try_from(cursor % len).ok()?;
        self.owners.get(turn)
    }

    /// The owner after `current` in the pool, cyclically; the pool's first owner when
    /// `current` is no longer in it.
    fn owner_after(&self, current: &Owner) -> Option<&Owner> {
        match self.owners.iter().position(|owner| owner == current) {
            Some(at) => self.owners.get((at + 1) % self.owners.len()),
            None => self.owners.first(),
        }
    }
}

/// The ordered routing rules, valid as a whole (see `new`). Empty, routing is off.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RoutingRules(Vec<RoutingRule>);

impl RoutingRules {
    /// The most rules a set holds.
    pub const MAX_RULES: usize = 100;

    /// A set of rules, refused (invalid) when it holds more than 100 rules, two rules of
    /// the same name, a rule with no owner or more than 50, an owner twice in one pool,
    /// or a match list given empty.
    pub fn new(rules: Vec<RoutingRule>) -> Result<Self, DomainError> {
        if rules.len() > Self::MAX_RULES {
            return Err(DomainError::InvalidCount {
                field: "rules",
                min: 0,
                max: Self::MAX_RULES,
            });
        }
        for (at, rule) in rules.iter().enumerate() {
            if rules[..at].iter().any(|earlier| earlier.name == rule.name) {
                return Err(DomainError::Duplicate {
                    field: "rule name",
                    value: rule.name.to_string(),
                });
            }
            if rule.owners.is_empty() || rule.owners.len() > RoutingRule::MAX_OWNERS {
                return Err(DomainError::InvalidCount {
                    field: "owners",
                    min: 1,
                    max: RoutingRule::MAX_OWNERS,
                });
            }
            for (at, owner) in rule.owners.iter().enumerate() {
                if rule.owners[..at].contains(owner) {
                    return Err(DomainError::Duplicate {
                        field: "owners",
                        value: owner.to_string(),
                    });
                }
            }
            if rule.matches.sources.as_ref().is_some_and(Vec::is_empty) {
                return Err(DomainError::EmptyList {
                    field: "match.sources",
                });
            }
            if rule
                .matches
                .email_domains
                .as_ref()
                .is_some_and(Vec::is_empty)
            {
                return Err(DomainError::EmptyList {
                    field: "match.email_domains",
                });
            }
        }
        Ok(RoutingRules(rules))
    }

    /// The rules, in their order.
    pub fn as_slice(&self) -> &[RoutingRule] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The rule of this name.
    pub fn get(&self, name: &RuleName) -> Option<&RoutingRule> {
        self.0.iter().find(|rule| rule.name == *name)
    }

    /// The first rule that takes a lead from `source`, at `score`, at `email_domain`.
    pub fn first_admitting(
        &self,
        source: Source,
        score: u32,
        email_domain: &str,
    ) -> Option<&RoutingRule> {
        self.0
            .iter()
            .find(|rule| rule.matches.admits(source, score, email_domain))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum RoutingCommand {
    /// Replaces the rules; an empty list turns routing off.
    SetRules { rules: RoutingRules },
    /// Routes a lead that qualified without an owner; the handler fills in the lead's
    /// facts.
    Route {
        lead_id: Uuid,
        source: Source,
        score: u32,
        /// The domain part of the lead's email.
        email_domain: String,
    },
    /// Hands a routed lead whose owner did not act within the response deadline to the
    /// next owner of the rule that routed it.
    Reassign {
        lead_id: Uuid,
        rule: RuleName,
        current_owner: Owner,
    },
    /// Records a routing the process decided (with `Route` or `Reassign`, on the state it
    /// read) and then applied: the lead was assigned to `owner`. Recorded only once
    /// applied, so a decision that lost to an assignment by hand leaves no trace, and the
    /// cursor counts only leads that were routed.
    Record {
        lead_id: Uuid,
        rule: RuleName,
        owner: Owner,
        previous_owner: Option<Owner>,
        reason: RoutingReason,
    },
}

impl Command for RoutingCommand {
    fn name(&self) -> &'static str {
        match self {
            RoutingCommand::SetRules { .. } => "SetRoutingRules",
            RoutingCommand::Route { .. } => "RouteLead",
            RoutingCommand::Reassign { .. } => "ReassignLead",
            RoutingCommand::Record { .. } => "RecordRouting",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum RoutingEvent {
    RoutingRulesSet {
        rules: RoutingRules,
    },
    /// Recorded beside the lead's own `LeadAssigned`, which the routing process asks for.
    LeadRouted {
        lead_id: Uuid,
        rule: RuleName,
        owner: Owner,
        previous_owner: Option<Owner>,
        reason: RoutingReason,
    },
}

impl Event for RoutingEvent {
    fn event_type(&self) -> &'static str {
        match self {
            RoutingEvent::RoutingRulesSet { .. } => "RoutingRulesSet",
            RoutingEvent::LeadRouted { .. } => "LeadRouted",
        }
    }

    fn current_version(_event_type: &str) -> u32 {
        1
    }
}

/// The routing rules and their round-robin cursors, as the `routing` stream's events left
/// them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Routing {
    pub rules: RoutingRules,
    /// Per rule name: how many leads the rule routed as qualified. The rule's next owner
    /// is `owners[cursor % owners.len()]`. Kept when the rules are set again, so a rule
    /// that stays (or comes back) goes on where it was.
    pub cursors: BTreeMap<String, u64>,
}

impl Routing {
    /// How many leads the rule of this name routed as qualified.
    pub fn cursor(&self, rule: &RuleName) -> u64 {
        self.cursors.get(rule.as_str()).copied().unwrap_or(0)
    }
}

impl Aggregate for Routing {
    type Command = RoutingCommand;
    type Event = RoutingEvent;
    const CATEGORY: &'static str = "routing";
    const SNAPSHOT_VERSION: u32 = 1;

    /// One stream holds the rules of every lead: `routing`, whatever the id.
    fn stream_name(_id: Uuid) -> String {
        Self::CATEGORY.to_owned()
    }

    fn decide(&self, command: RoutingCommand) -> Result<Vec<RoutingEvent>, DomainError> {
        match command {
            RoutingCommand::SetRules { rules } => {
                if rules == self.rules {
                    return Err(DomainError::RoutingRulesUnchanged);
                }
                Ok(vec![RoutingEvent::RoutingRulesSet { rules }])
            }
            RoutingCommand::Route {
                lead_id,
                source,
                score,
                email_domain,
            } => {
                let (rule, owner) = self
                    .rules
                    .first_admitting(source, score, &email_domain)
                    .and_then(|rule| Some((rule, rule.owner_at(self.cursor(&rule.name))?)))
                    .ok_or(DomainError::NoRoutingRuleMatches)?;
                Ok(vec![RoutingEvent::LeadRouted {
                    lead_id,
                    rule: rule.name.clone(),
                    owner: owner.clone(),
                    previous_owner: None,
                    reason: RoutingReason::Qualified,
                }])
            }
            RoutingCommand::Reassign {
                lead_id,
                rule,
                current_owner,
            } => {
                let owner = self
                    .rules
                    .get(&rule)
                    .and_then(|found| found.owner_after(&current_owner))
                    .filter(|owner| **owner != current_owner)
                    .ok_or_else(|| DomainError::NoOtherOwner {
                        rule: rule.to_string(),
                    })?;
                Ok(vec![RoutingEvent::LeadRouted {
                    lead_id,
                    owner: owner.clone(),
                    rule,
                    previous_owner: Some(current_owner),
                    reason: RoutingReason::ResponseDeadline,
                }])
            }
            RoutingCommand::Record {
                lead_id,
                rule,
                owner,
                previous_owner,
                reason,
            } => Ok(vec![RoutingEvent::LeadRouted {
                lead_id,
                rule,
                owner,
                previous_owner,
                reason,
            }]),
        }
    }

    fn evolve(mut self, event: &RoutingEvent) -> Self {
        match event {
            RoutingEvent::RoutingRulesSet { rules } => self.rules = rules.clone(),
            RoutingEvent::LeadRouted {
                rule,
                reason: RoutingReason::Qualified,
                ..
            } => *self.cursors.entry(rule.to_string()).or_default() += 1,
            RoutingEvent::LeadRouted {
                reason: RoutingReason::ResponseDeadline,
                ..
            } => {}
        }
        self
    }
}

/// What became of a routed lead since it was routed to its owner, as the routing
/// process's deadline check reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    /// The owner acted on the lead: no reassignment.
    Acted,
    /// Nothing decisive yet: at the deadline the lead goes to the pool's next owner.
    Waiting,
    /// An operator assigned the lead by hand: it is never routed again.
    AssignedByHand,
    /// The lead is closed without being acted on (erased): it is never routed again.
    Closed,
}

/// Whether `owner` acted on a routed lead, from the lead's events recorded after it was
/// routed to `owner`, each with the actor that recorded it. Acting is recording a signal
/// as that owner, disqualifying or converting. A `LeadAssigned` by anyone but `router`
/// (the routing process's actor) is an operator's assignment by hand. The first decisive
/// event wins; with none, the lead is `Waiting`.
pub fn response<'a>(
    owner: &str,
    router: &str,
    since: impl IntoIterator<Item = (&'a str, &'a LeadEvent)>,
) -> Response {
    since
        .into_iter()
        .find_map(|(actor, event)| match event {
            LeadEvent::LeadAssigned { .. } if actor != router => Some(Response::AssignedByHand),
            LeadEvent::SignalRecorded { .. } if actor == owner => Some(Response::Acted),
            LeadEvent::LeadDisqualified { .. } | LeadEvent::LeadConverted { .. } => {
                Some(Response::Acted)
            }
            LeadEvent::LeadErased {} => Some(Response::Closed),
            LeadEvent::LeadCaptured { .. }
            | LeadEvent::SignalRecorded { .. }
            | LeadEvent::LeadQualified { .. }
            | LeadEvent::LeadAssigned { .. } => None,
        })
        .unwrap_or(Response::Waiting)
}
