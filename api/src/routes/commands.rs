//! Command endpoints: a body becomes a domain command (validated by the domain's value
//! objects), the facts a rule needs are looked up, and the command handler decides and
//! appends. Creates answer 201 with a `Location`; everything else 200.

use std::sync::Arc;
use std::time::Instant;

use annals_commands::{CommandError, CommandHandler, CommandOutcome};
use annals_domain::account::AccountCommand;
use annals_domain::deal::DealCommand;
use annals_domain::lead::{ConversionAccount, ConversionDeal, LeadCommand};
use annals_domain::values::{
    Email, Label, Name, Owner, PersonName, Reason, SignalKind, Source, Stage, Tier,
};
use annals_domain::{Aggregate, Command};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::dto::*;
use crate::error::ApiError;
use crate::extract::{CommandMeta, Id, JsonBody};
use crate::observe;
use crate::openapi::CommandProblems;
use crate::server::App;

pub fn routes() -> OpenApiRouter<Arc<App>> {
    OpenApiRouter::new()
        .routes(routes!(capture_lead))
        .routes(routes!(record_signal))
        .routes(routes!(assign_lead))
        .routes(routes!(disqualify_lead))
        .routes(routes!(convert_lead))
        .routes(routes!(open_account))
        .routes(routes!(rename_account))
        .routes(routes!(set_account_tier))
        .routes(routes!(open_deal))
        .routes(routes!(advance_deal))
        .routes(routes!(change_deal_amount))
        .routes(routes!(win_deal))
        .routes(routes!(lose_deal))
}

/// Runs a command and records its outcome in the metrics.
async fn execute<A: Aggregate>(
    handler: &CommandHandler<A>,
    id: Uuid,
    command: A::Command,
    meta: &CommandMeta,
    body_digest: &str,
) -> Result<CommandOutcome, ApiError> {
    let name = command.name();
    let started = Instant::now();
    let result = handler
        .execute(id, command, &meta.context(body_digest))
        .await;
    record(name, &result, started);
    Ok(result?)
}

/// Records a command's outcome in the metrics.
fn record<T>(command: &str, result: &Result<T, CommandError>, started: Instant) {
    let outcome = match result {
        Ok(_) => "ok",
        Err(error) => ApiError::Command(error.clone()).code(),
    };
    observe::command_done(command, outcome, started.elapsed());
}

fn answer(outcome: CommandOutcome) -> CommandAnswer {
    CommandAnswer {
        id: outcome.id,
        version: outcome.version,
        position: outcome.position,
        events: outcome.events,
        account_id: None,
        deal_id: None,
    }
}

/// 201 with the new aggregate's address.
fn created(collection: &str, outcome: CommandOutcome) -> Response {
    let location = format!("/{collection}/{}", outcome.id);
    let mut response = (StatusCode::CREATED, Json(answer(outcome))).into_response();
    if let Ok(location) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

fn optional<T>(
    value: Option<&str>,
    parse: impl Fn(&str) -> Result<T, annals_domain::DomainError>,
) -> Result<Option<T>, ApiError> {
    Ok(value.map(parse).transpose()?)
}

/// Capture a lead.
#[utoipa::path(post, path = "/leads", tag = "leads",
    request_body = CaptureLead, params(CommandHeaders),
    responses((status = 201, description = "Captured", body = CommandAnswer), CommandProblems),
    security(("bearer" = ["writer"])))]
async fn capture_lead(
    State(app): State<Arc<App>>,
    meta: CommandMeta,
    body: JsonBody<CaptureLead>,
) -> Result<Response, ApiError> {
    let b = &body.value;
    let id = b.id.unwrap_or_else(Uuid::now_v7);
    let command = LeadCommand::Capture {
        lead_id: id,
        email: Email::parse(&b.email)?,
        name: PersonName::parse(&b.name)?,
        company: optional(b.company.as_deref(), Label::parse)?,
        source: Source::parse(&b.source)?,
    };
    let outcome = execute(&app.system.leads, id, command, &meta, &body.digest).await?;
    Ok(created("leads", outcome))
}

/// Record a signal; the lead qualifies when its score first reaches 50.
#[utoipa::path(post, path = "/leads/{id}/signals", tag = "leads",
    request_body = RecordSignal, params(("id" = Uuid, Path), CommandHeaders),
    responses((status = 200, description = "Recorded", body = CommandAnswer), CommandProblems),
    security(("bearer" = ["writer"])))]
async fn record_signal(
    State(app): State<Arc<App>>,
    Id(id): Id,
    meta: CommandMeta,
    body: JsonBody<RecordSignal>,
) -> Result<Json<CommandAnswer>, ApiError> {
    let command = LeadCommand::RecordSignal {
        kind: SignalKind::parse(&body.value.kind)?,
        occurred_at: body.value.occurred_at,
    };
    let outcome = execute(&app.system.leads, id, command, &meta, &body.digest).await?;
    Ok(Json(answer(outcome)))
}

/// Assign the lead to an owner; a new lead becomes working.
#[utoipa::path(post, path = "/leads/{id}/assign", tag = "leads",
    request_body = AssignLead, params(("id" = Uuid, Path), CommandHeaders),
    responses((status = 200, description = "Assigned", body = CommandAnswer), CommandProblems),
    security(("bearer" = ["writer"])))]
async fn assign_lead(
    State(app): State<Arc<App>>,
    Id(id): Id,
    meta: CommandMeta,
    body: JsonBody<AssignLead>,
) -> Result<Json<CommandAnswer>, ApiError> {
    let command = LeadCommand::Assign {
        owner: Owner::parse(&body.value.owner)?,
    };
    let outcome = execute(&app.system.leads, id, command, &meta, &body.digest).await?;
    Ok(Json(answer(outcome)))
}

/// Disqualify an open lead.
#[utoipa::path(post, path = "/leads/{id}/disqualify", tag = "leads",
    request_body = DisqualifyLead, params(("id" = Uuid, Path), CommandHeaders),
    responses((status = 200, description = "Disqualified", body = CommandAnswer), CommandProblems),
    security(("bearer" = ["writer"])))]
async fn disqualify_lead(
    State(app): State<Arc<App>>,
    Id(id): Id,
    meta: CommandMeta,
    body: JsonBody<DisqualifyLead>,
) -> Result<Json<CommandAnswer>, ApiError> {
    let command = LeadCommand::Disqualify {
        reason: Reason::parse(&body.value.reason)?,
    };
    let outcome = execute(&app.system.leads, id, command, &meta, &body.digest).await?;
    Ok(Json(answer(outcome)))
}

/// Convert a qualified lead; the conversion process then opens the account (when new)
/// and the deal.
#[utoipa::path(post, path = "/leads/{id}/convert", tag = "leads",
    request_body = ConvertLead, params(("id" = Uuid, Path), CommandHeaders),
    responses((status = 200, description = "Converted; `account_id` and `deal_id` name what the conversion opens", body = CommandAnswer), CommandProblems),
    security(("bearer" = ["writer"])))]
async fn convert_lead(
    State(app): State<Arc<App>>,
    Id(id): Id,
    meta: CommandMeta,
    body: JsonBody<ConvertLead>,
) -> Result<Json<CommandAnswer>, ApiError> {
    let b = &body.value;
    let deal_name = Name::parse(&b.deal_name)?;
    let amount = b.amount.parse()?;
    let account = match b.account_id {
        None => ConversionAccount::New(Uuid::now_v7()),
        Some(named) if app.system.accounts.exists(named).await? => {
            ConversionAccount::Existing(named)
        }
        Some(named) => ConversionAccount::Unknown(named),
    };
    let deal = match b.deal_id {
        None => ConversionDeal::New(Uuid::now_v7()),
        Some(given) if app.system.deals.exists(given).await? => ConversionDeal::Taken(given),
        Some(given) => ConversionDeal::New(given),
    };
    let command = LeadCommand::Convert {
        deal_name,
        amount,
        account,
        deal,
    };
    // The answer names what the lead was converted into, also when it is a retry's
    // (whichever server carried out the first try).
    let name = command.name();
    let started = Instant::now();
    let result = app
        .system
        .leads
        .convert(id, command, &meta.context(&body.digest))
        .await;
    record(name, &result, started);
    let conversion = result?;
    let mut answer = answer(conversion.outcome);
    answer.account_id = conversion.account_id;
    answer.deal_id = conversion.deal_id;
    Ok(Json(answer))
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
    let outcome = execute(&app.system.accounts, id, command, &meta, &body.digest).await?;
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
    let command = AccountCommand::Rename {
        name: Name::parse(&body.value.name)?,
    };
    let outcome = execute(&app.system.accounts, id, command, &meta, &body.digest).await?;
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
    let command = AccountCommand::SetTier {
        tier: Tier::parse(&body.value.tier)?,
    };
    let outcome = execute(&app.system.accounts, id, command, &meta, &body.digest).await?;
    Ok(Json(answer(outcome)))
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
        account_exists: app.system.accounts.exists(b.account_id).await?,
    };
    let outcome = execute(&app.system.deals, id, command, &meta, &body.digest).await?;
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
    let command = DealCommand::Advance {
        stage: Stage::parse(&body.value.stage)?,
    };
    let outcome = execute(&app.system.deals, id, command, &meta, &body.digest).await?;
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
    let command = DealCommand::ChangeAmount {
        amount: body.value.amount.parse()?,
    };
    let outcome = execute(&app.system.deals, id, command, &meta, &body.digest).await?;
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
    let outcome = execute(&app.system.deals, id, DealCommand::Win, &meta, &body.digest).await?;
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
    let command = DealCommand::Lose {
        reason: Reason::parse(&body.value.reason)?,
    };
    let outcome = execute(&app.system.deals, id, command, &meta, &body.digest).await?;
    Ok(Json(answer(outcome)))
}
