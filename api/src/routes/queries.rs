//! Query endpoints, served from the read models. Each waits for `min_position` when
//! asked (read-your-writes), then reads its whole answer from one snapshot of the read
//! models, and says in `Annals-Position` the checkpoint that snapshot holds. For an
//! answer from one read model its rows are exactly those of the log up to that position;
//! for one drawn from several it is the lowest of their checkpoints, so every event up to
//! it is in the answer (the others may have applied more).

use std::sync::Arc;
use std::time::Duration;

use annals_domain::lead::LeadStatus;
use annals_domain::values::{Source, Stage};
use annals_projections::account_360;
use annals_projections::deal_board::{self, DealRow};
use annals_projections::lead_board::{self, LeadRow};
use annals_projections::queries::{self, DealFilter, LeadFilter, Snapshot};
use axum::Json;
use axum::extract::State;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::contract::Count;
use crate::dto::*;
use crate::error::ApiError;
use crate::extract::{Id, Params, limit};
use crate::openapi::QueryProblems;
use crate::server::App;

pub fn routes() -> OpenApiRouter<Arc<App>> {
    OpenApiRouter::new()
        .routes(routes!(list_leads))
        .routes(routes!(get_lead))
        .routes(routes!(get_account))
        .routes(routes!(list_deals))
        .routes(routes!(get_deal))
        .routes(routes!(funnel))
        .routes(routes!(pipeline))
}

pub const ANNALS_POSITION: &str = "annals-position";

/// Waits until the named read models have applied `min_position` (when given), then
/// opens the snapshot an answer is read from, with the checkpoint it holds. A read
/// model's live checkpoint only moves forwards, so the snapshot holds what the wait saw;
/// should it not (a runner that told of a position before its commit was seen), the
/// snapshot is taken again until the consistency wait runs out.
async fn snapshot(
    app: &App,
    projections: &[&str],
    min_position: Option<u64>,
) -> Result<(Snapshot, u64), ApiError> {
    let deadline = Instant::now() + app.settings.consistency_wait;
    loop {
        app.consistent(projections, min_position).await?;
        let mut snapshot = Snapshot::begin(&app.system.db).await?;
        let position = snapshot.position(projections).await?;
        match min_position {
            Some(wanted) if position < wanted => {
                snapshot.finish().await?;
                if Instant::now() >= deadline {
                    return Err(ApiError::ProjectionLagging {
                        projection: projections.join(", "),
                        position: wanted,
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ => return Ok((snapshot, position)),
        }
    }
}

/// A query's answer with the position its read models had reached.
fn with_position(position: u64, body: impl IntoResponse) -> Response {
    let mut response = body.into_response();
    response
        .headers_mut()
        .insert(ANNALS_POSITION, HeaderValue::from(position));
    response
}

fn lead_item(view: LeadRow) -> LeadItem {
    LeadItem {
        id: view.lead_id,
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
        &[account_360::NAME, deal_board::NAME, lead_board::NAME],
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
        }),
    ))
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
        && !matches!(stage.as_str(), "won" | "lost")
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

fn steps(steps: queries::FunnelSteps) -> FunnelStepsView {
    FunnelStepsView {
        captured: steps.captured,
        qualified: steps.qualified,
        converted: steps.converted,
        deal_won: steps.deal_won,
        qualification_rate: steps.qualification_rate,
        conversion_rate: steps.conversion_rate,
        win_rate: steps.win_rate,
    }
}

/// The funnel: captured, qualified, converted and won in a time window, overall and per
/// source, with step-to-step rates.
#[utoipa::path(get, path = "/analytics/funnel", tag = "analytics",
    params(FunnelQuery, Consistency),
    responses((status = 200, description = "The funnel", body = FunnelView,
        headers(("Annals-Position" = u64, description = "How far the read models had read the log"))),
        QueryProblems),
    security(("bearer" = ["analyst"])))]
async fn funnel(
    State(app): State<Arc<App>>,
    Params(query): Params<FunnelQuery>,
    Params(consistency): Params<Consistency>,
) -> Result<Response, ApiError> {
    if let Some(source) = &query.source {
        Source::parse(source)?;
    }
    let (mut snapshot, position) = snapshot(
        &app,
        &[lead_board::NAME, deal_board::NAME],
        consistency.position(),
    )
    .await?;
    // Read models keep times as RFC 3339 UTC text with microseconds.
    let text =
        |t: &chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let funnel = snapshot
        .funnel(
            query.from.as_ref().map(text).as_deref(),
            query.to.as_ref().map(text).as_deref(),
            query.source.as_deref(),
        )
        .await?;
    snapshot.finish().await?;
    Ok(with_position(
        position,
        Json(FunnelView {
            from: query.from,
            to: query.to,
            overall: steps(funnel.overall),
            by_source: funnel
                .by_source
                .into_iter()
                .map(|(source, s)| FunnelSource {
                    source,
                    steps: steps(s),
                })
                .collect(),
        }),
    ))
}

/// The pipeline: open deals per stage and currency, per owner; win rate and days to
/// close.
#[utoipa::path(get, path = "/analytics/pipeline", tag = "analytics",
    params(PipelineQuery, Consistency),
    responses((status = 200, description = "The pipeline", body = PipelineView,
        headers(("Annals-Position" = u64, description = "How far the read model had read the log"))),
        QueryProblems),
    security(("bearer" = ["analyst"])))]
async fn pipeline(
    State(app): State<Arc<App>>,
    Params(query): Params<PipelineQuery>,
    Params(consistency): Params<Consistency>,
) -> Result<Response, ApiError> {
    let (mut snapshot, position) =
        snapshot(&app, &[deal_board::NAME], consistency.position()).await?;
    let pipeline = snapshot.pipeline(query.owner.as_deref()).await?;
    snapshot.finish().await?;
    let figure = |f: queries::StageFigure| StageFigureView {
        owner: f.owner,
        stage: f.stage,
        currency: f.currency,
        count: f.count,
        amount_minor: f.amount_minor,
    };
    Ok(with_position(
        position,
        Json(PipelineView {
            stages: pipeline.stages.into_iter().map(figure).collect(),
            by_owner: pipeline.by_owner.into_iter().map(figure).collect(),
            won: pipeline.won,
            lost: pipeline.lost,
            win_rate: pipeline.win_rate,
            average_days_to_close: pipeline.average_days_to_close,
        }),
    ))
}
