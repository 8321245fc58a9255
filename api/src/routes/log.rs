//! The log as stored: one stream's events and the global log, for operators.

use std::sync::Arc;

use annals_store::{Direction, LogFilter, StreamName};
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::resource;
use crate::contract;
use crate::contract::{FromNumber, Limit, Position};
use crate::dto::*;
use crate::error::ApiError;
use crate::extract::{Name, Params, limit};
use crate::openapi::OperatorProblems;
use crate::server::App;

pub fn routes() -> OpenApiRouter<Arc<App>> {
    resource("log")
        .routes(routes!(stream_events))
        .routes(routes!(log_events))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// The first version to read (default 1).
    #[param(inline)]
    pub from_version: Option<FromNumber>,
    /// Default 50.
    #[param(inline)]
    pub limit: Option<Limit>,
    /// A `next_cursor` from an earlier page (overrides `from_version`).
    #[param(pattern = "^[0-9]{1,19}$")]
    pub cursor: Option<String>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// The first position to read (default 1; 0 reads from 1 too).
    #[param(inline)]
    pub from_position: Option<Position>,
    /// Default 50.
    #[param(inline)]
    pub limit: Option<Limit>,
    /// Only events of this type.
    #[serde(rename = "type")]
    #[param(pattern = r"^[^\x00]*$")]
    pub event_type: Option<String>,
    /// A `next_cursor` from an earlier page (overrides `from_position`).
    #[param(pattern = "^[0-9]{1,19}$")]
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    pub items: Vec<EventItem>,
    pub next_cursor: Option<String>,
    /// The last position of the log when the page was read.
    pub head: u64,
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
    Name(stream): Name,
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
        items: events.into_iter().map(EventItem::from).collect(),
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
        items: page.events.into_iter().map(EventItem::from).collect(),
        head: page.head,
    }))
}
