//! Orders: placing one for a won deal, paying it, cancelling it; an order's history. The
//! order process invoices, fulfils and voids (no route of its own).

use std::sync::Arc;

use annals_domain::DomainError;
use annals_domain::deal::{Deal, DealStatus};
use annals_domain::order::{Order, OrderCommand, OrderDeal, OrderLine, OrderLines};
use annals_domain::values::{Quantity, Reason, Sku};
use axum::Json;
use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::{answer, created, execute, history, resource};
use crate::contract::Bounded;
use crate::dto::*;
use crate::error::ApiError;
use crate::extract::{CommandMeta, Id, JsonBody, Params};
use crate::openapi::{CommandProblems, QueryProblems};
use crate::server::App;

pub fn routes() -> OpenApiRouter<Arc<App>> {
    resource("orders")
        .routes(routes!(place_order))
        .routes(routes!(pay_order))
        .routes(routes!(cancel_order))
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
