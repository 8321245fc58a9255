//! Leads: capture, signals, assignment, disqualification and conversion; the lead board's
//! list and one lead; a lead's history; erasure and the right of access (`domain.md`,
//! Erasure).

use std::sync::Arc;
use std::time::Instant;

use annals_commands::{CommandError, CommandHandler};
use annals_consumers::queries::LeadFilter;
use annals_consumers::read_models::lead_board;
use annals_consumers::read_models::lead_board::LeadRow;
use annals_domain::Command;
use annals_domain::DomainError;
use annals_domain::account::Account;
use annals_domain::deal::Deal;
use annals_domain::lead::{ConversionAccount, ConversionDeal, Lead, LeadCommand, LeadStatus};
use annals_domain::values::{Email, Label, Name, Owner, PersonName, Reason, SignalKind, Source};
use annals_store::Direction;
use axum::Json;
use axum::extract::State;
use axum::http::Method;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::{
    answer, created, execute, history, optional, record, resource, snapshot, with_position,
};
use crate::contract::{Count, Limit};
use crate::dto::*;
use crate::error::{ApiError, Problem};
use crate::extract::{CommandMeta, Id, JsonBody, Params, limit};
use crate::openapi::{CommandProblems, QueryProblems};
use crate::server::App;
use crate::system::System;

pub fn routes() -> OpenApiRouter<Arc<App>> {
    resource("leads")
        .routes(routes!(capture_lead))
        .routes(routes!(record_signal))
        .routes(routes!(assign_lead))
        .routes(routes!(disqualify_lead))
        .routes(routes!(convert_lead))
        .routes(routes!(list_leads))
        .routes(routes!(get_lead))
        .routes(routes!(lead_history))
        .routes(routes!(erase_lead))
        .routes(routes!(lead_personal_data))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"email": "ada@example.com", "name": "Ada Lovelace", "company": "Analytical Engines", "source": "web"}))]
pub struct CaptureLead {
    /// The id the client wants (idempotent creation); the server makes a UUIDv7 otherwise.
    pub id: Option<Uuid>,
    /// One `@`, a dot after it, at most 254 characters (the pattern says exactly
    /// which); stored trimmed and lower-cased.
    #[schema(min_length = 1, max_length = 254)]
    pub email: String,
    /// 1–200 characters once trimmed (the pattern says so).
    pub name: String,
    /// 1–200 characters once trimmed (the pattern says so).
    pub company: Option<String>,
    /// `web`, `event`, `referral`, `outbound` or `partner`.
    pub source: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"kind": "demo_request"}))]
pub struct RecordSignal {
    /// `page_view`, `email_open`, `email_click`, `content_download`, `webinar_attended`,
    /// `pricing_page_view` or `demo_request`.
    pub kind: String,
    pub occurred_at: Option<DateTime<Utc>>,
}

impl TryFrom<&RecordSignal> for LeadCommand {
    type Error = DomainError;

    fn try_from(body: &RecordSignal) -> Result<Self, DomainError> {
        Ok(LeadCommand::RecordSignal {
            kind: SignalKind::parse(&body.kind)?,
            occurred_at: body.occurred_at,
        })
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"owner": "grace"}))]
pub struct AssignLead {
    /// 1–100 characters once trimmed.
    pub owner: String,
}

impl TryFrom<&AssignLead> for LeadCommand {
    type Error = DomainError;

    fn try_from(body: &AssignLead) -> Result<Self, DomainError> {
        Ok(LeadCommand::Assign {
            owner: Owner::parse(&body.owner)?,
        })
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"reason": "no budget this year"}))]
pub struct DisqualifyLead {
    /// 1–500 characters once trimmed.
    pub reason: String,
}

impl TryFrom<&DisqualifyLead> for LeadCommand {
    type Error = DomainError;

    fn try_from(body: &DisqualifyLead) -> Result<Self, DomainError> {
        Ok(LeadCommand::Disqualify {
            reason: Reason::parse(&body.reason)?,
        })
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"deal_name": "Engines for Acme", "amount": {"currency": "EUR", "amount_minor": 129900}}))]
pub struct ConvertLead {
    /// 1–200 characters once trimmed.
    pub deal_name: String,
    #[serde(deserialize_with = "crate::contract::object")]
    pub amount: MoneyBody,
    /// An existing account to convert into; a new account is opened otherwise.
    pub account_id: Option<Uuid>,
    /// The id the new deal gets; the server makes one otherwise.
    pub deal_id: Option<Uuid>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LeadListQuery {
    /// `new`, `working`, `qualified`, `converted` or `disqualified`.
    pub status: Option<String>,
    #[param(pattern = r"^[^\x00]*$")]
    pub owner: Option<String>,
    pub source: Option<String>,
    #[param(inline)]
    pub min_score: Option<Count>,
    /// Default 50.
    #[param(inline)]
    pub limit: Option<Limit>,
    /// A `next_cursor` from an earlier page.
    #[param(pattern = r"^-?[0-9]{1,19}_[0-9A-Za-z:.\-]{0,64}_[0-9A-Za-z:.\-]{0,64}$")]
    pub cursor: Option<String>,
}

/// One lead of the lead board.
#[derive(Debug, Serialize, ToSchema)]
pub struct LeadItem {
    pub id: String,
    /// `null` once the lead is erased.
    pub email: Option<String>,
    /// `null` once the lead is erased.
    pub name: Option<String>,
    /// Whether the lead's personal data was erased.
    pub erased: bool,
    pub company: Option<String>,
    pub source: String,
    pub status: String,
    pub score: i64,
    pub owner: Option<String>,
    pub captured_at: String,
    pub qualified_at: Option<String>,
    pub converted_deal_id: Option<String>,
    pub converted_account_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LeadList {
    pub items: Vec<LeadItem>,
    pub next_cursor: Option<String>,
}

fn lead_item(view: LeadRow) -> LeadItem {
    LeadItem {
        id: view.lead_id,
        erased: view.status == LeadStatus::Erased,
        email: view.email,
        name: view.name,
        company: view.company,
        source: view.source,
        status: view.status.as_str().to_owned(),
        score: view.score,
        owner: view.owner,
        captured_at: view.captured_at,
        qualified_at: view.qualified_at,
        converted_deal_id: view.converted_deal_id,
        converted_account_id: view.converted_account_id,
    }
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
    let outcome = execute::<Lead>(&app, id, command, &meta, &body.digest)
        .await
        .map_err(|refusal| withhold_existing_lead(&app, &meta, refusal))?;
    Ok(created("leads", outcome))
}

/// The lead that already holds an email is named only to a caller who may read leads: a
/// writer learns that the email is taken, not whose it is.
fn withhold_existing_lead(app: &App, meta: &CommandMeta, refusal: ApiError) -> ApiError {
    let may_read = app
        .routes
        .of(&Method::GET, "/leads/{id}")
        .admits(meta.caller.role);
    match refusal {
        ApiError::Command(CommandError::Domain(DomainError::DuplicateEmail { .. }))
            if !may_read =>
        {
            ApiError::Conflict {
                code: "duplicate-email",
                detail: "the email already belongs to a lead".to_owned(),
            }
        }
        other => other,
    }
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
    let command = LeadCommand::try_from(&body.value)?;
    let outcome = execute::<Lead>(&app, id, command, &meta, &body.digest).await?;
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
    let command = LeadCommand::try_from(&body.value)?;
    let outcome = execute::<Lead>(&app, id, command, &meta, &body.digest).await?;
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
    let command = LeadCommand::try_from(&body.value)?;
    let outcome = execute::<Lead>(&app, id, command, &meta, &body.digest).await?;
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
        Some(named) if app.system.handler::<Account>().exists(named).await? => {
            ConversionAccount::Existing(named)
        }
        Some(named) => ConversionAccount::Unknown(named),
    };
    let deal = match b.deal_id {
        None => ConversionDeal::New(Uuid::now_v7()),
        Some(given) if app.system.handler::<Deal>().exists(given).await? => {
            ConversionDeal::Taken(given)
        }
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
        .handler::<Lead>()
        .convert(
            id,
            command,
            &meta.context(&body.digest, &app.system.personal),
        )
        .await;
    record(name, &result, started);
    let conversion = result?;
    let mut answer = answer(conversion.outcome);
    answer.account_id = conversion.account_id;
    answer.deal_id = conversion.deal_id;
    Ok(Json(answer))
}

/// The lead board: leads by score, highest first, then by capture time.
#[utoipa::path(get, path = "/leads", tag = "leads",
    params(LeadListQuery, Consistency),
    responses((status = 200, description = "A page of leads", body = LeadList,
        headers(("Annals-Position" = u64, description = "How far the read model had read the log"))),
        QueryProblems),
    security(("bearer" = ["analyst"])))]
async fn list_leads(
    State(app): State<Arc<App>>,
    Params(query): Params<LeadListQuery>,
    Params(consistency): Params<Consistency>,
) -> Result<Response, ApiError> {
    let statuses = || LeadStatus::CAPTURED.iter().map(|s| s.as_str());
    if let Some(status) = &query.status
        && !statuses().any(|s| s == status)
    {
        return Err(ApiError::invalid(
            "invalid-parameter",
            format!(
                "status must be one of {}",
                statuses().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    if let Some(source) = &query.source {
        Source::parse(source)?;
    }
    let limit = limit(query.limit);
    let (mut snapshot, position) =
        snapshot(&app, &[lead_board::NAME], consistency.position()).await?;
    let filter = LeadFilter {
        status: query.status,
        owner: query.owner,
        source: query.source,
        min_score: query.min_score.map(Count::get),
    };
    let page = snapshot
        .leads(&filter, limit, query.cursor.as_deref())
        .await?;
    snapshot.finish().await?;
    Ok(with_position(
        position,
        Json(LeadList {
            items: page.items.into_iter().map(lead_item).collect(),
            next_cursor: page.next_cursor,
        }),
    ))
}

/// One lead, as the lead board shows it.
#[utoipa::path(get, path = "/leads/{id}", tag = "leads",
    params(("id" = Uuid, Path), Consistency),
    responses((status = 200, description = "The lead", body = LeadItem,
        headers(("Annals-Position" = u64, description = "How far the read model had read the log"))),
        QueryProblems),
    security(("bearer" = ["analyst"])))]
async fn get_lead(
    State(app): State<Arc<App>>,
    Id(id): Id,
    Params(consistency): Params<Consistency>,
) -> Result<Response, ApiError> {
    let (mut snapshot, position) =
        snapshot(&app, &[lead_board::NAME], consistency.position()).await?;
    let lead = snapshot.lead(&id.to_string()).await?;
    snapshot.finish().await?;
    let lead =
        lead.ok_or_else(|| ApiError::not_found("lead-not-found", "the lead does not exist"))?;
    Ok(with_position(position, Json(lead_item(lead))))
}

/// A lead as it was at a version or a time (now without either), from its events.
#[utoipa::path(get, path = "/leads/{id}/history", tag = "history",
    params(("id" = Uuid, Path), HistoryQuery),
    responses((status = 200, description = "The lead's state", body = HistoryView), QueryProblems),
    security(("bearer" = ["analyst"])))]
async fn lead_history(
    State(app): State<Arc<App>>,
    Id(id): Id,
    Params(query): Params<HistoryQuery>,
) -> Result<Json<HistoryView>, ApiError> {
    let missing = ApiError::not_found("lead-not-found", "the lead does not exist");
    let handler = app.system.handler::<Lead>();
    let Json(mut view) = history(&handler, id, query, missing).await?;
    // An erased lead's personal fields read as null at every version; say why.
    if handler.current(id).await?.state.status == LeadStatus::Erased
        && let Some(state) = view.state.as_object_mut()
    {
        state.insert("erased".to_owned(), serde_json::Value::Bool(true));
    }
    Ok(Json(view))
}

/// Erase the lead's personal data (the right to erasure): its data key is destroyed with
/// the `LeadErased` event, so its email and name read as `null` everywhere from then on,
/// events included, and its email may be captured again as a new lead.
#[utoipa::path(post, path = "/leads/{id}/erase", tag = "leads",
    request_body(content = EraseLead, description = "An empty object, or no body"),
    params(("id" = Uuid, Path), CommandHeaders),
    responses((status = 200, description = "Erased", body = CommandAnswer), CommandProblems),
    security(("bearer" = ["operator"])))]
async fn erase_lead(
    State(app): State<Arc<App>>,
    Id(id): Id,
    meta: CommandMeta,
    body: JsonBody<EraseLead>,
) -> Result<Json<CommandAnswer>, ApiError> {
    // Counted first: what the log keeps does not change with the erasure, and nothing
    // after the commit may fail its answer.
    let in_clear = app
        .system
        .personal
        .events_in_clear(&CommandHandler::<Lead>::stream(id)?)
        .await?;
    let outcome = execute::<Lead>(&app, id, LeadCommand::Erase {}, &meta, &body.digest).await?;
    app.system.forget_erased(outcome.position).await;
    let mut answer = answer(outcome);
    answer.events_in_clear = (in_clear > 0).then_some(in_clear);
    Ok(Json(answer))
}

/// An empty object (the body may also be left out): an erasure takes nothing but the
/// lead's id.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EraseLead {}

/// Everything held about the person behind a lead (the right of access), decrypted.
#[derive(Debug, Serialize, ToSchema)]
pub struct PersonalData {
    pub lead_id: Uuid,
    pub email: Option<String>,
    pub name: Option<String>,
    pub company: Option<String>,
    /// Every event of the lead, with its data as stored, opened.
    pub events: Vec<EventItem>,
}

/// Everything held about the person behind a lead (the right of access): the personal
/// fields and every event of the lead, decrypted; 410 `erased` once the lead is erased.
#[utoipa::path(get, path = "/leads/{id}/personal-data", tag = "leads",
    params(("id" = Uuid, Path)),
    responses((status = 200, description = "The personal data held", body = PersonalData),
        (status = 410, description = "The lead's personal data was erased", body = Problem,
            content_type = "application/problem+json"),
        QueryProblems),
    security(("bearer" = ["operator"])))]
async fn lead_personal_data(
    State(app): State<Arc<App>>,
    Id(id): Id,
) -> Result<Json<PersonalData>, ApiError> {
    Ok(Json(personal_data(&app.system, id).await?))
}

/// Everything held about the person behind lead `id` (the right of access), decrypted:
/// 404 for no such lead, 410 once it is erased. The API and the CLI answer with this.
pub async fn personal_data(system: &System, id: Uuid) -> Result<PersonalData, ApiError> {
    let lead = system.handler::<Lead>().current(id).await?.state;
    match lead.status {
        LeadStatus::Absent => {
            return Err(ApiError::not_found(
                "lead-not-found",
                "the lead does not exist",
            ));
        }
        LeadStatus::Erased => return Err(ApiError::Gone),
        _ => {}
    }
    let stream = CommandHandler::<Lead>::stream(id)?;
    let mut events = Vec::new();
    let mut from = 1;
    loop {
        let page = system
            .store
            .read_stream(&stream, from, Direction::Forwards, 1_000)
            .await?;
        let done = page.len() < 1_000;
        from += u64::try_from(page.len()).unwrap_or(u64::MAX);
        events.extend(page.into_iter().map(EventItem::from));
        if done {
            break;
        }
    }
    Ok(PersonalData {
        lead_id: id,
        email: lead.email.map(|e| e.as_str().to_owned()),
        name: lead.name.map(|n| n.as_str().to_owned()),
        company: lead.company.map(|c| c.as_str().to_owned()),
        events,
    })
}
