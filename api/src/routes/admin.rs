//! Operations: the projections (status, rebuild, verify), the audit of the hash chains,
//! health, metrics and the OpenAPI document.

use std::sync::Arc;

use annals_engine::ConsumerKind;
use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::response::Response;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::resource;
use crate::error::ApiError;
use crate::extract::Name;
use crate::openapi::OperatorProblems;
use crate::server::App;

pub fn routes() -> OpenApiRouter<Arc<App>> {
    resource("admin")
        .routes(routes!(list_projections))
        .routes(routes!(rebuild_projection))
        .routes(routes!(verify_projection))
        .routes(routes!(audit_verify))
        .routes(routes!(live))
        .routes(routes!(ready))
        .routes(routes!(metrics))
        .routes(routes!(openapi_document))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectionItem {
    pub name: String,
    pub checkpoint: u64,
    pub head: u64,
    pub lag: u64,
    /// `running`, `catching_up`, `rebuilding` or `halted`.
    pub status: String,
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectionList {
    pub items: Vec<ProjectionItem>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RebuildStarted {
    pub name: String,
    pub status: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VerifyAnswer {
    pub equal: bool,
    /// The log position the live and the rebuilt rows were compared at.
    pub position: u64,
    /// The first differences (at most ten), in key order, table by table.
    pub differences: Vec<VerifyDifference>,
}

/// One way the live read model differs from a rebuild, at one row.
#[derive(Debug, Serialize, ToSchema)]
pub struct VerifyDifference {
    /// The read-model table.
    pub table: String,
    /// The row's key.
    pub key: String,
    pub kind: DifferenceKind,
    /// The column whose value differs (`changed` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// The column's value in the live read model, as text (`changed` only; `null` also
    /// for a NULL).
    pub live: Option<String>,
    /// The column's value a rebuild from position 0 gives, as text (`changed` only).
    pub rebuilt: Option<String>,
}

impl From<&annals_engine::Difference> for VerifyDifference {
    fn from(difference: &annals_engine::Difference) -> Self {
        use annals_engine::DifferenceKind as Kind;
        VerifyDifference {
            table: difference.table.clone(),
            key: difference.key.clone(),
            kind: match difference.kind {
                Kind::Missing => DifferenceKind::Missing,
                Kind::Extra => DifferenceKind::Extra,
                Kind::Changed => DifferenceKind::Changed,
            },
            column: difference.column.clone(),
            live: difference.live.clone(),
            rebuilt: difference.rebuilt.clone(),
        }
    }
}

/// `missing`: the rebuild has the row, the live read model lacks it; `extra`: the live
/// read model has a row the rebuild lacks; `changed`: both have it, one column differs.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DifferenceKind {
    Missing,
    Extra,
    Changed,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditAnswer {
    pub ok: bool,
    pub streams: u64,
    pub events: u64,
    /// The first broken link: of a stream's hash chain, else of the log's (a gap in
    /// positions, a cut tail), with `position` and a `reason`.
    #[schema(value_type = Option<Object>)]
    pub first_broken_link: Option<serde_json::Value>,
    /// The last position walked and its log hash. Kept somewhere the database's writers
    /// cannot reach, it shows a later rewrite that recomputed every hash
    /// (`annals audit verify --anchor <hash>`).
    pub anchor: AnchorAnswer,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AnchorAnswer {
    pub position: u64,
    /// SHA-256, 64 hex digits.
    pub hash: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthAnswer {
    pub status: String,
}

fn projection<'a>(
    app: &'a App,
    name: &str,
) -> Result<&'a Arc<annals_engine::ConsumerRunner>, ApiError> {
    app.system.projection(name).ok_or_else(|| {
        ApiError::not_found(
            "projection-not-found",
            format!(
                "no projection is named so; there are: {}",
                app.system.projection_names().join(", ")
            ),
        )
    })
}

/// Every projection: checkpoint, head of the log, lag, status and last error.
#[utoipa::path(get, path = "/admin/projections", tag = "admin",
    responses((status = 200, description = "The projections", body = ProjectionList), OperatorProblems),
    security(("bearer" = ["operator"])))]
async fn list_projections(State(app): State<Arc<App>>) -> Result<Json<ProjectionList>, ApiError> {
    let mut items = Vec::new();
    for runner in app.system.projections() {
        let status = runner.status().await?;
        items.push(ProjectionItem {
            name: status.name,
            checkpoint: status.checkpoint,
            head: status.head,
            lag: status.lag,
            status: status.status.to_owned(),
            last_error: status.last_error,
        });
    }
    Ok(Json(ProjectionList {
        items,
        next_cursor: None,
    }))
}

/// Rebuild a projection from position 0 beside the live one; readers keep the live one
/// until the rebuilt one has caught up and is swapped in.
#[utoipa::path(post, path = "/admin/projections/{name}/rebuild", tag = "admin",
    params(("name" = String, Path)),
    responses((status = 202, description = "The rebuild has started", body = RebuildStarted), OperatorProblems),
    security(("bearer" = ["operator"])))]
async fn rebuild_projection(
    State(app): State<Arc<App>>,
    Name(name): Name,
) -> Result<Response, ApiError> {
    let runner = projection(&app, &name)?.clone();
    // Claimed before the answer: a second rebuild is refused (409), and a status read
    // right after this answer says `rebuilding`.
    let claim = runner.claim_rebuild().await?;
    tokio::spawn(async move {
        match runner.finish_rebuild(claim).await {
            Ok(()) => tracing::info!(projection = runner.name(), "rebuild finished"),
            Err(error) => tracing::warn!(projection = runner.name(), %error, "rebuild failed"),
        }
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(RebuildStarted {
            name,
            status: "rebuilding".to_owned(),
        }),
    )
        .into_response())
}

/// Rebuild a projection in a scratch space and compare it with the live rows.
#[utoipa::path(post, path = "/admin/projections/{name}/verify", tag = "admin",
    params(("name" = String, Path)),
    responses((status = 200, description = "The comparison", body = VerifyAnswer), OperatorProblems),
    security(("bearer" = ["operator"])))]
async fn verify_projection(
    State(app): State<Arc<App>>,
    Name(name): Name,
) -> Result<Json<VerifyAnswer>, ApiError> {
    let runner = projection(&app, &name)?.clone();
    // In a task of its own: a client that hangs up does not cut the verify short and
    // leave its scratch rows behind.
    let report = tokio::spawn(async move { runner.verify().await })
        .await
        .map_err(|_| ApiError::Panicked)??;
    Ok(Json(VerifyAnswer {
        equal: report.equal,
        position: report.position,
        differences: report.differences.iter().map(Into::into).collect(),
    }))
}

/// Check every stream's hash chain and the whole log's from the stored rows.
#[utoipa::path(get, path = "/admin/audit/verify", tag = "admin",
    responses((status = 200, description = "The audit", body = AuditAnswer), OperatorProblems),
    security(("bearer" = ["operator"])))]
async fn audit_verify(State(app): State<Arc<App>>) -> Result<Json<AuditAnswer>, ApiError> {
    let report = app.system.store.verify().await?;
    Ok(Json(AuditAnswer {
        ok: report.ok(),
        streams: report.streams,
        events: report.events,
        first_broken_link: report
            .first_broken_link
            .map(|link| serde_json::to_value(link).unwrap_or(Value::Null)),
        anchor: AnchorAnswer {
            position: report.head.position,
            hash: report.head.hash,
        },
    }))
}

/// The process is up.
#[utoipa::path(get, path = "/health/live", tag = "health",
    responses((status = 200, description = "Alive", body = HealthAnswer)),
    security(()))]
async fn live() -> Json<HealthAnswer> {
    Json(HealthAnswer {
        status: "live".to_owned(),
    })
}

/// Migrations ran and the store answers.
#[utoipa::path(get, path = "/health/ready", tag = "health",
    responses((status = 200, description = "Ready", body = HealthAnswer),
        (status = 503, description = "The store does not answer", body = crate::error::Problem, content_type = "application/problem+json")),
    security(()))]
async fn ready(State(app): State<Arc<App>>) -> Result<Json<HealthAnswer>, ApiError> {
    app.system
        .store
        .head()
        .await
        .map_err(|error| ApiError::NotReady(error.to_string()))?;
    Ok(Json(HealthAnswer {
        status: "ready".to_owned(),
    }))
}

/// Prometheus metrics: commands by type and outcome, append latency, each consumer's lag
/// and parked events, HTTP requests by route and status.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")),
    security(()))]
async fn metrics(State(app): State<Arc<App>>) -> Response {
    for runner in &app.system.consumers {
        match runner.status().await {
            Ok(status) => {
                let (name, kind) = (status.name.clone(), status.kind.as_str());
                if status.kind == ConsumerKind::ReadModel {
                    metrics::gauge!("annals_projection_lag", "projection" => name.clone())
                        .set(status.lag as f64);
                    metrics::gauge!("annals_projection_checkpoint", "projection" => name.clone())
                        .set(status.checkpoint as f64);
                }
                metrics::gauge!("annals_consumer_lag", "consumer" => name.clone(), "kind" => kind)
                    .set(status.lag as f64);
                metrics::gauge!("annals_consumer_parked", "consumer" => name, "kind" => kind)
                    .set(status.parked as f64);
            }
            Err(error) => tracing::warn!(consumer = runner.name(), %error, "status unknown"),
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::observe::prometheus().render(),
    )
        .into_response()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "health",
    responses((status = 200, description = "The OpenAPI document", body = Object)),
    security(()))]
async fn openapi_document(State(app): State<Arc<App>>) -> Json<Value> {
    Json(app.openapi.clone())
}
