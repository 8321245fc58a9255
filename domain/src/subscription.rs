//! The subscription: the recurring revenue an order starts for an account, expanded,
//! contracted, until it churns (`domain.md`, Subscription). Stream `subscription-{id}`.
//!
//! Invariants: the MRR is always more than zero while the subscription is active, and
//! keeps the currency it started in (the order's); an expansion only raises it, a
//! contraction only lowers it; a churned subscription never changes. Only the order
//! process starts one, for an order whose recurring total is more than zero.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::values::{Money, Reason};
use crate::{Aggregate, Command, DecodeError, DomainError, Event};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionStatus {
    /// Not started yet: the stream is empty.
    #[default]
    Absent,
    Active,
    Churned,
}

impl SubscriptionStatus {
    /// Every status a started subscription can be in: the words a client lists
    /// subscriptions by.
    pub const STARTED: &'static [SubscriptionStatus] =
        &[SubscriptionStatus::Active, SubscriptionStatus::Churned];

    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Absent => "absent",
            SubscriptionStatus::Active => "active",
            SubscriptionStatus::Churned => "churned",
        }
    }

    /// The status an `as_str` word names.
    pub fn parse(word: &str) -> Option<SubscriptionStatus> {
        std::iter::once(SubscriptionStatus::Absent)
            .chain(SubscriptionStatus::STARTED.iter().copied())
            .find(|status| status.as_str() == word)
    }

    /// The status after `event`: the one rule the aggregate and the revenue read model
    /// share.
    pub fn after(self, event: &SubscriptionEvent) -> SubscriptionStatus {
        match event {
            SubscriptionEvent::SubscriptionStarted { .. } => SubscriptionStatus::Active,
            SubscriptionEvent::SubscriptionExpanded { .. }
            | SubscriptionEvent::SubscriptionContracted { .. } => self,
            SubscriptionEvent::SubscriptionChurned { .. } => SubscriptionStatus::Churned,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum SubscriptionCommand {
    /// The order process's only: `mrr` is the order's recurring total.
    Start {
        subscription_id: Uuid,
        account_id: Uuid,
        order_id: Uuid,
        mrr: Money,
    },
    /// Upsell or cross-sell: the new, higher MRR.
    Expand {
        mrr: Money,
    },
    /// Downgrade: the new, lower MRR.
    Contract {
        mrr: Money,
    },
    Churn {
        reason: Option<Reason>,
    },
}

impl Command for SubscriptionCommand {
    fn name(&self) -> &'static str {
        match self {
            SubscriptionCommand::Start { .. } => "StartSubscription",
            SubscriptionCommand::Expand { .. } => "ExpandSubscription",
            SubscriptionCommand::Contract { .. } => "ContractSubscription",
            SubscriptionCommand::Churn { .. } => "ChurnSubscription",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum SubscriptionEvent {
    SubscriptionStarted {
        subscription_id: Uuid,
        account_id: Uuid,
        order_id: Uuid,
        mrr: Money,
    },
    /// Expansion revenue: `to` − `from`.
    SubscriptionExpanded { from: Money, to: Money },
    /// Contraction: `from` − `to`.
    SubscriptionContracted { from: Money, to: Money },
    /// `mrr` is the MRR lost; `order_id` the order that started it (v2; `None` in a v1
    /// event, which did not say).
    SubscriptionChurned {
        mrr: Money,
        reason: Option<Reason>,
        order_id: Option<Uuid>,
    },
}

impl Event for SubscriptionEvent {
    fn event_type(&self) -> &'static str {
        match self {
            SubscriptionEvent::SubscriptionStarted { .. } => "SubscriptionStarted",
            SubscriptionEvent::SubscriptionExpanded { .. } => "SubscriptionExpanded",
            SubscriptionEvent::SubscriptionContracted { .. } => "SubscriptionContracted",
            SubscriptionEvent::SubscriptionChurned { .. } => "SubscriptionChurned",
        }
    }

    fn current_version(event_type: &str) -> u32 {
        match event_type {
            "SubscriptionChurned" => 2,
            _ => 1,
        }
    }

    fn upcast_step(
        event_type: &str,
        schema_version: u32,
        mut data: serde_json::Value,
    ) -> Result<serde_json::Value, DecodeError> {
        match (event_type, schema_version) {
            // v1 → v2: the churn did not name its order.
            ("SubscriptionChurned", 1) => {
                if let serde_json::Value::Object(fields) = &mut data {
                    fields.entry("order_id").or_insert(serde_json::Value::Null);
                }
                Ok(data)
            }
            _ => Err(DecodeError {
                event_type: event_type.to_owned(),
                schema_version,
                reason: "no upcaster from this version".into(),
            }),
        }
    }
}

/// A subscription as its events left it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    pub id: Option<Uuid>,
    pub account_id: Option<Uuid>,
    pub order_id: Option<Uuid>,
    pub status: SubscriptionStatus,
    /// The monthly recurring revenue: more than zero, in the currency it started in.
    /// Once churned, the MRR that was lost.
    pub mrr: Option<Money>,
}

impl Subscription {
    /// The MRR of an active subscription, or why the subscription cannot change.
    fn active(&self) -> Result<&Money, DomainError> {
        match (self.status, &self.mrr) {
            (SubscriptionStatus::Active, Some(mrr)) => Ok(mrr),
            (SubscriptionStatus::Absent, _) => Err(DomainError::SubscriptionNotFound),
            (status, _) => Err(DomainError::SubscriptionClosed {
                status: status.as_str(),
            }),
        }
    }

    /// The MRR of an active subscription, when `mrr` is in its currency.
    fn active_in_currency_of(&self, mrr: &Money) -> Result<&Money, DomainError> {
        let current = self.active()?;
        if mrr.currency != current.currency {
            return Err(DomainError::MrrCurrencyMismatch {
                subscription: current.currency.as_str().to_owned(),
                given: mrr.currency.as_str().to_owned(),
            });
        }
        Ok(current)
    }
}

/// Refuses an MRR of zero (or below, which `Money::parse` never makes).
fn positive(mrr: &Money) -> Result<(), DomainError> {
    if mrr.amount_minor <= 0 {
        return Err(DomainError::NotPositive { field: "mrr" });
    }
    Ok(())
}

impl Aggregate for Subscription {
    type Command = SubscriptionCommand;
    type Event = SubscriptionEvent;
    const CATEGORY: &'static str = "subscription";
    const SNAPSHOT_VERSION: u32 = 1;

    fn decide(&self, command: SubscriptionCommand) -> Result<Vec<SubscriptionEvent>, DomainError> {
        match command {
            SubscriptionCommand::Start {
                subscription_id,
                account_id,
                order_id,
                mrr,
            } => {
                if let Some(id) = self.id {
                    return Err(DomainError::SubscriptionExists(id));
                }
                positive(&mrr)?;
                Ok(vec![SubscriptionEvent::SubscriptionStarted {
                    subscription_id,
                    account_id,
                    order_id,
                    mrr,
                }])
            }
            SubscriptionCommand::Expand { mrr } => {
                let current = self.active_in_currency_of(&mrr)?;
                if mrr.amount_minor <= current.amount_minor {
                    return Err(DomainError::MrrNotHigher {
                        from: current.to_string(),
                        to: mrr.to_string(),
                    });
                }
                Ok(vec![SubscriptionEvent::SubscriptionExpanded {
                    from: current.clone(),
                    to: mrr,
                }])
            }
            SubscriptionCommand::Contract { mrr } => {
                let current = self.active_in_currency_of(&mrr)?;
                positive(&mrr)?;
                if mrr.amount_minor >= current.amount_minor {
                    return Err(DomainError::MrrNotLower {
                        from: current.to_string(),
                        to: mrr.to_string(),
                    });
                }
                Ok(vec![SubscriptionEvent::SubscriptionContracted {
                    from: current.clone(),
                    to: mrr,
                }])
            }
            SubscriptionCommand::Churn { reason } => {
                let mrr = self.active()?;
                Ok(vec![SubscriptionEvent::SubscriptionChurned {
                    mrr: mrr.clone(),
                    reason,
                    order_id: self.order_id,
                }])
            }
        }
    }

    fn evolve(mut self, event: &SubscriptionEvent) -> Self {
        self.status = self.status.after(event);
        match event {
            SubscriptionEvent::SubscriptionStarted {
                subscription_id,
                account_id,
                order_id,
                mrr,
            } => {
                self.id = Some(*subscription_id);
                self.account_id = Some(*account_id);
                self.order_id = Some(*order_id);
                self.mrr = Some(mrr.clone());
            }
            SubscriptionEvent::SubscriptionExpanded { to, .. }
            | SubscriptionEvent::SubscriptionContracted { to, .. } => {
                self.mrr = Some(to.clone());
            }
            SubscriptionEvent::SubscriptionChurned { .. } => {}
        }
        self
    }
}
