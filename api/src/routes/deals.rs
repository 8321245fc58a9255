//! Deals: opening, stages, amounts, winning and losing; the deal board's list and one deal;
//! a deal's history.

use std::sync::Arc;

use annals_consumers::queries::DealFilter;
use annals_consumers::read_models::deal_board;
use annals_consumers::read_models::deal_board::DealRow;
use annals_domain::DomainError;
use annals_domain::account::Account;
use annals_domain::deal::{Deal, DealCommand, DealStatus};
use annals_domain::values::{Name, Owner, Reason, Stage};
use axum::Json;
use axum::extract::State;
use axum::response::Response;
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::{answer, created, execute, history, optional, resource, snapshot, with_position};
use crate::contract::Limit;
use crate::dto::*;
use crate::error::ApiError;
use crate::extract::{CommandMeta, Id, JsonBody, Params, limit};
use crate::openapi::{CommandProblems, QueryProblems};
use crate::server::App;

pub fn routes() -> OpenApiRouter<Arc<App>> {
    resource("deals")
        .routes(routes!(open_deal))
        .routes(routes!(advance_deal))
        .routes(routes!(change_deal_amount))
        .routes(routes!(win_deal))
        .routes(routes!(lose_deal))
        .routes(routes!(list_deals))
        .routes(routes!(get_deal))
        .routes(routes!(deal_history))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenDeal {
    pub id: Option<Uuid>,
    pub account_id: Uuid,
    /// 1–200 characters once trimmed.
    pub name: String,
    #[serde(deserialize_with = "crate::contract::object")]
    pub amount: MoneyBody,
    /// 1–100 characters once trimmed.
    pub owner: Option<String>,
    pub expected_close: Option<NaiveDate>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"stage": "demo"}))]
pub struct AdvanceDeal {
    /// `qualification`, `demo`, `proposal` or `negotiation`: a later stage than now.
    pub stage: String,
}

impl TryFrom<&AdvanceDeal> for DealCommand {
    type Error = DomainError;

    fn try_from(body: &AdvanceDeal) -> Result<Self, DomainError> {
        Ok(DealCommand::Advance {
            stage: Stage::parse(&body.stage)?,
        })
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeDealAmount {
    #[serde(deserialize_with = "crate::contract::object")]
    pub amount: MoneyBody,
}

impl TryFrom<&ChangeDealAmount> for DealCommand {
    type Error = DomainError;

    fn try_from(body: &ChangeDealAmount) -> Result<Self, DomainError> {
        Ok(DealCommand::ChangeAmount {
            amount: body.amount.parse()?,
        })
    }
}

/// An empty object (the body may also be left out).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WinDeal {}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoseDeal {
    /// 1–500 characters once trimmed.
    pub reason: String,
}

impl TryFrom<&LoseDeal> for DealCommand {
    type Error = DomainError;

    fn try_from(body: &LoseDeal) -> Result<Self, DomainError> {
        Ok(DealCommand::Lose {
            reason: Reason::parse(&body.reason)?,
        })
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DealListQuery {
    /// A stage (`prospecting` … `negotiation`: open deals at it) or `won` / `lost`.
    pub stage: Option<String>,
    #[param(pattern = r"^[^\x00]*$")]
    pub owner: Option<String>,
    pub account_id: Option<Uuid>,
    /// Default 50.
    #[param(inline)]
    pub limit: Option<Limit>,
    /// A `next_cursor` from an earlier page.
    #[param(pattern = r"^-?[0-9]{1,19}_[0-9A-Za-z:.\-]{0,64}$")]
    pub cursor: Option<String>,
}

/// One deal of the deal board.
#[derive(Debug, Serialize, ToSchema)]
pub struct DealItem {
    pub id: String,
    pub account_id: String,
    pub name: String,
    /// The last stage it reached.
    pub stage: String,
    /// `open`, `won` or `lost`.
    pub status: String,
    pub amount: MoneyBody,
    pub owner: Option<String>,
    pub expected_close: Option<String>,
    pub opened_at: String,
    pub closed_at: Option<String>,
    pub lost_reason: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DealList {
    pub items: Vec<DealItem>,
    pub next_cursor: Option<String>,
}

fn deal_item(view: DealRow) -> DealItem {
    DealItem {
        id: view.deal_id,
        account_id: view.account_id,
        name: view.name,
        stage: view.stage,
        status: view.status.as_str().to_owned(),
        amount: MoneyBody {
            currency: view.currency,
            amount_minor: view.amount_minor,
        },
        owner: view.owner,
        expected_close: view.expected_close,
        opened_at: view.opened_at,
        closed_at: view.closed_at,
        lost_reason: view.lost_reason,
    }
}

/// Open a deal for an existing account, at `prospecting`.
#[utoipa::path(post, path = "/deals", tag = "deals",
    request_body = OpenDeal, params(CommandHeaders),
    responses((status = 201, description = "Opened", body = CommandAnswer), CommandProblems),
    security(("bearer" = ["writer"])))]
async fn open_deal(
    State(app): State<Arc<App>>,
    meta: CommandMeta,
    body: JsonBody<OpenDeal>,
) -> Result<Response, ApiError> {
    let b = &body.value;
    let id = b.id.unwrap_or_else(Uuid::now_v7);
    let command = DealCommand::Open {
        deal_id: id,
        account_id: b.account_id,
        name: Name::parse(&b.name)?,
        amount: b.amount.parse()?,
        owner: optional(b.owner.as_deref(), Owner::parse)?,
        expected_close: b.expected_close,
        account_exists: app.system.handler::<Account>().exists(b.account_id).await?,
    };
    let outcome = execute::<Deal>(&app, id, command, &meta, &body.digest).await?;
    Ok(created("deals", outcome))
}

/// Move an open deal to a later stage (skipping allowed).
#[utoipa::path(post, path = "/deals/{id}/advance", tag = "deals",
    request_body = AdvanceDeal, params(("id" = Uuid, Path), CommandHeaders),
    responses((status = 200, description = "Advanced", body = CommandAnswer), CommandProblems),
    security(("bearer" = ["writer"])))]
async fn advance_deal(
    State(app): State<Arc<App>>,
    Id(id): Id,
    meta: CommandMeta,
    body: JsonBody<AdvanceDeal>,
) -> Result<Json<CommandAnswer>, ApiError> {
    let command = DealCommand::try_from(&body.value)?;
    let outcome = execute::<Deal>(&app, id, command, &meta, &body.digest).await?;
    Ok(Json(answer(outcome)))
}

/// Change an open deal's amount (same currency).
#[utoipa::path(post, path = "/deals/{id}/amount", tag = "deals",
    request_body = ChangeDealAmount, params(("id" = Uuid, Path), CommandHeaders),
    responses((status = 200, description = "Amount changed", body = CommandAnswer), CommandProblems),
    security(("bearer" = ["writer"])))]
async fn change_deal_amount(
    State(app): State<Arc<App>>,
    Id(id): Id,
    meta: CommandMeta,
    body: JsonBody<ChangeDealAmount>,
) -> Result<Json<CommandAnswer>, ApiError> {
    let command = DealCommand::try_from(&body.value)?;
    let outcome = execute::<Deal>(&app, id, command, &meta, &body.digest).await?;
    Ok(Json(answer(outcome)))
}

/// Win an open deal.
#[utoipa::path(post, path = "/deals/{id}/win", tag = "deals",
    request_body(content = WinDeal, description = "An empty object, or no body"),
    params(("id" = Uuid, Path), CommandHeaders),
    responses((status = 200, description = "Won", body = CommandAnswer), CommandProblems),
    security(("bearer" = ["writer"])))]
async fn win_deal(
    State(app): State<Arc<App>>,
    Id(id): Id,
    meta: CommandMeta,
    body: JsonBody<WinDeal>,
) -> Result<Json<CommandAnswer>, ApiError> {
    let outcome = execute::<Deal>(&app, id, DealCommand::Win, &meta, &body.digest).await?;
    Ok(Json(answer(outcome)))
}

/// Lose an open deal.
#[utoipa::path(post, path = "/deals/{id}/lose", tag = "deals",
    request_body = LoseDeal, params(("id" = Uuid, Path), CommandHeaders),
    responses((status = 200, description = "Lost", body = CommandAnswer), CommandProblems),
    security(("bearer" = ["writer"])))]
async fn lose_deal(
    State(app): State<Arc<App>>,
    Id(id): Id,
    meta: CommandMeta,
    body: JsonBody<LoseDeal>,
) -> Result<Json<CommandAnswer>, ApiError> {
    let command = DealCommand::try_from(&body.value)?;
    let outcome = execute::<Deal>(&app, id, command, &meta, &body.digest).await?;
    Ok(Json(answer(outcome)))
}

/// The deal board, in the order deals were opened.
#[utoipa::path(get, path = "/deals", tag = "deals",
    params(DealListQuery, Consistency),
    responses((status = 200, description = "A page of deals", body = DealList,
        headers(("Annals-Position" = u64, description = "How far the read model had read the log"))),
        QueryProblems),
    security(("bearer" = ["analyst"])))]
async fn list_deals(
    State(app): State<Arc<App>>,
    Params(query): Params<DealListQuery>,
    Params(consistency): Params<Consistency>,
) -> Result<Response, ApiError> {
    if let Some(stage) = &query.stage
        && DealStatus::closed(stage).is_none()
    {
        Stage::parse(stage)?;
    }
    let limit = limit(query.limit);
    let (mut snapshot, position) =
        snapshot(&app, &[deal_board::NAME], consistency.position()).await?;
    let filter = DealFilter {
        stage: query.stage,
        owner: query.owner,
        account_id: query.account_id.map(|id| id.to_string()),
    };
    let page = snapshot
        .deals(&filter, limit, query.cursor.as_deref())
        .await?;
    snapshot.finish().await?;
    Ok(with_position(
        position,
        Json(DealList {
            items: page.items.into_iter().map(deal_item).collect(),
            next_cursor: page.next_cursor,
        }),
    ))
}

/// One deal, as the deal board shows it.
#[utoipa::path(get, path = "/deals/{id}", tag = "deals",
    params(("id" = Uuid, Path), Consistency),
    responses((status = 200, description = "The deal", body = DealItem,
        headers(("Annals-Position" = u64, description = "How far the read model had read the log"))),
        QueryProblems),
    security(("bearer" = ["analyst"])))]
async fn get_deal(
    State(app): State<Arc<App>>,
    Id(id): Id,
    Params(consistency): Params<Consistency>,
) -> Result<Response, ApiError> {
    let (mut snapshot, position) =
        snapshot(&app, &[deal_board::NAME], consistency.position()).await?;
    let deal = snapshot.deal(&id.to_string()).await?;
    snapshot.finish().await?;
    let deal =
        deal.ok_or_else(|| ApiError::not_found("deal-not-found", "the deal does not exist"))?;
    Ok(with_position(position, Json(deal_item(deal))))
}

/// A deal as it was at a version or a time (now without either), from its events.
#[utoipa::path(get, path = "/deals/{id}/history", tag = "history",
    params(("id" = Uuid, Path), HistoryQuery),
    responses((status = 200, description = "The deal's state", body = HistoryView), QueryProblems),
    security(("bearer" = ["analyst"])))]
async fn deal_history(
    State(app): State<Arc<App>>,
    Id(id): Id,
    Params(query): Params<HistoryQuery>,
) -> Result<Json<HistoryView>, ApiError> {
    let missing = ApiError::not_found("deal-not-found", "the deal does not exist");
    history(&app.system.handler::<Deal>(), id, query, missing).await
}
