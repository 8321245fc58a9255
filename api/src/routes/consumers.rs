//! The consumers of the log (read models, processes, outbound) as an operator sees and
//! restarts them: every consumer's status, the events a consumer parked, and the
//! operator's retry or skip of one. Every route is the operator's.
//!
//! Invariant: a retry or a skip acts on an event only while it is parked; a second retry
//! (or a retry after a skip) finds nothing parked (404) and never applies it twice.

use std::collections::BTreeMap;
use std::sync::Arc;

use annals_engine::{ConsumerKind, ConsumerRunner, ParkedEvent};
use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use serde::{Deserialize, Serialize};
use utoipa::openapi::{RefOr, Response};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::resource;
use crate::auth::Caller;
use crate::contract::{FromNumber, Limit};
use crate::error::ApiError;
use crate::extract::{Name, Params, limit};
use crate::server::App;

pub fn routes() -> OpenApiRouter<Arc<App>> {
    resource("admin")
        .routes(routes!(list_consumers))
        .routes(routes!(list_parked))
        .routes(routes!(retry_parked))
        .routes(routes!(skip_parked))
}

/// What the parked-event endpoints may answer besides success.
#[derive(Debug)]
struct ParkedProblems;

impl utoipa::IntoResponses for ParkedProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        crate::openapi::problems(&[
            (401, "No token, or an unknown one"),
            (403, "The token's role may not do this"),
            (
                404,
                "No consumer has this name (`consumer-not-found`), or it has no parked event at this position (`not-parked`)",
            ),
            (
                409,
                "The retried event failed again (`still-failing`, with the new error); it stays parked. Or (`projection-busy`) a rebuild holds the read model, or another runner moved the consumer on meanwhile: retry",
            ),
            (422, "A parameter is invalid"),
            (
                503,
                "The database is unavailable or the request timed out; the event stays parked",
            ),
        ])
    }
}

/// One consumer of the log as an operator sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConsumerItem {
    pub name: String,
    pub kind: ConsumerKindName,
    /// The log position up to which it has taken the events.
    pub checkpoint: u64,
    /// The log's last position.
    pub head: u64,
    pub lag: u64,
    /// `running`, `catching_up` (more than a batch behind), `rebuilding` (a read model's
    /// rebuild or verify), `halted` (stopped before a parked event) or `stalled` (it has
    /// lag, and its checkpoint has not moved for longer than a lease's life,
    /// `ANNALS_LEASE_TTL`, since it last moved or its lease was last taken: its holder
    /// is stalled, or nobody holds it; another server takes it over once the lease
    /// expires).
    pub status: String,
    pub last_error: Option<String>,
    /// How many events it has parked that nobody retried or skipped.
    pub parked: u64,
    /// The process that holds (or last held) its lease, as `host:scope:pid:random`; `null`
    /// when no process ever took it. Only that process runs the consumer while its
    /// lease is live.
    pub holder: Option<String>,
    /// When that lease expires unless renewed, or expired (RFC 3339, by the database's
    /// clock); `null` with `holder`.
    pub lease_expires_at: Option<String>,
    /// When its checkpoint last moved (RFC 3339, by the database's clock); `null` when it
    /// has not moved since this was recorded.
    pub moved_at: Option<String>,
}

/// What kind of consumer: `read_model` (rows and checkpoint in one transaction, exactly
/// once), `process` (commands made exactly once by idempotency keys) or `outbound`
/// (deliveries outside, at least once, with the event's id).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConsumerKindName {
    ReadModel,
    Process,
    Outbound,
}

impl From<ConsumerKind> for ConsumerKindName {
    fn from(kind: ConsumerKind) -> Self {
        match kind {
            ConsumerKind::ReadModel => ConsumerKindName::ReadModel,
            ConsumerKind::Process => ConsumerKindName::Process,
            ConsumerKind::Outbound => ConsumerKindName::Outbound,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConsumerList {
    pub items: Vec<ConsumerItem>,
    /// Always `null`: every consumer is on the one page.
    pub next_cursor: Option<String>,
}

/// One parked event of a consumer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ParkedItem {
    /// Its position in the global log.
    pub position: u64,
    /// `null` only for events parked before event ids were recorded.
    #[schema(format = Uuid)]
    pub event_id: Option<String>,
    #[serde(rename = "type")]
    pub event_type: String,
    /// The last error applying it gave.
    pub error: String,
    /// How often applying it was tried.
    pub attempts: u64,
    /// When it was parked (RFC 3339); `null` for events parked before this was recorded.
    pub parked_at: Option<String>,
    /// Who skipped it (only in the answer to a skip).
    pub skipped_by: Option<String>,
    /// When it was skipped (RFC 3339; only in the answer to a skip).
    pub skipped_at: Option<String>,
}

impl From<ParkedEvent> for ParkedItem {
    fn from(parked: ParkedEvent) -> Self {
        ParkedItem {
            position: parked.position,
            event_id: parked.event_id,
            event_type: parked.event_type,
            error: parked.error,
            attempts: parked.attempts,
            parked_at: parked.parked_at,
            skipped_by: parked.skipped_by,
            skipped_at: parked.skipped_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ParkedList {
    pub items: Vec<ParkedItem>,
    /// `null` on the last page.
    pub next_cursor: Option<String>,
}

/// The answer to a retry that applied the event.
#[derive(Debug, Serialize, ToSchema)]
pub struct RetryAnswer {
    pub consumer: String,
    pub position: u64,
    /// `applied`.
    pub status: String,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ParkedQuery {
    /// Default 50.
    #[param(inline)]
    pub limit: Option<Limit>,
    /// A `next_cursor` from an earlier page.
    #[param(pattern = "^[0-9]{1,19}$")]
    pub cursor: Option<String>,
}

/// The consumer and the position in a parked event's path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ParkedPath {
    /// A consumer's name, as `GET /admin/consumers` lists them.
    pub name: String,
    /// The parked event's position in the log.
    #[param(inline)]
    pub position: FromNumber,
}

fn consumer<'a>(app: &'a App, name: &str) -> Result<&'a Arc<ConsumerRunner>, ApiError> {
    app.system.consumer(name).ok_or_else(|| {
        ApiError::not_found(
            "consumer-not-found",
            format!(
                "no consumer is named so; there are: {}",
                app.system.consumer_names().join(", ")
            ),
        )
    })
}

/// A parked event's path; a position that is not a whole number from 1 is an invalid
/// parameter (422), as the document says.
#[derive(Debug)]
struct Parked {
    name: String,
    position: u64,
}

impl<S: Send + Sync> FromRequestParts<S> for Parked {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(path) = Path::<ParkedPath>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::invalid("invalid-parameter", rejection.body_text()))?;
        Ok(Parked {
            name: path.name,
            position: path.position.unsigned(),
        })
    }
}

/// The caller, recorded with a skip.
#[derive(Debug)]
struct Actor(String);

impl<S: Send + Sync> FromRequestParts<S> for Actor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Caller>()
            .map(|caller| Actor(caller.actor.clone()))
            .ok_or(ApiError::Unauthorized)
    }
}

/// Every consumer of the log (read models, processes, outbound): checkpoint, head of the
/// log, lag, status, last error, how many events it parked, and who holds its lease.
#[utoipa::path(get, path = "/admin/consumers", tag = "admin",
    responses((status = 200, description = "The consumers", body = ConsumerList), crate::openapi::OperatorListProblems),
    security(("bearer" = ["operator"])))]
async fn list_consumers(State(app): State<Arc<App>>) -> Result<Json<ConsumerList>, ApiError> {
    let mut items = Vec::new();
    for runner in &app.system.consumers {
        let status = runner.status().await?;
        items.push(ConsumerItem {
            name: status.name,
            kind: status.kind.into(),
            checkpoint: status.checkpoint,
            head: status.head,
            lag: status.lag,
            status: status.status.to_owned(),
            last_error: status.last_error,
            parked: status.parked,
            holder: status.holder,
            lease_expires_at: status.lease_expires_at,
            moved_at: status.moved_at,
        });
    }
    Ok(Json(ConsumerList {
        items,
        next_cursor: None,
    }))
}

/// The events a consumer parked (and nobody skipped), oldest first: a halted consumer
/// waits before the first of them.
#[utoipa::path(get, path = "/admin/consumers/{name}/parked", tag = "admin",
    params(("name" = String, Path, description = "A consumer's name, as `GET /admin/consumers` lists them"), ParkedQuery),
    responses((status = 200, description = "A page of its parked events", body = ParkedList), ParkedProblems),
    security(("bearer" = ["operator"])))]
async fn list_parked(
    State(app): State<Arc<App>>,
    Name(name): Name,
    Params(query): Params<ParkedQuery>,
) -> Result<Json<ParkedList>, ApiError> {
    let runner = consumer(&app, &name)?;
    let limit = limit(query.limit);
    let after = query
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<u64>().map_err(|_| {
                ApiError::invalid(
                    "invalid-cursor",
                    "the cursor is not one this server gave out",
                )
            })
        })
        .transpose()?
        .unwrap_or(0);
    let mut parked = runner.parked_after(after, limit + 1).await?;
    let next_cursor = (parked.len() > limit).then(|| parked[limit - 1].position.to_string());
    parked.truncate(limit);
    Ok(Json(ParkedList {
        items: parked.into_iter().map(ParkedItem::from).collect(),
        next_cursor,
    }))
}

/// Apply a parked event now, in its place in the log; a halted consumer then goes on.
#[utoipa::path(post, path = "/admin/consumers/{name}/parked/{position}/retry", tag = "admin",
    params(ParkedPath),
    responses((status = 200, description = "The event was applied", body = RetryAnswer), ParkedProblems),
    security(("bearer" = ["operator"])))]
async fn retry_parked(
    State(app): State<Arc<App>>,
    parked: Parked,
) -> Result<Json<RetryAnswer>, ApiError> {
    let runner = consumer(&app, &parked.name)?.clone();
    let position = parked.position;
    // In a task of its own: a client that hangs up does not cut the retry short.
    tokio::spawn(async move { runner.retry_parked_event(position).await })
        .await
        .map_err(|_| ApiError::Panicked)??;
    Ok(Json(RetryAnswer {
        consumer: parked.name,
        position,
        status: "applied".to_owned(),
    }))
}

/// Leave a parked event unapplied for good, recorded with the caller and the time; a
/// halted consumer goes on after it.
#[utoipa::path(post, path = "/admin/consumers/{name}/parked/{position}/skip", tag = "admin",
    params(ParkedPath),
    responses((status = 200, description = "The event is skipped", body = ParkedItem), ParkedProblems),
    security(("bearer" = ["operator"])))]
async fn skip_parked(
    State(app): State<Arc<App>>,
    Actor(actor): Actor,
    parked: Parked,
) -> Result<Json<ParkedItem>, ApiError> {
    let runner = consumer(&app, &parked.name)?;
    let skipped = runner.skip_parked_event(parked.position, &actor).await?;
    Ok(Json(skipped.into()))
}
