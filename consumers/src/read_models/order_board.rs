//! `order_board`: one row per order with its status, account, lines and totals, invoice,
//! payment, subscription, and the order saga's steps (`api.md`, `GET /orders/{id}`).
//! Folded from the order's stream and the `SubscriptionStarted` and `SubscriptionChurned`
//! that name it (rows span streams), a pure function of the log.
//!
//! The saga's steps, in order, each `{step, status, at}`: `place`; `invoice`
//! (compensated when the invoice is voided); `payment` (waiting once invoiced, done when
//! paid, failed when the order is cancelled unpaid, compensated when refunded);
//! `subscription` (done when started for recurring lines, compensated when churned
//! after the order was cancelled); `fulfil`; `cancel`.

use annals_domain::order::{OrderEvent, OrderStatus};
use annals_domain::subscription::SubscriptionEvent;
use annals_store::{LogFilter, RecordedEvent};
use serde::{Deserialize, Serialize};

use crate::queries::{Conditions, Page, Snapshot, encode_cursor, live, page};
use crate::{aggregate_id, decode, time_text};
use annals_engine::ConsumerError;
use annals_engine::row;
use annals_engine::rows::{Row, RowModel, text_columns};
use annals_store::to_sql_int;

/// The projection's name, and its table's.
pub const NAME: &str = "order_board";

#[derive(Debug, Default)]
pub struct OrderBoard;

row! {
    /// A row of `order_board`.
    pub struct OrderRow in table NAME, keyed by order_id {
        pub order_id: String,
        pub deal_id: String,
        pub account_id: String,
        pub status: OrderStatus as word,
        pub currency: String,
        pub total_minor: i64,
        pub recurring_minor: i64,
        /// The lines as JSON, as placed.
        pub lines: String,
        pub invoice_id: Option<String>,
        pub due_at: Option<String>,
        pub paid_minor: Option<i64>,
        pub refunded_minor: Option<i64>,
        pub subscription_id: Option<String>,
        pub cancel_reason: Option<String>,
        /// The saga's steps as JSON: `[{"step", "status", "at"}]`.
        pub saga: String,
        pub placed_at: String,
        pub placed_micros: i64,
        pub updated_position: i64,
    }
    indexes {
        // The list, in the order orders were placed; by status; by account.
        order_board_placed on ("placed_micros, order_id"),
        order_board_status on ("status, placed_micros, order_id"),
        order_board_account on ("account_id, placed_micros, order_id"),
    }
}

/// One step of an order's saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaStep {
    pub step: String,
    /// `done`, `waiting`, `compensated` or `failed`.
    pub status: String,
    /// When it reached that status (RFC 3339).
    pub at: String,
}

impl OrderRow {
    /// The saga's steps, in order.
    pub fn saga_steps(&self) -> Result<Vec<SagaStep>, ConsumerError> {
        serde_json::from_str(&self.saga)
            .map_err(|e| ConsumerError::Corrupt(format!("{NAME}.saga: {e}")))
    }
}

/// The events of an order's subscription that a row folds: its start, and its churn
/// (the compensation of a refunded order).
const SUBSCRIPTION_EVENTS: [&str; 2] = ["SubscriptionStarted", "SubscriptionChurned"];

const ORDER_EVENTS: [&str; 7] = [
    "OrderPlaced",
    "OrderInvoiced",
    "PaymentReceived",
    "OrderFulfilled",
    "InvoiceVoided",
    "OrderCancelled",
    "PaymentRefunded",
];

impl RowModel for OrderBoard {
    type Row = OrderRow;

    const NAME: &'static str = NAME;
    // A row also folds the `SubscriptionStarted` of its order, from another stream.
    const ROWS_FOLLOW_STREAMS: bool = false;

    fn filter(&self) -> LogFilter {
        LogFilter::event_types(ORDER_EVENTS.into_iter().chain(SUBSCRIPTION_EVENTS))
    }

    fn key(&self, event: &RecordedEvent) -> Result<Option<String>, ConsumerError> {
        if SUBSCRIPTION_EVENTS.contains(&event.event_type.as_str()) {
            return match decode::<SubscriptionEvent>(event)? {
                SubscriptionEvent::SubscriptionStarted { order_id, .. }
                | SubscriptionEvent::SubscriptionChurned {
                    order_id: Some(order_id),
                    ..
                } => Ok(Some(order_id.to_string())),
                _ => Ok(None),
            };
        }
        Ok(Some(aggregate_id(event)))
    }

    fn fold(
        &self,
        row: Option<OrderRow>,
        event: &RecordedEvent,
    ) -> Result<Option<OrderRow>, ConsumerError> {
        if SUBSCRIPTION_EVENTS.contains(&event.event_type.as_str()) {
            let Some(row) = row else { return Ok(None) };
            return subscription_step(row, event).map(Some);
        }
        let decoded: OrderEvent = decode(event)?;
        if let OrderEvent::OrderPlaced {
            order_id,
            deal_id,
            account_id,
            lines,
            total,
            recurring_total,
        } = &decoded
        {
            let at = time_text(event);
            return Ok(Some(OrderRow {
                order_id: order_id.to_string(),
                deal_id: deal_id.to_string(),
                account_id: account_id.to_string(),
                status: OrderStatus::Placed,
                currency: total.currency.as_str().to_owned(),
                total_minor: total.amount_minor,
                recurring_minor: recurring_total.amount_minor,
                lines: serde_json::to_string(lines).map_err(corrupt)?,
                invoice_id: None,
                due_at: None,
                paid_minor: None,
                refunded_minor: None,
                subscription_id: None,
                cancel_reason: None,
                saga: serde_json::to_string(&[step("place", "done", &at)]).map_err(corrupt)?,
                placed_at: at,
                placed_micros: event.recorded_at.timestamp_micros(),
                updated_position: to_sql_int(event.position),
            }));
        }
        let row = row.ok_or_else(|| ConsumerError::Apply {
            position: event.position,
            event_type: event.event_type.clone(),
            reason: "the order was never placed".into(),
        })?;
        order_step(row, &decoded, event).map(Some)
    }
}

fn corrupt(error: serde_json::Error) -> ConsumerError {
    ConsumerError::Corrupt(error.to_string())
}

/// An order's row after a step of its subscription: started, or churned as the
/// compensation of a cancelled order.
fn subscription_step(mut row: OrderRow, event: &RecordedEvent) -> Result<OrderRow, ConsumerError> {
    let at = time_text(event);
    let mut steps = row.saga_steps()?;
    match decode::<SubscriptionEvent>(event)? {
        SubscriptionEvent::SubscriptionStarted {
            subscription_id, ..
        } => {
            row.subscription_id = Some(subscription_id.to_string());
            steps.push(step("subscription", "done", &at));
        }
        // The compensation of a refunded order's subscription: churned because
        // the order was cancelled (a churn of a running order's subscription,
        // by its customer, is no step of the saga).
        SubscriptionEvent::SubscriptionChurned { .. } if row.status == OrderStatus::Cancelled => {
            if let Some(found) = steps
                .iter_mut()
                .rev()
                .find(|s| s.step == "subscription" && s.status == "done")
            {
                found.status = "compensated".to_owned();
                found.at = at.clone();
            }
        }
        _ => return Ok(row),
    }
    row.saga = serde_json::to_string(&steps).map_err(corrupt)?;
    row.updated_position = to_sql_int(event.position);
    Ok(row)
}

/// A placed order's row after one of its events.
fn order_step(
    mut row: OrderRow,
    decoded: &OrderEvent,
    event: &RecordedEvent,
) -> Result<OrderRow, ConsumerError> {
    let at = time_text(event);
    let mut steps = row.saga_steps()?;
    let mut mark = |name: &str, from: &[&str], to: &str| {
        if let Some(found) = steps
            .iter_mut()
            .rev()
            .find(|s| s.step == name && from.contains(&s.status.as_str()))
        {
            found.status = to.to_owned();
            found.at = at.clone();
        }
    };
    match decoded {
        OrderEvent::OrderPlaced { .. } => {}
        OrderEvent::OrderInvoiced { invoice_id, due_at } => {
            row.invoice_id = Some(invoice_id.to_string());
            row.due_at = Some(due_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
            steps.push(step("invoice", "done", &at));
            steps.push(step("payment", "waiting", &at));
        }
        OrderEvent::PaymentReceived { amount } => {
            row.paid_minor = Some(amount.amount_minor);
            mark("payment", &["waiting"], "done");
        }
        OrderEvent::OrderFulfilled {} => steps.push(step("fulfil", "done", &at)),
        OrderEvent::InvoiceVoided { .. } => {
            row.invoice_id = None;
            row.due_at = None;
            mark("invoice", &["done"], "compensated");
            mark("payment", &["waiting"], "failed");
        }
        OrderEvent::OrderCancelled { reason } => {
            row.cancel_reason = Some(reason.as_str().to_owned());
            mark("payment", &["waiting"], "failed");
            steps.push(step("cancel", "done", &at));
        }
        OrderEvent::PaymentRefunded { amount } => {
            row.refunded_minor = Some(amount.amount_minor);
            mark("payment", &["done"], "compensated");
        }
    }
    row.status = row.status.after(decoded);
    row.saga = serde_json::to_string(&steps).map_err(corrupt)?;
    row.updated_position = to_sql_int(event.position);
    Ok(row)
}

fn step(name: &str, status: &str, at: &str) -> SagaStep {
    SagaStep {
        step: name.to_owned(),
        status: status.to_owned(),
        at: at.to_owned(),
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct OrderFilter {
    pub status: Option<String>,
    pub account_id: Option<String>,
}

fn select_orders() -> String {
    format!(
        "SELECT {} FROM {NAME} WHERE generation = {}",
        text_columns(&OrderRow::TABLE),
        live(NAME)
    )
}

impl Snapshot {
    /// Orders matching the filter, in the order they were placed (then by id); keyset
    /// pagination.
    pub async fn orders(
        &mut self,
        filter: &OrderFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<OrderRow>, ConsumerError> {
        let mut conditions = Conditions::default();
        conditions.equal("status", filter.status.as_ref());
        conditions.equal("account_id", filter.account_id.as_ref());
        conditions.after(cursor, "placed_micros", "order_id")?;
        page(
            self,
            &select_orders(),
            conditions,
            "placed_micros, order_id",
            limit,
            OrderRow::read,
            |last| encode_cursor(last.placed_micros, &[&last.order_id]),
        )
        .await
    }

    /// One order of the live order board; `None` when unknown.
    pub async fn order(&mut self, order_id: &str) -> Result<Option<OrderRow>, ConsumerError> {
        let sql = format!("{} AND order_id = $1", select_orders());
        self.rows(&sql, &[order_id.into()])
            .await?
            .first()
            .map(|row| OrderRow::read(row))
            .transpose()
    }
}
