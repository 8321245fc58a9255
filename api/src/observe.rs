//! What every request passes through: its correlation id (taken from `Correlation-Id`,
//! or made) on every log line and echoed in the answer; the caller's token checked
//! against the route's roles; the request timeout; the headers every answer carries;
//! and the Prometheus metrics.
//!
//! Invariant: every metric label takes its value from a closed set (a method HTTP
//! defines or `other`, the matched route or `unmatched`, a status, a command's name), so
//! no client can grow `/metrics`.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::Instrument;

use crate::error::ApiError;
use crate::server::App;

/// The request's correlation id, for handlers (it goes into event metadata).
#[derive(Debug, Clone)]
pub struct CorrelationId(pub String);

const CORRELATION_ID: &str = "correlation-id";

/// The process's Prometheus recorder, installed once.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("_seconds".to_owned()),
                &[
                    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0,
                ],
            )
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Fails only when another recorder is installed (a test process); the handle
        // still renders this recorder's (empty) metrics then.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Outermost: correlation id, a span carrying it, timing and the request counter.
pub async fn observe(request: Request, next: Next) -> Response {
    let correlation_id = request
        .headers()
        .get(CORRELATION_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let method = request.method().clone();
    let span = tracing::info_span!(
        "request",
        correlation_id = %correlation_id,
        method = %method,
        path = %request.uri().path(),
    );
    let mut request = request;
    request
        .extensions_mut()
        .insert(CorrelationId(correlation_id.clone()));
    let started = Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let route = response
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let status = response.status().as_u16().to_string();
    let method = method_label(&method);
    metrics::counter!(
        "annals_http_requests_total",
        "method" => method,
        "route" => route.clone(),
        "status" => status.clone(),
    )
    .increment(1);
    metrics::histogram!(
        "annals_http_request_duration_seconds",
        "method" => method,
        "route" => route,
    )
    .record(elapsed.as_secs_f64());
    span.in_scope(
        || tracing::debug!(status = %status, elapsed_ms = elapsed.as_millis() as u64, "answered"),
    );
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&correlation_id) {
        headers.insert(CORRELATION_ID, value);
    }
    // No answer is sniffed into another type, and none is kept by a cache: most carry a
    // person's email or name, and every one says how far the log had been read.
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// A method as a metric's label: one of the methods HTTP defines, else `other` (a
/// client may send any token as a method, and every label value is a new series kept
/// for the process's life).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
}

/// Per route: the caller's token against the route's roles, then the handler under the
/// request timeout (operator jobs under `/admin` run as long as they need; a command is
/// given up only before its append, see `RequestDeadline`).
pub async fn guard(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let path = matched.as_ref().map_or("", |p| p.as_str()).to_owned();
    let access = app.routes.of(request.method(), &path);
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let caller = app.tokens.caller(authorization);
    let mut request = request;
    let mut response = match (access, caller) {
        (crate::auth::Access::Open, caller) => {
            if let Some(caller) = caller {
                request.extensions_mut().insert(caller);
            }
            run(&app, &path, request, next).await
        }
        (_, None) => {
            let mut response = ApiError::Unauthorized.into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
        (access, Some(caller)) if access.admits(caller.role) => {
            request.extensions_mut().insert(caller);
            run(&app, &path, request, next).await
        }
        (_, Some(_)) => ApiError::Forbidden.into_response(),
    };
    if let Some(matched) = matched {
        response.extensions_mut().insert(matched);
    }
    response
}

/// When the server stops waiting for a command: until its append is sent, and no longer.
#[derive(Debug, Clone, Copy)]
pub struct RequestDeadline(pub tokio::time::Instant);

async fn run(app: &App, path: &str, mut request: Request, next: Next) -> Response {
    if path.starts_with("/admin/") {
        return next.run(request).await;
    }
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        // A command is never cut from outside: once its append is sent it may commit,
        // and an answer of 503 would invite a retry that duplicates it. Its body's read
        // and its steps before the append keep to the deadline; after, it is answered
        // with what the store did.
        let deadline = tokio::time::Instant::now() + app.settings.request_timeout;
        request.extensions_mut().insert(RequestDeadline(deadline));
        return next.run(request).await;
    }
    match tokio::time::timeout(app.settings.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout(app.settings.request_timeout).into_response(),
    }
}

/// Records one command's outcome and how long it took (its append included).
pub fn command_done(command: &str, outcome: &str, took: Duration) {
    metrics::counter!(
        "annals_commands_total",
        "command" => command.to_owned(),
        "outcome" => outcome.to_owned(),
    )
    .increment(1);
    metrics::histogram!("annals_append_duration_seconds", "command" => command.to_owned())
        .record(took.as_secs_f64());
}
