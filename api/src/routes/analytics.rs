//! What analysts ask: the funnel, the pipeline, and speed to lead.

use std::sync::Arc;

use annals_consumers::queries;
use annals_consumers::read_models::{deal_board, lead_board, lead_response, revenue};
use annals_domain::values::Source;
use axum::Json;
use axum::extract::State;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{resource, snapshot, with_position};
use crate::dto::*;
use crate::error::ApiError;
use crate::extract::Params;
use crate::openapi::QueryProblems;
use crate::server::App;

pub fn routes() -> OpenApiRouter<Arc<App>> {
    resource("analytics")
        .routes(routes!(funnel))
        .routes(routes!(pipeline))
        .routes(routes!(response_times))
        .routes(routes!(revenue_figures))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RevenueQuery {
    /// RFC 3339, inclusive; without it, from the first change of MRR (and no NRR, GRR).
    /// Before `to` when both are given (422 `invalid-window` otherwise).
    pub from: Option<DateTime<Utc>>,
    /// RFC 3339, exclusive; without it, up to now.
    pub to: Option<DateTime<Utc>>,
    /// Only this currency (three upper-case letters).
    #[param(pattern = "^[A-Z]{3}$")]
    pub currency: Option<String>,
}

/// One month's recurring revenue in one currency, in minor units: exact integers, sums
/// that may exceed 64 bits (each subscription's MRR is at most 10^15, any number of
/// them is summed without wrapping).
#[derive(Debug, Serialize, ToSchema)]
pub struct RevenueMonthView {
    /// `YYYY-MM` (UTC).
    pub month: String,
    /// The MRR at the month's start.
    pub mrr_start: i128,
    /// The MRR of subscriptions started in the month.
    pub new: i128,
    /// The sum of increases.
    pub expansion: i128,
    /// The sum of decreases.
    pub contraction: i128,
    /// The MRR of subscriptions churned.
    pub churn: i128,
    /// `mrr_start + new + expansion − contraction − churn`: the MRR at the month's end.
    pub mrr_end: i128,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CurrencyRevenueView {
    pub currency: String,
    /// Every calendar month the window touches, in order, from the month of the
    /// currency's first change of MRR up to this month (or that of its last change).
    pub months: Vec<RevenueMonthView>,
    /// Net revenue retention: the MRR at `to` of the accounts that had MRR at `from`, over
    /// the MRR at `from`; `null` when that is 0 or there is no `from`.
    pub nrr: Option<f64>,
    /// Gross revenue retention: the same with each account's MRR at `to` capped at its
    /// MRR at `from` (no expansion counted).
    pub grr: Option<f64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RevenueView {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub currencies: Vec<CurrencyRevenueView>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ResponseTimesQuery {
    /// RFC 3339, inclusive: leads that qualified from then; all time without it. Before
    /// `to` when both are given (422 `invalid-window` otherwise).
    pub from: Option<DateTime<Utc>>,
    /// RFC 3339, exclusive: leads that qualified before then; all time without it.
    pub to: Option<DateTime<Utc>>,
    /// Only this owner's figures.
    #[param(pattern = r"^[^\x00]*$")]
    pub owner: Option<String>,
}

/// Speed to lead for one owner.
#[derive(Debug, Serialize, ToSchema)]
pub struct OwnerResponseView {
    pub owner: String,
    /// Leads routed to the owner (a lead reassigned to them counts again).
    pub routed: u64,
    /// Leads whose first action (a signal recorded as their owner, a disqualification or
    /// a conversion) was the owner's.
    pub responded: u64,
    /// Seconds from qualification to the owner's first action: the median (the mean of
    /// the two middle ones for an even count) and the 90th percentile (nearest rank);
    /// `null` when the owner responded to none.
    pub median_seconds: Option<f64>,
    pub p90_seconds: Option<f64>,
    /// How often the owner let the response deadline pass, so the lead went to the next
    /// owner of the rule's pool.
    pub breached: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ResponseTimesView {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// One per owner the routing process gave a lead that qualified in the window, by
    /// owner.
    pub owners: Vec<OwnerResponseView>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FunnelQuery {
    /// RFC 3339, inclusive; all time without it. Before `to` when both are given (422
    /// `invalid-window` otherwise).
    pub from: Option<DateTime<Utc>>,
    /// RFC 3339, exclusive; all time without it.
    pub to: Option<DateTime<Utc>>,
    pub source: Option<String>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PipelineQuery {
    #[param(pattern = r"^[^\x00]*$")]
    pub owner: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FunnelStepsView {
    pub captured: i64,
    pub qualified: i64,
    pub converted: i64,
    pub deal_won: i64,
    pub qualification_rate: Option<f64>,
    pub conversion_rate: Option<f64>,
    pub win_rate: Option<f64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FunnelSourceView {
    pub source: String,
    #[serde(flatten)]
    pub steps: FunnelStepsView,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FunnelView {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub overall: FunnelStepsView,
    pub by_source: Vec<FunnelSourceView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StageFigureView {
    pub owner: Option<String>,
    pub stage: String,
    pub currency: String,
    pub count: i64,
    /// The sum of the open deals' amounts, in minor units: exact, an integer that may
    /// exceed 64 bits (each amount is at most 10^15, any number of them is summed
    /// without wrapping).
    pub amount_minor: i128,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PipelineView {
    pub stages: Vec<StageFigureView>,
    pub by_owner: Vec<StageFigureView>,
    pub won: i64,
    pub lost: i64,
    pub win_rate: Option<f64>,
    pub average_days_to_close: Option<f64>,
}

/// A window `[from, to)` that holds an instant: `from` before `to` when both are given.
fn window(from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> Result<(), ApiError> {
    match (from, to) {
        (Some(from), Some(to)) if from >= to => Err(ApiError::Invalid {
            code: "invalid-window",
            detail: format!("`from` ({from}) must be before `to` ({to}): the window is [from, to)"),
        }),
        _ => Ok(()),
    }
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
    window(query.from, query.to)?;
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
                .map(|(source, s)| FunnelSourceView {
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

/// Speed to lead: per owner, the leads the routing process gave them that qualified in
/// the window, the median and 90th-percentile time from qualification to their first
/// action, and how often they let the response deadline pass.
#[utoipa::path(get, path = "/analytics/response-times", tag = "analytics",
    params(ResponseTimesQuery, Consistency),
    responses((status = 200, description = "Speed to lead per owner", body = ResponseTimesView,
        headers(("Annals-Position" = u64, description = "How far the read model had read the log"))),
        QueryProblems),
    security(("bearer" = ["analyst"])))]
async fn response_times(
    State(app): State<Arc<App>>,
    Params(query): Params<ResponseTimesQuery>,
    Params(consistency): Params<Consistency>,
) -> Result<Response, ApiError> {
    window(query.from, query.to)?;
    let (mut snapshot, position) =
        snapshot(&app, &[lead_response::NAME], consistency.position()).await?;
    let owners = snapshot
        .response_times(
            query.from.map(|t| t.timestamp_micros()),
            query.to.map(|t| t.timestamp_micros()),
            query.owner.as_deref(),
        )
        .await?;
    snapshot.finish().await?;
    Ok(with_position(
        position,
        Json(ResponseTimesView {
            from: query.from,
            to: query.to,
            owners: owners
                .into_iter()
                .map(|o| OwnerResponseView {
                    owner: o.owner,
                    routed: o.routed,
                    responded: o.responded,
                    median_seconds: o.median_seconds,
                    p90_seconds: o.p90_seconds,
                    breached: o.breached,
                })
                .collect(),
        }),
    ))
}

/// Recurring revenue per currency and month (MRR at the start, new, expansion,
/// contraction, churn, MRR at the end), and net and gross revenue retention over the
/// window.
#[utoipa::path(get, path = "/analytics/revenue", tag = "analytics",
    params(RevenueQuery, Consistency),
    responses((status = 200, description = "Recurring revenue", body = RevenueView,
        headers(("Annals-Position" = u64, description = "How far the read model had read the log"))),
        QueryProblems),
    security(("bearer" = ["analyst"])))]
async fn revenue_figures(
    State(app): State<Arc<App>>,
    Params(query): Params<RevenueQuery>,
    Params(consistency): Params<Consistency>,
) -> Result<Response, ApiError> {
    window(query.from, query.to)?;
    if let Some(currency) = &query.currency {
        annals_domain::values::Currency::parse(currency)?;
    }
    let (mut snapshot, position) = snapshot(&app, &[revenue::NAME], consistency.position()).await?;
    let currencies = snapshot
        .revenue(
            query.from.map(|t| t.timestamp_micros()),
            query.to.map(|t| t.timestamp_micros()),
            query.currency.as_deref(),
        )
        .await?;
    snapshot.finish().await?;
    Ok(with_position(
        position,
        Json(RevenueView {
            from: query.from,
            to: query.to,
            currencies: currencies
                .into_iter()
                .map(|c| CurrencyRevenueView {
                    currency: c.currency,
                    months: c
                        .months
                        .into_iter()
                        .map(|m| RevenueMonthView {
                            month: m.month,
                            mrr_start: m.mrr_start,
                            new: m.new,
                            expansion: m.expansion,
                            contraction: m.contraction,
                            churn: m.churn,
                            mrr_end: m.mrr_end,
                        })
                        .collect(),
                    nrr: c.nrr,
                    grr: c.grr,
                })
                .collect(),
        }),
    ))
}
