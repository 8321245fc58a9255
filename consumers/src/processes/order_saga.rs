//! The order process, a saga (`domain.md`, Order): on `OrderPlaced` it invoices the
//! order, due `ANNALS_PAYMENT_TIMEOUT` after the invoice (its own clock's time when it
//! invoices, so a saga that lags never invoices an order already overdue); on
//! `OrderInvoiced` it sets the payment deadline (a durable timer at the invoice's due
//! time); on `PaymentReceived` it cancels the deadline, starts the subscription for an
//! order with recurring lines, then fulfils the order; when the deadline fires it cancels
//! the order unless it is paid (`CancelUnpaid`, `payment-timeout`, which voids the
//! invoice: the domain refuses it on a paid order, so a payment that committed first is
//! never refunded, however late the cancel is decided again); on `PaymentRefunded` (a
//! paid order cancelled) it churns the order's subscription (`order-cancelled`). A step
//! that fails for good is compensated, the steps done undone in reverse: a subscription
//! that cannot start cancels the paid order, which refunds it.
//!
//! Whatever the order of the client's Pay and Cancel and the saga's steps, a refunded
//! order ends with no active subscription: a subscription started while the order was
//! being cancelled is churned by the step that started it (it reads the order again
//! after the start, and a Fulfil refused on a cancelled order churns it), or by the
//! refund's own step, which comes later in the log.
//!
//! Exactly-once effect: every command carries an idempotency key derived from the event
//! it answers, and the ids it makes (the invoice's, the subscription's, the deadline's)
//! derive from the order's id. Acting on an event again also recognises the step's
//! effect from the store, whatever the age of the key (keys are purged): an order
//! invoiced already is not invoiced again (only this process invoices), a timer or a
//! subscription that exists is not made again, a closed order or subscription is left.
//! Each step's events name the event that caused them, so the saga replays and is
//! audited.

use std::sync::Arc;

use annals_commands::{CommandError, CommandHandler, Handlers};
use annals_domain::order::{Order, OrderCommand, OrderEvent, OrderStatus};
use annals_domain::subscription::{Subscription, SubscriptionCommand, SubscriptionStatus};
use annals_domain::timer::{Timer, TimerCommand, timer_id};
use annals_domain::values::Reason;
use annals_domain::{DecodeError, DomainError, Event, StoredForm};
use annals_store::{LogFilter, RecordedEvent};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{action_error, caused_by};
use crate::timers::{Clock, fired_for, schedule};
use annals_engine::{ActionError, Process};

/// The process's name: its checkpoint's key, and (as `process:order_saga`) the actor of
/// its commands.
pub const NAME: &str = "order_saga";

/// The reason an unpaid order is cancelled at its deadline.
pub const PAYMENT_TIMEOUT: &str = "payment-timeout";

/// The reason a paid order is cancelled (and refunded) when its subscription cannot
/// start.
pub const SUBSCRIPTION_FAILED: &str = "subscription-failed";

/// The reason the subscription of a cancelled (refunded) order is churned.
pub const ORDER_CANCELLED: &str = "order-cancelled";

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
    /// The time an invoice is issued at.
    clock: Arc<dyn Clock>,
}

impl OrderSaga {
    pub fn new(
        handlers: &Handlers,
        payment_timeout: chrono::Duration,
        clock: Arc<dyn Clock>,
    ) -> Self {
        OrderSaga {
            orders: handlers.of::<Order>(),
            subscriptions: handlers.of::<Subscription>(),
            timers: handlers.of::<Timer>(),
            payment_timeout,
            clock,
        }
    }

    /// Invoices a placed order, due the payment timeout from now.
    async fn placed(&self, cause: &RecordedEvent, order_id: Uuid) -> Result<(), CommandError> {
        if self.orders.current(order_id).await?.state.status != OrderStatus::Placed {
            // Invoiced already (only this process invoices: an earlier attempt, whose
            // key may be gone), paid since, or cancelled: nothing to do.
            return Ok(());
        }
        let invoice = OrderCommand::Invoice {
            invoice_id: invoice_id(order_id),
            due_at: self.clock.now() + self.payment_timeout,
        };
        match self
            .orders
            .execute(order_id, invoice, &caused_by(NAME, cause, "invoice"))
            .await
        {
            // Cancelled before it was invoiced, or invoiced by an attempt running beside
            // this one (a stalled server's, waking).
            Ok(_)
            | Err(CommandError::Domain(
                DomainError::OrderClosed { .. } | DomainError::OrderNotInStatus { .. },
            )) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Sets the payment deadline of an invoiced order, at the invoice's due time.
    async fn invoiced(
        &self,
        cause: &RecordedEvent,
        order_id: Uuid,
        due_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), CommandError> {
        if self.orders.current(order_id).await?.state.status != OrderStatus::Invoiced {
            // Paid or cancelled since: no deadline to wait for.
            return Ok(());
        }
        schedule(
            &self.timers,
            NAME,
            &deadline_key(order_id),
            due_at,
            to_payload(cause, &PaymentDeadline { order_id })?,
            &caused_by(NAME, cause, "deadline"),
        )
        .await?;
        Ok(())
    }

    /// On payment: the deadline cancelled, the subscription started (recurring lines),
    /// the order fulfilled; a subscription that cannot start cancels (and so refunds)
    /// the order; a subscription started while the order was being cancelled is churned.
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
            // Cancelled (and refunded: the refund's step churns what was started) or
            // fulfilled since: nothing left to do.
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
                    if self.order_of_subscription(order_id).await? {
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
                let cancel = OrderCommand::Cancel {
                    reason: Reason::parse(SUBSCRIPTION_FAILED)?,
                };
                return self.cancel(cause, order_id, cancel).await;
            }
            // Cancelled while the subscription started: undo the start.
            if self.orders.current(order_id).await?.state.status != OrderStatus::Paid {
                return self.churn(cause, order_id).await;
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
            Ok(_) => Ok(()),
            // Cancelled since the order was read: the subscription goes with it.
            Err(CommandError::Domain(DomainError::OrderClosed {
                status: "cancelled",
            })) => self.churn(cause, order_id).await,
            Err(CommandError::Domain(DomainError::OrderClosed { .. })) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// The payment deadline: the order is cancelled unless it is paid (the domain
    /// refuses `CancelUnpaid` on a paid order, whenever it is decided).
    async fn deadline(&self, cause: &RecordedEvent, order_id: Uuid) -> Result<(), CommandError> {
        let cancel = OrderCommand::CancelUnpaid {
            reason: Reason::parse(PAYMENT_TIMEOUT)?,
        };
        self.cancel(cause, order_id, cancel).await
    }

    /// Whether the subscription with the order's id was started for this order.
    async fn order_of_subscription(&self, order_id: Uuid) -> Result<bool, CommandError> {
        let existing = self
            .subscriptions
            .current(subscription_id(order_id))
            .await?
            .state;
        Ok(existing.order_id == Some(order_id))
    }

    /// Churns the order's subscription (`order-cancelled`), if it started one that is
    /// still active; one under the order's id that is another order's is left alone.
    async fn churn(&self, cause: &RecordedEvent, order_id: Uuid) -> Result<(), CommandError> {
        let id = subscription_id(order_id);
        let subscription = self.subscriptions.current(id).await?.state;
        if subscription.order_id != Some(order_id)
            || subscription.status != SubscriptionStatus::Active
        {
            return Ok(());
        }
        let churn = SubscriptionCommand::Churn {
            reason: Some(Reason::parse(ORDER_CANCELLED)?),
        };
        match self
            .subscriptions
            .execute(id, churn, &caused_by(NAME, cause, "stop-subscription"))
            .await
        {
            // Churned meanwhile (by its customer, or an attempt beside this one).
            Ok(_) | Err(CommandError::Domain(DomainError::SubscriptionClosed { .. })) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Sends the saga's cancel (`Cancel` or `CancelUnpaid`) for the order.
    async fn cancel(
        &self,
        cause: &RecordedEvent,
        order_id: Uuid,
        cancel: OrderCommand,
    ) -> Result<(), CommandError> {
        match self
            .orders
            .execute(order_id, cancel, &caused_by(NAME, cause, "cancel"))
            .await
        {
            // Paid before the deadline's cancel (the payment won), or closed already.
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

impl OrderSaga {
    /// Acts on one event it follows.
    async fn act(&self, event: &RecordedEvent) -> Result<(), CommandError> {
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
            OrderEvent::OrderInvoiced { due_at, .. } => {
                self.invoiced(event, order_id, due_at).await
            }
            OrderEvent::PaymentReceived { .. } => self.paid(event, order_id).await,
            // A paid order cancelled: its subscription goes.
            OrderEvent::PaymentRefunded { .. } => self.churn(event, order_id).await,
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl Process for OrderSaga {
    fn name(&self) -> &'static str {
        NAME
    }

    fn filter(&self) -> LogFilter {
        LogFilter::event_types([
            "OrderPlaced",
            "OrderInvoiced",
            "PaymentReceived",
            "PaymentRefunded",
            "TimerFired",
        ])
    }

    async fn handle(&self, event: &RecordedEvent) -> Result<(), ActionError> {
        self.act(event).await.map_err(action_error)
    }
}
