//! What analysts ask: the funnel, the pipeline, and speed to lead.

use std::sync::Arc;

use annals_domain::values::Source;
use annals_projections::{deal_board, lead_board, lead_response, queries};
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
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ResponseTimesQuery {
    /// RFC 3339, inclusive: leads that qualified from then; all time without it.
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
    /// RFC 3339, inclusive; all time without it.
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
pub struct FunnelSource {
    pub source: String,
    #[serde(flatten)]
    pub steps: FunnelStepsView,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FunnelView {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub overall: FunnelStepsView,
    pub by_source: Vec<FunnelSource>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StageFigureView {
    pub owner: Option<String>,
    pub stage: String,
    pub currency: String,
    pub count: i64,
    pub amount_minor: i64,
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
