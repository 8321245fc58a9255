//! Subscriptions (recurring revenue): expanding, contracting and churning one; its
//! history. The order process starts them (no route of its own).

use std::sync::Arc;

use annals_domain::subscription::{Subscription, SubscriptionCommand};
use annals_domain::values::Reason;
use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{answer, execute, history, optional, resource};
use crate::dto::*;
use crate::error::ApiError;
use crate::extract::{CommandMeta, Id, JsonBody, Params};
use crate::openapi::{CommandProblems, QueryProblems};
use crate::server::App;

pub fn routes() -> OpenApiRouter<Arc<App>> {
    resource("subscriptions")
        .routes(routes!(expand_subscription))
        .routes(routes!(contract_subscription))
        .routes(routes!(churn_subscription))
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
