//! History, the log, administration and health: aggregates as they were, the raw
//! streams and global log, projection status, rebuild and verify, the audit of the hash
//! chains, and the open endpoints (health, metrics, the OpenAPI document).

use std::sync::Arc;

use annals_commands::CommandHandler;
use annals_domain::Aggregate;
use annals_store::{Direction, LogFilter, RecordedEvent, StreamName};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::contract::{self, FromNumber, Position};
use crate::dto::*;
use crate::error::ApiError;
use crate::extract::{Id, Params, limit};
use crate::openapi::{OperatorProblems, QueryProblems};
use crate::server::App;

pub fn routes() -> OpenApiRouter<Arc<App>> {
    OpenApiRouter::new()
        .routes(routes!(lead_history))
        .routes(routes!(account_history))
        .routes(routes!(deal_history))
        .routes(routes!(stream_events))
        .routes(routes!(log_events))
        .routes(routes!(list_projections))
        .routes(routes!(rebuild_projection))
        .routes(routes!(verify_projection))
        .routes(routes!(audit_verify))
        .routes(routes!(live))
        .routes(routes!(ready))
        .routes(routes!(metrics))
        .routes(routes!(openapi_document))
}

async fn history<A: Aggregate + Serialize>(
    handler: &CommandHandler<A>,
    id: uuid::Uuid,
    query: HistoryQuery,
    missing: ApiError,
) -> Result<Json<HistoryView>, ApiError> {
    // With both, the state at whichever comes first: the events up to the version that
    // were recorded by the time.
    let version = query.version.map(Position::unsigned);
    let loaded = handler.load_as_of(id, version, query.as_of).await?;
    if loaded.version == 0 && !handler.exists(id).await? {
        return Err(missing);
    }
    Ok(Json(HistoryView {
        id,
        version: loaded.version,
        as_of: query.as_of,
        state: serde_json::to_value(&loaded.state).unwrap_or(Value::Null),
    }))
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
    history(&app.system.leads, id, query, missing).await
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
    history(&app.system.accounts, id, query, missing).await
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
    history(&app.system.deals, id, query, missing).await
}

fn event_item(event: RecordedEvent) -> EventItem {
    let mut metadata = serde_json::to_value(&event.metadata).unwrap_or_else(|_| json!({}));
    if let Value::Object(fields) = &mut metadata {
        fields.insert("event_id".into(), json!(event.event_id));
        fields.insert("recorded_at".into(), json!(event.recorded_at));
        fields.insert("schema_version".into(), json!(event.schema_version));
    }
    EventItem {
        position: event.position,
        stream: event.stream,
        version: event.version,
        event_type: event.event_type,
        data: event.data,
        metadata,
        recorded_at: event.recorded_at,
    }
}

fn cursor_number(cursor: Option<&str>) -> Result<Option<u64>, ApiError> {
    cursor
        .map(|c| {
            contract::number_cursor(c).ok_or_else(|| {
                ApiError::invalid(
                    "invalid-cursor",
                    "the cursor is not one this server gave out",
                )
            })
        })
        .transpose()
}

/// One stream's events, in version order.
#[utoipa::path(get, path = "/streams/{stream}/events", tag = "log",
    params(("stream" = String, Path, description = "A stream name, like `lead-<id>`"), StreamQuery),
    responses((status = 200, description = "A page of the stream", body = EventList), OperatorProblems),
    security(("bearer" = ["operator"])))]
async fn stream_events(
    State(app): State<Arc<App>>,
    Path(stream): Path<String>,
    Params(query): Params<StreamQuery>,
) -> Result<Json<EventList>, ApiError> {
    let missing = || ApiError::not_found("stream-not-found", "the stream has no events");
    let stream = StreamName::parse(stream).map_err(|_| missing())?;
    let limit = limit(query.limit);
    let from = cursor_number(query.cursor.as_deref())?
        .or(query.from_version.map(FromNumber::unsigned))
        .unwrap_or(1)
        .max(1);
    let store = &app.system.store;
    let mut events = store
        .read_stream(&stream, from, Direction::Forwards, limit + 1)
        .await?;
    if events.is_empty()
        && store
            .read_stream(&stream, 1, Direction::Forwards, 1)
            .await?
            .is_empty()
    {
        return Err(missing());
    }
    let next_cursor = (events.len() > limit).then(|| (events[limit].version).to_string());
    events.truncate(limit);
    let head = store.head().await?;
    Ok(Json(EventList {
        items: events.into_iter().map(event_item).collect(),
        next_cursor,
        head,
    }))
}

/// The global log, in position order.
#[utoipa::path(get, path = "/events", tag = "log",
    params(LogQuery),
    responses((status = 200, description = "A page of the log", body = EventList), OperatorProblems),
    security(("bearer" = ["operator"])))]
async fn log_events(
    State(app): State<Arc<App>>,
    Params(query): Params<LogQuery>,
) -> Result<Json<EventList>, ApiError> {
    let limit = limit(query.limit);
    let from = cursor_number(query.cursor.as_deref())?
        .or(query.from_position.map(Position::unsigned))
        .unwrap_or(1)
        .max(1);
    let filter = match query.event_type {
        Some(event_type) => LogFilter::event_types([event_type]),
        None => LogFilter::all(),
    };
    // One more than asked tells whether another page follows.
    let mut page = app.system.store.read_all(from, limit + 1, &filter).await?;
    let next_cursor = page.events.get(limit).map(|next| next.position.to_string());
    page.events.truncate(limit);
    Ok(Json(EventList {
        next_cursor,
        items: page.events.into_iter().map(event_item).collect(),
        head: page.head,
    }))
}

/// Every projection: checkpoint, head of the log, lag, status and last error.
#[utoipa::path(get, path = "/admin/projections", tag = "admin",
    responses((status = 200, description = "The projections", body = ProjectionList), OperatorProblems),
    security(("bearer" = ["operator"])))]
async fn list_projections(State(app): State<Arc<App>>) -> Result<Json<ProjectionList>, ApiError> {
    let mut items = Vec::new();
    for runner in &app.system.projections {
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

fn projection<'a>(
    app: &'a App,
    name: &str,
) -> Result<&'a Arc<annals_projections::ProjectionRunner>, ApiError> {
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

/// Rebuild a projection from position 0 beside the live one; readers keep the live one
/// until the rebuilt one has caught up and is swapped in.
#[utoipa::path(post, path = "/admin/projections/{name}/rebuild", tag = "admin",
    params(("name" = String, Path)),
    responses((status = 202, description = "The rebuild has started", body = RebuildStarted), OperatorProblems),
    security(("bearer" = ["operator"])))]
async fn rebuild_projection(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
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
    Path(name): Path<String>,
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

/// Prometheus metrics: commands by type and outcome, append latency, projection lag,
/// HTTP requests by route and status.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")),
    security(()))]
async fn metrics(State(app): State<Arc<App>>) -> Response {
    for runner in &app.system.projections {
        match runner.status().await {
            Ok(status) => {
                let name = status.name.clone();
                metrics::gauge!("annals_projection_lag", "projection" => name.clone())
                    .set(status.lag as f64);
                metrics::gauge!("annals_projection_checkpoint", "projection" => name)
                    .set(status.checkpoint as f64);
            }
            Err(error) => tracing::warn!(projection = runner.name(), %error, "status unknown"),
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
