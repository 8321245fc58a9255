//! Subscriptions (recurring revenue): expanding, contracting and churning one; its
//! history. The order process starts them (no route of its own).

use std::sync::Arc;

use annals_consumers::read_models::subscription_board::{
    self, SubscriptionFilter, SubscriptionRow,
};
use annals_domain::subscription::{Subscription, SubscriptionCommand, SubscriptionStatus};
use annals_domain::values::Reason;
use axum::Json;
use axum::extract::State;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::{answer, execute, history, optional, resource, snapshot, with_position};
use crate::contract::Limit;
use crate::dto::*;
use crate::error::ApiError;
use crate::extract::{CommandMeta, Id, JsonBody, Params, limit};
use crate::openapi::{CommandProblems, QueryProblems};
use crate::server::App;

pub fn routes() -> OpenApiRouter<Arc<App>> {
    resource("subscriptions")
        .routes(routes!(expand_subscription))
        .routes(routes!(contract_subscription))
        .routes(routes!(churn_subscription))
        .routes(routes!(list_subscriptions))
        .routes(routes!(get_subscription))
        .routes(routes!(subscription_history))
}

/// A subscription's new, higher monthly recurring revenue.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"mrr": {"currency": "EUR", "amount_minor": 19900}}))]
pub struct ExpandMrr {
    /// In the subscription's currency (`currency-mismatch` otherwise), higher than now
    /// (409 otherwise).
    #[serde(deserialize_with = "crate::contract::object")]
    pub mrr: MoneyBody,
}

/// A subscription's new, lower monthly recurring revenue, above zero.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"mrr": {"currency": "EUR", "amount_minor": 4900}}))]
pub struct ContractMrr {
    /// In the subscription's currency (`currency-mismatch` otherwise), lower than now
    /// (409 otherwise); to end a subscription, churn it.
    #[serde(deserialize_with = "crate::contract::object")]
    pub mrr: PositiveMoneyBody,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChurnSubscription {
    /// 1–500 characters once trimmed.
    pub reason: Option<String>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SubscriptionListQuery {
    pub account_id: Option<Uuid>,
    /// `active` or `churned`.
    pub status: Option<String>,
    /// Default 50.
    #[param(inline)]
    pub limit: Option<Limit>,
    /// A `next_cursor` from an earlier page.
    #[param(pattern = r"^-?[0-9]{1,19}_[0-9A-Za-z:.\-]{0,64}$")]
    pub cursor: Option<String>,
}

/// A subscription, as the subscription board shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionView {
    pub id: String,
    pub account_id: String,
    pub order_id: String,
    /// `active` or `churned`.
    pub status: String,
    /// The MRR now; once churned, the MRR lost.
    pub mrr: MoneyBody,
    pub started_at: String,
    pub churned_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionList {
    pub items: Vec<SubscriptionView>,
    /// `null` on the last page.
    pub next_cursor: Option<String>,
}

fn subscription_view(row: SubscriptionRow) -> SubscriptionView {
    SubscriptionView {
        id: row.subscription_id,
        account_id: row.account_id,
        order_id: row.order_id,
        status: row.status.as_str().to_owned(),
        mrr: MoneyBody {
            currency: row.currency,
            amount_minor: row.mrr_minor,
        },
        started_at: row.started_at,
        churned_at: row.churned_at,
    }
}

/// Subscriptions, in the order they started, by account or status.
#[utoipa::path(get, path = "/subscriptions", tag = "subscriptions",
    params(SubscriptionListQuery, Consistency),
    responses((status = 200, description = "A page of subscriptions", body = SubscriptionList,
        headers(("Annals-Position" = u64, description = "How far the read model had read the log"))),
        QueryProblems),
    security(("bearer" = ["analyst"])))]
async fn list_subscriptions(
    State(app): State<Arc<App>>,
    Params(query): Params<SubscriptionListQuery>,
    Params(consistency): Params<Consistency>,
) -> Result<Response, ApiError> {
    if let Some(status) = &query.status {
        SubscriptionStatus::parse(status)
            .filter(|s| *s != SubscriptionStatus::Absent)
            .ok_or_else(|| {
                ApiError::invalid(
                    "invalid-parameter",
                    format!("status {status:?} is not one of: active, churned"),
                )
            })?;
    }
    let limit = limit(query.limit);
    let (mut snapshot, position) =
        snapshot(&app, &[subscription_board::NAME], consistency.position()).await?;
    let filter = SubscriptionFilter {
        status: query.status,
        account_id: query.account_id.map(|id| id.to_string()),
    };
    let page = snapshot
        .subscriptions(&filter, limit, query.cursor.as_deref())
        .await?;
    snapshot.finish().await?;
    Ok(with_position(
        position,
        Json(SubscriptionList {
            items: page.items.into_iter().map(subscription_view).collect(),
            next_cursor: page.next_cursor,
        }),
    ))
}

/// One subscription.
#[utoipa::path(get, path = "/subscriptions/{id}", tag = "subscriptions",
    params(("id" = Uuid, Path), Consistency),
    responses((status = 200, description = "The subscription", body = SubscriptionView,
        headers(("Annals-Position" = u64, description = "How far the read model had read the log"))),
        QueryProblems),
    security(("bearer" = ["analyst"])))]
async fn get_subscription(
    State(app): State<Arc<App>>,
    Id(id): Id,
    Params(consistency): Params<Consistency>,
) -> Result<Response, ApiError> {
    let (mut snapshot, position) =
        snapshot(&app, &[subscription_board::NAME], consistency.position()).await?;
    let found = snapshot.subscription(&id.to_string()).await?;
    snapshot.finish().await?;
    let found = found.ok_or_else(|| {
        ApiError::not_found("subscription-not-found", "the subscription does not exist")
    })?;
    Ok(with_position(position, Json(subscription_view(found))))
}

/// Expand an active subscription to a higher MRR (upsell, cross-sell).
#[utoipa::path(post, path = "/subscriptions/{id}/expand", tag = "subscriptions",
    request_body = ExpandMrr, params(("id" = Uuid, Path), CommandHeaders),
    responses((status = 200, description = "Expanded", body = CommandAnswer), CommandProblems),
    security(("bearer" = ["writer"])))]
async fn expand_subscription(
    State(app): State<Arc<App>>,
    Id(id): Id,
    meta: CommandMeta,
    body: JsonBody<ExpandMrr>,
) -> Result<Json<CommandAnswer>, ApiError> {
    let command = SubscriptionCommand::Expand {
        mrr: body.value.mrr.parse()?,
    };
    let outcome = execute::<Subscription>(&app, id, command, &meta, &body.digest).await?;
    Ok(Json(answer(outcome)))
}

/// Contract an active subscription to a lower MRR, above zero (a downgrade).
#[utoipa::path(post, path = "/subscriptions/{id}/contract", tag = "subscriptions",
    request_body = ContractMrr, params(("id" = Uuid, Path), CommandHeaders),
    responses((status = 200, description = "Contracted", body = CommandAnswer), CommandProblems),
    security(("bearer" = ["writer"])))]
async fn contract_subscription(
    State(app): State<Arc<App>>,
    Id(id): Id,
    meta: CommandMeta,
    body: JsonBody<ContractMrr>,
) -> Result<Json<CommandAnswer>, ApiError> {
    let command = SubscriptionCommand::Contract {
        mrr: body.value.mrr.parse()?,
    };
    let outcome = execute::<Subscription>(&app, id, command, &meta, &body.digest).await?;
    Ok(Json(answer(outcome)))
}

/// Churn an active subscription: its MRR is lost.
#[utoipa::path(post, path = "/subscriptions/{id}/churn", tag = "subscriptions",
    request_body = ChurnSubscription, params(("id" = Uuid, Path), CommandHeaders),
    responses((status = 200, description = "Churned", body = CommandAnswer), CommandProblems),
    security(("bearer" = ["writer"])))]
async fn churn_subscription(
    State(app): State<Arc<App>>,
    Id(id): Id,
    meta: CommandMeta,
    body: JsonBody<ChurnSubscription>,
) -> Result<Json<CommandAnswer>, ApiError> {
    let command = SubscriptionCommand::Churn {
        reason: optional(body.value.reason.as_deref(), Reason::parse)?,
    };
    let outcome = execute::<Subscription>(&app, id, command, &meta, &body.digest).await?;
    Ok(Json(answer(outcome)))
}

/// A subscription as it was at a version or a time (now without either), from its
/// events.
#[utoipa::path(get, path = "/subscriptions/{id}/history", tag = "history",
    params(("id" = Uuid, Path), HistoryQuery),
    responses((status = 200, description = "The subscription's state", body = HistoryView), QueryProblems),
    security(("bearer" = ["analyst"])))]
async fn subscription_history(
    State(app): State<Arc<App>>,
    Id(id): Id,
    Params(query): Params<HistoryQuery>,
) -> Result<Json<HistoryView>, ApiError> {
    let missing = ApiError::not_found("subscription-not-found", "the subscription does not exist");
    history(&app.system.handler::<Subscription>(), id, query, missing).await
}
