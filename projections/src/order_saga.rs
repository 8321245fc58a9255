//! The order process, a saga (`domain.md`, Order): on `OrderPlaced` it invoices the
//! order and sets a payment deadline (a durable timer, `ANNALS_PAYMENT_TIMEOUT` after the
//! invoice); on `PaymentReceived` it cancels the deadline, starts the subscription for
//! an order with recurring lines, then fulfils the order; when the deadline fires and
//! the order is still invoiced, it cancels it (`payment-timeout`, which voids the
//! invoice). A step that fails for good is compensated, the steps done undone in reverse:
//! a subscription that cannot start cancels the paid order, which refunds it.
//!
//! Exactly-once effect: every command carries an idempotency key derived from the event
//! it answers, and the ids it makes (the invoice's, the subscription's, the deadline's)
//! derive from the order's id, so acting on one event twice does each step once. Each
//! step's events name the event that caused them, so the saga replays and is audited.

use std::sync::Arc;

use annals_commands::{CommandError, CommandHandler, Handlers};
use annals_domain::order::{Order, OrderCommand, OrderEvent, OrderStatus};
use annals_domain::subscription::{Subscription, SubscriptionCommand};
use annals_domain::timer::{Timer, TimerCommand, timer_id};
use annals_domain::values::Reason;
use annals_domain::{DecodeError, DomainError, Event, StoredForm};
use annals_store::{LogFilter, RecordedEvent};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Process;
use crate::lead_conversion::caused_by;
use crate::timers::{fired_for, schedule};

/// The process's name: its checkpoint's key, and (as `process:order_saga`) the actor of
/// its commands.
pub const NAME: &str = "order_saga";

/// The reason an unpaid order is cancelled at its deadline.
pub const PAYMENT_TIMEOUT: &str = "payment-timeout";

/// The reason a paid order is cancelled (and refunded) when its subscription cannot
/// start.
pub const SUBSCRIPTION_FAILED: &str = "subscription-failed";

/// The namespace of the ids the saga makes from an order's id.
const SAGA_IDS: Uuid = Uuid::from_u128(0x3b1f_7c52_9d04_4e8a_a6c1_52f0_9e7d_21b4);

/// The invoice the saga issues for an order.
pub fn invoice_id(order_id: Uuid) -> Uuid {
    Uuid::new_v5(&SAGA_IDS, format!("invoice/{order_id}").as_bytes())
}

/// The subscription the saga starts for an order's recurring lines.
pub fn subscription_id(order_id: Uuid) -> Uuid {
    Uuid::new_v5(&SAGA_IDS, format!("subscription/{order_id}").as_bytes())
}

/// The key of an order's payment deadline (see `timers::schedule`).
fn deadline_key(order_id: Uuid) -> String {
    format!("payment/{order_id}")
}

/// What the payment deadline's timer hands back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PaymentDeadline {
    order_id: Uuid,
}

#[derive(Debug)]
pub struct OrderSaga {
    orders: Arc<CommandHandler<Order>>,
    subscriptions: Arc<CommandHandler<Subscription>>,
    timers: Arc<CommandHandler<Timer>>,
    /// How long a customer has to pay an invoice.
    payment_timeout: chrono::Duration,
}

impl OrderSaga {
    pub fn new(handlers: &Handlers, payment_timeout: chrono::Duration) -> Self {
        OrderSaga {
            orders: handlers.of::<Order>(),
            subscriptions: handlers.of::<Subscription>(),
            timers: handlers.of::<Timer>(),
            payment_timeout,
        }
    }

    /// Invoices a placed order and sets its payment deadline.
    async fn placed(&self, cause: &RecordedEvent, order_id: Uuid) -> Result<(), CommandError> {
        let due_at = cause.recorded_at + self.payment_timeout;
        schedule(
            &self.timers,
            NAME,
            &deadline_key(order_id),
            due_at,
            to_payload(cause, &PaymentDeadline { order_id })?,
            &caused_by(NAME, cause, "deadline"),
        )
        .await?;
        let invoice = OrderCommand::Invoice {
            invoice_id: invoice_id(order_id),
            due_at,
        };
        match self
            .orders
            .execute(order_id, invoice, &caused_by(NAME, cause, "invoice"))
            .await
        {
            // Cancelled before it was invoiced: nothing to wait for.
            Ok(_) | Err(CommandError::Domain(DomainError::OrderClosed { .. })) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// On payment: the deadline cancelled, the subscription started (recurring lines),
    /// the order fulfilled; a subscription that cannot start cancels (and so refunds)
    /// the order.
    async fn paid(&self, cause: &RecordedEvent, order_id: Uuid) -> Result<(), CommandError> {
        let deadline = timer_id(NAME, &deadline_key(order_id));
        match self
            .timers
            .execute(
                deadline,
                TimerCommand::Cancel {},
                &caused_by(NAME, cause, "stop-deadline"),
            )
            .await
        {
            Ok(_)
            | Err(CommandError::Domain(
                DomainError::TimerClosed { .. } | DomainError::TimerNotFound,
            )) => {}
            Err(error) => return Err(error),
        }
        let order = self.orders.current(order_id).await?.state;
        if order.status != OrderStatus::Paid {
            // Cancelled (and refunded) or fulfilled since: nothing left to do.
            return Ok(());
        }
        if let (Some(account_id), Some(mrr)) = (order.account_id, order.recurring_total)
            && mrr.amount_minor > 0
        {
            let id = subscription_id(order_id);
            let start = SubscriptionCommand::Start {
                subscription_id: id,
                account_id,
                order_id,
                mrr,
            };
            let started = match self
                .subscriptions
                .execute(id, start, &caused_by(NAME, cause, "subscription"))
                .await
            {
                Ok(_) => Ok(()),
                // Started by an earlier attempt at this step; or the id is another
                // order's, which no retry mends.
                Err(CommandError::Domain(exists @ DomainError::SubscriptionExists(_))) => {
                    let existing = self.subscriptions.current(id).await?.state;
                    if existing.order_id == Some(order_id) {
                        Ok(())
                    } else {
                        Err(exists)
                    }
                }
                Err(CommandError::Domain(refusal)) => Err(refusal),
                Err(error) => return Err(error),
            };
            if let Err(refusal) = started {
                // Fails for good: undo the payment step (the refund comes with the cancel).
                tracing::warn!(process = NAME, %order_id, %refusal, "the subscription cannot start; cancelling the order");
                return self.cancel(cause, order_id, SUBSCRIPTION_FAILED).await;
            }
        }
        match self
            .orders
            .execute(
                order_id,
                OrderCommand::Fulfil {},
                &caused_by(NAME, cause, "fulfil"),
            )
            .await
        {
            Ok(_) | Err(CommandError::Domain(DomainError::OrderClosed { .. })) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// The payment deadline: an order still invoiced is cancelled.
    async fn deadline(&self, cause: &RecordedEvent, order_id: Uuid) -> Result<(), CommandError> {
        let order = self.orders.current(order_id).await?.state;
        if order.status != OrderStatus::Invoiced {
            return Ok(());
        }
        self.cancel(cause, order_id, PAYMENT_TIMEOUT).await
    }

    async fn cancel(
        &self,
        cause: &RecordedEvent,
        order_id: Uuid,
        reason: &str,
    ) -> Result<(), CommandError> {
        let cancel = OrderCommand::Cancel {
            reason: Reason::parse(reason)?,
        };
        match self
            .orders
            .execute(order_id, cancel, &caused_by(NAME, cause, "cancel"))
            .await
        {
            // Paid in the meantime (the payment won), or closed already.
            Ok(_)
            | Err(CommandError::Domain(
                DomainError::OrderClosed { .. } | DomainError::OrderNotInStatus { .. },
            )) => Ok(()),
            Err(error) => Err(error),
        }
    }
}

fn to_payload(
    cause: &RecordedEvent,
    payload: &PaymentDeadline,
) -> Result<serde_json::Value, CommandError> {
    serde_json::to_value(payload).map_err(|e| undecodable(cause, e.to_string()))
}

fn undecodable(recorded: &RecordedEvent, reason: String) -> CommandError {
    CommandError::Decode(DecodeError {
        event_type: recorded.event_type.clone(),
        schema_version: recorded.schema_version,
        reason,
    })
}

/// The order whose stream `event` is in.
fn order_of(event: &RecordedEvent) -> Result<Uuid, CommandError> {
    let id = crate::aggregate_id(event);
    Uuid::parse_str(&id).map_err(|_| CommandError::InvalidId(id))
}

#[async_trait]
impl Process for OrderSaga {
    fn name(&self) -> &'static str {
        NAME
    }

    fn filter(&self) -> LogFilter {
        LogFilter::event_types(["OrderPlaced", "PaymentReceived", "TimerFired"])
    }

    async fn handle(&self, event: &RecordedEvent) -> Result<(), CommandError> {
        if event.event_type == "TimerFired" {
            let Some(payload) = fired_for(NAME, event)? else {
                return Ok(());
            };
            let PaymentDeadline { order_id } = serde_json::from_value(payload)
                .map_err(|e| undecodable(event, format!("the deadline's payload: {e}")))?;
            return self.deadline(event, order_id).await;
        }
        let decoded = OrderEvent::decode(&StoredForm {
            event_type: event.event_type.clone(),
            schema_version: event.schema_version,
            data: event.data.clone(),
        })?;
        let order_id = order_of(event)?;
        match decoded {
            OrderEvent::OrderPlaced { .. } => self.placed(event, order_id).await,
            OrderEvent::PaymentReceived { .. } => self.paid(event, order_id).await,
            _ => Ok(()),
        }
    }
}
