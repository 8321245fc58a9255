//! Orders: placing one for a won deal, paying it, cancelling it; an order's history. The
//! order process invoices, fulfils and voids (no route of its own).

use std::sync::Arc;

use annals_consumers::read_models::order_board::{self, OrderFilter, OrderRow};
use annals_domain::DomainError;
use annals_domain::deal::{Deal, DealStatus};
use annals_domain::order::{Order, OrderCommand, OrderDeal, OrderLine, OrderLines, OrderStatus};
use annals_domain::values::{Quantity, Reason, Sku};
use axum::Json;
use axum::extract::State;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::{answer, created, execute, history, resource, snapshot, with_position};
use crate::contract::{Bounded, Limit};
use crate::dto::*;
use crate::error::ApiError;
use crate::extract::{CommandMeta, Id, JsonBody, Params, limit};
use crate::openapi::{CommandProblems, QueryProblems};
use crate::server::App;

pub fn routes() -> OpenApiRouter<Arc<App>> {
    resource("orders")
        .routes(routes!(place_order))
        .routes(routes!(pay_order))
        .routes(routes!(cancel_order))
        .routes(routes!(list_orders))
        .routes(routes!(get_order))
        .routes(routes!(order_history))
}

/// How many units a line orders: 1 to 1,000,000.
pub type LineQuantity = Bounded<1, 1_000_000>;

/// One line of an order.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderLineBody {
    /// 1–64 characters once trimmed.
    pub sku: String,
    #[schema(inline)]
    pub quantity: LineQuantity,
    /// In the deal's currency (`currency-mismatch` otherwise).
    #[serde(deserialize_with = "crate::contract::object")]
    pub unit_price: MoneyBody,
    /// A monthly price (recurring revenue): the order process starts a subscription
    /// for it once the order is paid. False unless said.
    #[serde(default)]
    pub recurring: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"deal_id": "0194c0de-0000-7000-8000-000000000002", "lines": [
    {"sku": "ENGINE-1", "quantity": 2, "unit_price": {"currency": "EUR", "amount_minor": 50000}},
    {"sku": "SUPPORT", "quantity": 1, "unit_price": {"currency": "EUR", "amount_minor": 9900}, "recurring": true}
]}))]
pub struct PlaceOrder {
    pub id: Option<Uuid>,
    /// A won deal (404 when there is none, 409 `deal-not-won` otherwise); the order is
    /// for its account.
    pub deal_id: Uuid,
    /// 1–100 lines. Their total (quantity × unit price, summed) is at most
    /// 1,000,000,000,000,000 minor units (422 `number-too-large`).
    #[schema(min_items = 1, max_items = 100)]
    #[serde(deserialize_with = "crate::contract::objects")]
    pub lines: Vec<OrderLineBody>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"amount": {"currency": "EUR", "amount_minor": 109900}}))]
pub struct PayOrder {
    /// Exactly the order's total (422 `amount-mismatch` otherwise).
    #[serde(deserialize_with = "crate::contract::object")]
    pub amount: MoneyBody,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelOrder {
    /// 1–500 characters once trimmed.
    pub reason: String,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct OrderListQuery {
    /// `placed`, `invoiced`, `paid`, `fulfilled` or `cancelled`.
    pub status: Option<String>,
    pub account_id: Option<Uuid>,
    /// Default 50.
    #[param(inline)]
    pub limit: Option<Limit>,
    /// A `next_cursor` from an earlier page.
    #[param(pattern = r"^-?[0-9]{1,19}_[0-9A-Za-z:.\-]{0,64}$")]
    pub cursor: Option<String>,
}

/// One line of an order, as placed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrderLineView {
    pub sku: String,
    pub quantity: u32,
    pub unit_price: MoneyBody,
    pub recurring: bool,
}

/// One step of the order saga.
#[derive(Debug, Serialize, ToSchema)]
pub struct SagaStepView {
    /// `place`, `invoice`, `payment`, `subscription`, `fulfil` or `cancel`.
    pub step: String,
    /// `done`, `waiting`, `compensated` or `failed`.
    pub status: String,
    /// When it reached that status (RFC 3339).
    pub at: String,
}

/// An order, as the order board shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrderView {
    pub id: String,
    pub deal_id: String,
    pub account_id: String,
    /// `placed`, `invoiced`, `paid`, `fulfilled` or `cancelled`.
    pub status: String,
    pub lines: Vec<OrderLineView>,
    pub total: MoneyBody,
    /// The monthly price of the recurring lines: the subscription's MRR once paid.
    pub recurring_total: MoneyBody,
    /// While invoiced or paid (`null` before, and once the invoice is voided).
    pub invoice_id: Option<String>,
    /// When the payment is due (RFC 3339), while invoiced.
    pub due_at: Option<String>,
    pub paid: Option<MoneyBody>,
    pub refunded: Option<MoneyBody>,
    pub subscription_id: Option<String>,
    pub cancel_reason: Option<String>,
    pub placed_at: String,
    /// The order process's steps, in order.
    pub saga: Vec<SagaStepView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OrderList {
    pub items: Vec<OrderView>,
    /// `null` on the last page.
    pub next_cursor: Option<String>,
}

fn order_view(row: OrderRow) -> Result<OrderView, ApiError> {
    let money = |amount_minor: i64| MoneyBody {
        currency: row.currency.clone(),
        amount_minor,
    };
    let lines: Vec<OrderLine> = serde_json::from_str(&row.lines)
        .map_err(|e| annals_engine::ConsumerError::Corrupt(format!("order_board.lines: {e}")))?;
    Ok(OrderView {
        saga: row
            .saga_steps()?
            .into_iter()
            .map(|s| SagaStepView {
                step: s.step,
                status: s.status,
                at: s.at,
            })
            .collect(),
        lines: lines
            .into_iter()
            .map(|line| OrderLineView {
                sku: line.sku.as_str().to_owned(),
                quantity: line.quantity.get(),
                unit_price: MoneyBody {
                    currency: line.unit_price.currency.as_str().to_owned(),
                    amount_minor: line.unit_price.amount_minor,
                },
                recurring: line.recurring,
            })
            .collect(),
        total: money(row.total_minor),
        recurring_total: money(row.recurring_minor),
        paid: row.paid_minor.map(money),
        refunded: row.refunded_minor.map(money),
        id: row.order_id,
        deal_id: row.deal_id,
        account_id: row.account_id,
        status: row.status.as_str().to_owned(),
        invoice_id: row.invoice_id,
        due_at: row.due_at,
        subscription_id: row.subscription_id,
        cancel_reason: row.cancel_reason,
        placed_at: row.placed_at,
    })
}

/// Orders, in the order they were placed, by status or account.
#[utoipa::path(get, path = "/orders", tag = "orders",
    params(OrderListQuery, Consistency),
    responses((status = 200, description = "A page of orders", body = OrderList,
        headers(("Annals-Position" = u64, description = "How far the read model had read the log"))),
        QueryProblems),
    security(("bearer" = ["analyst"])))]
async fn list_orders(
    State(app): State<Arc<App>>,
    Params(query): Params<OrderListQuery>,
    Params(consistency): Params<Consistency>,
) -> Result<Response, ApiError> {
    if let Some(status) = &query.status {
        OrderStatus::parse(status)
            .filter(|s| *s != OrderStatus::Absent)
            .ok_or_else(|| {
                ApiError::invalid(
                    "invalid-parameter",
                    format!("status {status:?} is not one of: placed, invoiced, paid, fulfilled, cancelled"),
                )
            })?;
    }
    let limit = limit(query.limit);
    let (mut snapshot, position) =
        snapshot(&app, &[order_board::NAME], consistency.position()).await?;
    let filter = OrderFilter {
        status: query.status,
        account_id: query.account_id.map(|id| id.to_string()),
    };
    let page = snapshot
        .orders(&filter, limit, query.cursor.as_deref())
        .await?;
    snapshot.finish().await?;
    Ok(with_position(
        position,
        Json(OrderList {
            items: page
                .items
                .into_iter()
                .map(order_view)
                .collect::<Result<_, _>>()?,
            next_cursor: page.next_cursor,
        }),
    ))
}

/// One order, with the order process's steps.
#[utoipa::path(get, path = "/orders/{id}", tag = "orders",
    params(("id" = Uuid, Path), Consistency),
    responses((status = 200, description = "The order", body = OrderView,
        headers(("Annals-Position" = u64, description = "How far the read model had read the log"))),
        QueryProblems),
    security(("bearer" = ["analyst"])))]
async fn get_order(
    State(app): State<Arc<App>>,
    Id(id): Id,
    Params(consistency): Params<Consistency>,
) -> Result<Response, ApiError> {
    let (mut snapshot, position) =
        snapshot(&app, &[order_board::NAME], consistency.position()).await?;
    let order = snapshot.order(&id.to_string()).await?;
    snapshot.finish().await?;
    let order =
        order.ok_or_else(|| ApiError::not_found("order-not-found", "the order does not exist"))?;
    Ok(with_position(position, Json(order_view(order)?)))
}

/// The deal an order is for, as the store has it.
async fn order_deal(app: &App, deal_id: Uuid) -> Result<OrderDeal, ApiError> {
    let deal = app.system.handler::<Deal>().load(deal_id).await?.state;
    Ok(match (deal.status, deal.account_id, deal.amount) {
        (DealStatus::Absent, ..) => OrderDeal::Unknown(deal_id),
        (DealStatus::Won, Some(account_id), Some(amount)) => OrderDeal::Won {
            deal_id,
            account_id,
            currency: amount.currency,
        },
        (status, ..) => OrderDeal::NotWon { deal_id, status },
    })
}

impl TryFrom<&PlaceOrder> for OrderLines {
    type Error = DomainError;

    fn try_from(body: &PlaceOrder) -> Result<Self, DomainError> {
        let lines = body
            .lines
            .iter()
            .map(|line| {
                Ok(OrderLine {
                    sku: Sku::parse(&line.sku)?,
                    quantity: Quantity::parse(line.quantity.get())?,
                    unit_price: line.unit_price.parse()?,
                    recurring: line.recurring,
                })
            })
            .collect::<Result<Vec<_>, DomainError>>()?;
        OrderLines::new(lines)
    }
}

/// Place an order for a won deal; the order process then invoices it and waits for its
/// payment (`ANNALS_PAYMENT_TIMEOUT`).
#[utoipa::path(post, path = "/orders", tag = "orders",
    request_body = PlaceOrder, params(CommandHeaders),
    responses((status = 201, description = "Placed", body = CommandAnswer), CommandProblems),
    security(("bearer" = ["writer"])))]
async fn place_order(
    State(app): State<Arc<App>>,
    meta: CommandMeta,
    body: JsonBody<PlaceOrder>,
) -> Result<Response, ApiError> {
    let b = &body.value;
    let id = b.id.unwrap_or_else(Uuid::now_v7);
    let command = OrderCommand::Place {
        order_id: id,
        lines: OrderLines::try_from(b)?,
        deal: order_deal(&app, b.deal_id).await?,
    };
    let outcome = execute::<Order>(&app, id, command, &meta, &body.digest).await?;
    Ok(created("orders", outcome))
}

/// Pay an invoiced order, its total exactly. A payment for an order not invoiced (or
/// cancelled: a late payment) is refused (409), never taken silently.
#[utoipa::path(post, path = "/orders/{id}/pay", tag = "orders",
    request_body = PayOrder, params(("id" = Uuid, Path), CommandHeaders),
    responses((status = 200, description = "Paid", body = CommandAnswer), CommandProblems),
    security(("bearer" = ["writer"])))]
async fn pay_order(
    State(app): State<Arc<App>>,
    Id(id): Id,
    meta: CommandMeta,
    body: JsonBody<PayOrder>,
) -> Result<Json<CommandAnswer>, ApiError> {
    let command = OrderCommand::Pay {
        amount: body.value.amount.parse()?,
    };
    let outcome = execute::<Order>(&app, id, command, &meta, &body.digest).await?;
    Ok(Json(answer(outcome)))
}

/// Cancel an order that is not closed: an unpaid invoice is voided first, a payment is
/// refunded after.
#[utoipa::path(post, path = "/orders/{id}/cancel", tag = "orders",
    request_body = CancelOrder, params(("id" = Uuid, Path), CommandHeaders),
    responses((status = 200, description = "Cancelled", body = CommandAnswer), CommandProblems),
    security(("bearer" = ["writer"])))]
async fn cancel_order(
    State(app): State<Arc<App>>,
    Id(id): Id,
    meta: CommandMeta,
    body: JsonBody<CancelOrder>,
) -> Result<Json<CommandAnswer>, ApiError> {
    let command = OrderCommand::Cancel {
        reason: Reason::parse(&body.value.reason)?,
    };
    let outcome = execute::<Order>(&app, id, command, &meta, &body.digest).await?;
    Ok(Json(answer(outcome)))
}

/// An order as it was at a version or a time (now without either), from its events.
#[utoipa::path(get, path = "/orders/{id}/history", tag = "history",
    params(("id" = Uuid, Path), HistoryQuery),
    responses((status = 200, description = "The order's state", body = HistoryView), QueryProblems),
    security(("bearer" = ["analyst"])))]
async fn order_history(
    State(app): State<Arc<App>>,
    Id(id): Id,
    Params(query): Params<HistoryQuery>,
) -> Result<Json<HistoryView>, ApiError> {
    let missing = ApiError::not_found("order-not-found", "the order does not exist");
    history(&app.system.handler::<Order>(), id, query, missing).await
}
