//! Accounts: opening, renaming, tiers; the account 360 view; an account's history.

use std::sync::Arc;

use annals_consumers::read_models::order_board;
use annals_consumers::read_models::subscription_board;
use annals_consumers::read_models::{account_360, deal_board, lead_board};
use annals_domain::DomainError;
use annals_domain::account::{Account, AccountCommand};
use annals_domain::values::{Label, Name, Tier};
use axum::Json;
use axum::extract::State;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::{answer, created, execute, history, optional, resource, snapshot, with_position};
use crate::dto::*;
use crate::error::ApiError;
use crate::extract::{CommandMeta, Id, JsonBody, Params};
use crate::openapi::{CommandProblems, QueryProblems};
use crate::server::App;

pub fn routes() -> OpenApiRouter<Arc<App>> {
    resource("accounts")
        .routes(routes!(open_account))
        .routes(routes!(rename_account))
        .routes(routes!(set_account_tier))
        .routes(routes!(get_account))
        .routes(routes!(account_history))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "Initech", "domain": "initech.example", "employees": 40, "tier": "key"}))]
pub struct OpenAccount {
    pub id: Option<Uuid>,
    /// 1–200 characters once trimmed.
    pub name: String,
    /// 1–200 characters once trimmed.
    pub domain: Option<String>,
    /// 1–200 characters once trimmed.
    pub industry: Option<String>,
    /// Not negative (`negative-number` otherwise).
    #[schema(minimum = 0, maximum = 9_223_372_036_854_775_807_i64)]
    #[serde(default, deserialize_with = "crate::contract::optional_integer")]
    pub employees: Option<i64>,
    /// `standard` (the default) or `key`.
    pub tier: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenameAccount {
    /// 1–200 characters once trimmed.
    pub name: String,
}

impl TryFrom<&RenameAccount> for AccountCommand {
    type Error = DomainError;

    fn try_from(body: &RenameAccount) -> Result<Self, DomainError> {
        Ok(AccountCommand::Rename {
            name: Name::parse(&body.name)?,
        })
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"tier": "key"}))]
pub struct SetAccountTier {
    pub tier: String,
}

impl TryFrom<&SetAccountTier> for AccountCommand {
    type Error = DomainError;

    fn try_from(body: &SetAccountTier) -> Result<Self, DomainError> {
        Ok(AccountCommand::SetTier {
            tier: Tier::parse(&body.tier)?,
        })
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AccountDealItem {
    pub id: String,
    pub name: String,
    pub stage: String,
    pub status: String,
    pub amount: MoneyBody,
}

/// One order of an account.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountOrderItem {
    pub id: String,
    /// `placed`, `invoiced`, `paid`, `fulfilled` or `cancelled`.
    pub status: String,
    pub total: MoneyBody,
}

/// An account with its deals, converted leads and won amounts.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountView {
    pub id: String,
    pub name: String,
    pub domain: Option<String>,
    pub industry: Option<String>,
    pub employees: Option<i64>,
    pub tier: String,
    pub deals: Vec<AccountDealItem>,
    pub converted_leads: Vec<String>,
    /// Won amount per currency.
    pub won: Vec<MoneyBody>,
    /// Its first 100 orders, in the order they were placed.
    pub orders: Vec<AccountOrderItem>,
    /// Its monthly recurring revenue now (active subscriptions), per currency.
    pub mrr: Vec<MoneyBody>,
}

/// Open an account.
#[utoipa::path(post, path = "/accounts", tag = "accounts",
    request_body = OpenAccount, params(CommandHeaders),
    responses((status = 201, description = "Opened", body = CommandAnswer), CommandProblems),
    security(("bearer" = ["writer"])))]
async fn open_account(
    State(app): State<Arc<App>>,
    meta: CommandMeta,
    body: JsonBody<OpenAccount>,
) -> Result<Response, ApiError> {
    let b = &body.value;
    let id = b.id.unwrap_or_else(Uuid::now_v7);
    let command = AccountCommand::Open {
        account_id: id,
        name: Name::parse(&b.name)?,
        domain: optional(b.domain.as_deref(), Label::parse)?,
        industry: optional(b.industry.as_deref(), Label::parse)?,
        employees: b.employees.map(AccountCommand::employees).transpose()?,
        tier: optional(b.tier.as_deref(), Tier::parse)?.unwrap_or_default(),
    };
    let outcome = execute::<Account>(&app, id, command, &meta, &body.digest).await?;
    Ok(created("accounts", outcome))
}

/// Rename an account.
#[utoipa::path(post, path = "/accounts/{id}/rename", tag = "accounts",
    request_body = RenameAccount, params(("id" = Uuid, Path), CommandHeaders),
    responses((status = 200, description = "Renamed", body = CommandAnswer), CommandProblems),
    security(("bearer" = ["writer"])))]
async fn rename_account(
    State(app): State<Arc<App>>,
    Id(id): Id,
    meta: CommandMeta,
    body: JsonBody<RenameAccount>,
) -> Result<Json<CommandAnswer>, ApiError> {
    let command = AccountCommand::try_from(&body.value)?;
    let outcome = execute::<Account>(&app, id, command, &meta, &body.digest).await?;
    Ok(Json(answer(outcome)))
}

/// Change an account's tier.
#[utoipa::path(post, path = "/accounts/{id}/tier", tag = "accounts",
    request_body = SetAccountTier, params(("id" = Uuid, Path), CommandHeaders),
    responses((status = 200, description = "Tier changed", body = CommandAnswer), CommandProblems),
    security(("bearer" = ["writer"])))]
async fn set_account_tier(
    State(app): State<Arc<App>>,
    Id(id): Id,
    meta: CommandMeta,
    body: JsonBody<SetAccountTier>,
) -> Result<Json<CommandAnswer>, ApiError> {
    let command = AccountCommand::try_from(&body.value)?;
    let outcome = execute::<Account>(&app, id, command, &meta, &body.digest).await?;
    Ok(Json(answer(outcome)))
}

/// The account 360 view: the account, its deals, its converted leads, its won amounts.
#[utoipa::path(get, path = "/accounts/{id}", tag = "accounts",
    params(("id" = Uuid, Path), Consistency),
    responses((status = 200, description = "The account", body = AccountView,
        headers(("Annals-Position" = u64, description = "How far the read models had read the log"))),
        QueryProblems),
    security(("bearer" = ["analyst"])))]
async fn get_account(
    State(app): State<Arc<App>>,
    Id(id): Id,
    Params(consistency): Params<Consistency>,
) -> Result<Response, ApiError> {
    let (mut snapshot, position) = snapshot(
        &app,
        &[
            account_360::NAME,
            deal_board::NAME,
            lead_board::NAME,
            order_board::NAME,
            subscription_board::NAME,
        ],
        consistency.position(),
    )
    .await?;
    let account = snapshot.account_360(&id.to_string()).await?;
    snapshot.finish().await?;
    let account = account
        .ok_or_else(|| ApiError::not_found("account-not-found", "the account does not exist"))?;
    let money = |currency: String, amount_minor: i64| MoneyBody {
        currency,
        amount_minor,
    };
    Ok(with_position(
        position,
        Json(AccountView {
            id: account.account_id,
            name: account.name,
            domain: account.domain,
            industry: account.industry,
            employees: account.employees,
            tier: account.tier,
            deals: account
                .deals
                .into_iter()
                .map(|d| AccountDealItem {
                    id: d.deal_id,
                    name: d.name,
                    stage: d.stage,
                    status: d.status,
                    amount: money(d.currency, d.amount_minor),
                })
                .collect(),
            converted_leads: account.converted_leads,
            won: account.won.into_iter().map(|(c, a)| money(c, a)).collect(),
            orders: account
                .orders
                .into_iter()
                .map(|o| AccountOrderItem {
                    id: o.order_id,
                    status: o.status,
                    total: money(o.currency, o.total_minor),
                })
                .collect(),
            mrr: account.mrr.into_iter().map(|(c, a)| money(c, a)).collect(),
        }),
    ))
}

/// An account as it was at a version or a time (now without either), from its events.
#[utoipa::path(get, path = "/accounts/{id}/history", tag = "history",
    params(("id" = Uuid, Path), HistoryQuery),
    responses((status = 200, description = "The account's state", body = HistoryView), QueryProblems),
    security(("bearer" = ["analyst"])))]
async fn account_history(
    State(app): State<Arc<App>>,
    Id(id): Id,
    Params(query): Params<HistoryQuery>,
) -> Result<Json<HistoryView>, ApiError> {
    let missing = ApiError::not_found("account-not-found", "the account does not exist");
    history(&app.system.handler::<Account>(), id, query, missing).await
}
