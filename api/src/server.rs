//! The HTTP server: the router (every route registered with its OpenAPI operation, so
//! the document is the route table), the state handlers share, and `serve`, which takes
//! its listener and its shutdown signal as arguments.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware::{from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::auth::{RouteAccess, Tokens};
use crate::edge::{self, Admission, Bounds, Hosts, admit};
use crate::error::ApiError;
use crate::extract::BODY_LIMIT;
use crate::observe::{guard, observe};
use crate::openapi::ApiDoc;
use crate::routes;
use crate::system::System;

/// How the server behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long a query waits for `min_position` (`ANNALS_CONSISTENCY_WAIT_MS`).
    pub consistency_wait: Duration,
    /// How long any request but an operator job may take; a command is cut only
    /// before its append (`CommandContext::deadline`).
    pub request_timeout: Duration,
    /// Host names the server answers to besides its listen address
    /// (`ANNALS_ALLOWED_HOSTS`; `*` for any).
    pub allowed_hosts: Vec<String>,
    /// Browser origins besides the server's own that may change state
    /// (`ANNALS_ALLOWED_ORIGINS`).
    pub allowed_origins: Vec<String>,
    /// How much of the server a client may hold.
    pub bounds: Bounds,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            consistency_wait: Duration::from_millis(5_000),
            request_timeout: Duration::from_secs(30),
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            bounds: Bounds::default(),
        }
    }
}

/// What every handler sees.
#[derive(Debug)]
pub struct App {
    pub system: Arc<System>,
    pub tokens: Tokens,
    pub routes: RouteAccess,
    pub settings: Settings,
    /// The OpenAPI document, served at `/openapi.json`.
    pub openapi: Value,
}

impl App {
    /// Waits until every named projection has applied the log up to `min_position` (when
    /// given, up to the consistency wait); returns the lowest of their checkpoints, or of
    /// lower bounds of them: what this process's runners have applied costs no query,
    /// and a read model only moves forwards. A `min_position` beyond the log's head was
    /// never given out: 422 `invalid-parameter` at once, never a 503 after the wait.
    pub async fn consistent(
        &self,
        projections: &[&str],
        min_position: Option<u64>,
    ) -> Result<u64, ApiError> {
        let deadline = Instant::now() + self.settings.consistency_wait;
        let mut lowest = u64::MAX;
        for name in projections {
            let runner = self
                .system
                .projection(name)
                .ok_or_else(|| ApiError::InvalidSettings(format!("no projection {name}")))?;
            let mut checkpoint = match runner.applied() {
                0 => runner.checkpoint().await?,
                seen => seen,
            };
            if let Some(wanted) = min_position
                && checkpoint < wanted
            {
                checkpoint = checkpoint.max(runner.checkpoint().await?);
                // No command has been given a position past the head: it is the
                // client's mistake, refused at once (waiting could not help).
                if checkpoint < wanted {
                    let head = self.system.store.head().await?;
                    if wanted > head {
                        return Err(ApiError::invalid(
                            "invalid-parameter",
                            format!(
                                "min_position {wanted} is beyond the log's last position {head}"
                            ),
                        ));
                    }
                }
                while checkpoint < wanted {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(ApiError::ProjectionLagging {
                            projection: (*name).to_owned(),
                            position: wanted,
                        });
                    }
                    // Woken at once when this process applies the position; polled in
                    // case another process runs the projection.
                    let wait = (deadline - now).min(Duration::from_millis(50));
                    runner.wait_for(wanted, wait).await;
                    checkpoint = runner.checkpoint().await?;
                }
            }
            lowest = lowest.min(checkpoint);
        }
        Ok(lowest)
    }
}

fn api() -> OpenApiRouter<Arc<App>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi()).merge(routes::all())
}

/// The router and the OpenAPI document of every route, with the domain's word lists.
fn split() -> (Router<Arc<App>>, utoipa::openapi::OpenApi) {
    let (router, mut document) = api().split_for_parts();
    crate::openapi::describe_domain_words(&mut document);
    crate::openapi::describe_text_rules(&mut document);
    crate::openapi::headers_are_never_null(&mut document);
    crate::openapi::describe_edge_refusals(&mut document);
    (router, document)
}

/// The OpenAPI document of every route.
pub fn openapi() -> utoipa::openapi::OpenApi {
    split().1
}

/// The whole HTTP interface over a system, answering requests whose `Host` is one of
/// `hosts`.
pub fn router(system: Arc<System>, tokens: Tokens, settings: Settings, hosts: Hosts) -> Router {
    let admission = Arc::new(Admission::new(hosts, &settings.allowed_origins));
    // Installed before the first request, so no metric is recorded into the void.
    crate::observe::prometheus();
    let (router, document) = split();
    let openapi = serde_json::to_value(&document).unwrap_or(Value::Null);
    let app = Arc::new(App {
        system,
        tokens,
        routes: RouteAccess::from_openapi(&openapi),
        settings,
        openapi,
    });
    router
        .route_layer(from_fn_with_state(app.clone(), guard))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        // A panic is a bug, but the client still gets a problem, not a dropped line.
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Panicked.into_response()
        }))
        .layer(from_fn_with_state(admission, admit))
        .layer(from_fn(observe))
        .with_state(app)
}

async fn not_found() -> Response {
    ApiError::not_found("not-found", "no such path").into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::MethodNotAllowed.into_response()
}

/// Serves until `shutdown` completes: then stops taking requests, finishes those in
/// flight (for up to the shutdown grace), and stops the projectors and processes at a
/// checkpoint.
pub async fn serve(
    listener: TcpListener,
    system: Arc<System>,
    tokens: Tokens,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let hosts = Hosts::new(listener.local_addr()?.ip(), &settings.allowed_hosts);
    let bounds = settings.bounds;
    let background = system.start();
    let router = router(system, tokens, settings, hosts);
    edge::serve_connections(listener, router, bounds, shutdown).await;
    tracing::info!("requests finished; stopping projections and processes");
    background.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    /// Every string a request body carries is bounded by the document: a pattern (free
    /// text, an email, a domain), a closed set of words, or a format (a UUID, a time);
    /// in a nested object or an array's items too. A new free-text field typed as the
    /// domain's text (`contract::Text`) has its pattern; a plain `String` fails here.
    #[test]
    fn every_string_of_a_request_body_has_a_pattern_a_format_or_words() {
        let document = serde_json::to_value(super::openapi()).unwrap();
        let components = &document["components"]["schemas"];
        let named = |reference: &Value| -> Option<String> {
            reference["$ref"]
                .as_str()
                .and_then(|r| r.strip_prefix("#/components/schemas/"))
                .map(str::to_owned)
        };
        let mut bodies: Vec<String> = Vec::new();
        for item in document["paths"].as_object().unwrap().values() {
            for operation in item.as_object().unwrap().values() {
                let schema = &operation["requestBody"]["content"]["application/json"]["schema"];
                bodies.extend(named(schema));
            }
        }
        let mut unbounded = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        while let Some(body) = bodies.pop() {
            if !seen.insert(body.clone()) {
                continue;
            }
            let schema = &components[&body];
            for (property, field) in schema["properties"].as_object().into_iter().flatten() {
                let mut shapes = vec![field.clone()];
                while let Some(shape) = shapes.pop() {
                    if let Some(reference) = named(&shape) {
                        bodies.push(reference);
                        continue;
                    }
                    shapes.extend(shape["oneOf"].as_array().into_iter().flatten().cloned());
                    shapes.extend(shape["items"].as_object().map(|_| shape["items"].clone()));
                    let is_string = shape["type"] == "string"
                        || shape["type"]
                            .as_array()
                            .is_some_and(|types| types.iter().any(|t| t == "string"));
                    let bounded = shape.get("pattern").is_some()
                        || shape.get("enum").is_some()
                        || shape.get("format").is_some();
                    if is_string && !bounded {
                        unbounded.push(format!("{body}.{property}"));
                    }
                }
            }
        }
        assert!(!seen.is_empty());
        assert!(
            unbounded.is_empty(),
            "strings of request bodies with no pattern, format or words: {unbounded:?}"
        );
    }

    /// The wire contract: any change to a route, a schema or a status shows up as a
    /// diff of the committed document.
    #[test]
    fn the_openapi_document_matches_its_snapshot() {
        insta::assert_json_snapshot!("openapi", super::openapi());
    }

    /// A generator groups operations by tag and names them from the document's list: no
    /// operation may carry a tag the list lacks (a new resource brings its own).
    #[test]
    fn every_operations_tag_is_in_the_documents_list() {
        let document = serde_json::to_value(super::openapi()).unwrap();
        let listed: Vec<&str> = document["tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|tag| tag["name"].as_str().unwrap())
            .collect();
        let mut used = 0;
        for (path, item) in document["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                for tag in operation["tags"].as_array().into_iter().flatten() {
                    let tag = tag.as_str().unwrap();
                    assert!(
                        listed.contains(&tag),
                        "{method} {path}: tag {tag} is not listed"
                    );
                    used += 1;
                }
            }
        }
        assert!(used > 0);
    }
}
