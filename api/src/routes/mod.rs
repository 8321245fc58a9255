//! The endpoints of `api.md`, by resource: each file holds its routes, its own request
//! and response shapes, and how a request body becomes a domain command. What they share
//! is here (running a command, answering with the position a read reflects, an
//! aggregate's history) and in `dto` (the shapes every resource uses).

pub mod accounts;
pub mod admin;
pub mod analytics;
pub mod consumers;
pub mod deals;
pub mod leads;
pub mod log;
pub mod orders;
pub mod routing;
pub mod subscriptions;

use std::sync::Arc;
use std::time::{Duration, Instant};

use annals_commands::{CommandError, CommandHandler, CommandOutcome};
use annals_consumers::queries::Snapshot;
use annals_domain::{Aggregate, Command};
use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use utoipa::openapi::OpenApiBuilder;
use utoipa::openapi::tag::TagBuilder;
use utoipa_axum::router::OpenApiRouter;
use uuid::Uuid;

use crate::contract::Position;
use crate::dto::*;
use crate::error::ApiError;
use crate::extract::CommandMeta;
use crate::observe;
use crate::server::App;

/// A resource's router, whose document declares its tag: a resource added after the ones
/// `openapi.rs` lists (in their order) brings its tag itself, after them.
fn resource(tag: &str) -> OpenApiRouter<Arc<App>> {
    let document = OpenApiBuilder::new()
        .tags(Some([TagBuilder::new().name(tag).build()]))
        .build();
    OpenApiRouter::with_openapi(document)
}

/// Every resource's routes: the one list a new resource joins.
pub fn all() -> OpenApiRouter<Arc<App>> {
    OpenApiRouter::new()
        .merge(leads::routes())
        .merge(accounts::routes())
        .merge(deals::routes())
        .merge(orders::routes())
        .merge(subscriptions::routes())
        .merge(analytics::routes())
        .merge(log::routes())
        .merge(admin::routes())
        .merge(consumers::routes())
        .merge(routing::routes())
}

/// Runs a command of `A`'s and records its outcome in the metrics.
async fn execute<A: Aggregate + 'static>(
    app: &App,
    id: Uuid,
    command: A::Command,
    meta: &CommandMeta,
    body_digest: &str,
) -> Result<CommandOutcome, ApiError> {
    let name = command.name();
    let started = Instant::now();
    let result = app
        .system
        .handler::<A>()
        .execute(
            id,
            command,
            &meta.context(body_digest, &app.system.personal),
        )
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
        events_in_clear: None,
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
    let deadline = tokio::time::Instant::now() + app.settings.consistency_wait;
    loop {
        app.consistent(projections, min_position).await?;
        let mut snapshot = Snapshot::begin(&app.system.db).await?;
        let position = snapshot.position(projections).await?;
        match min_position {
            Some(wanted) if position < wanted => {
                snapshot.finish().await?;
                if tokio::time::Instant::now() >= deadline {
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
