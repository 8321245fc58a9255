//! The API's one error enum, and the one place where every error of every crate becomes
//! an HTTP answer: an RFC 9457 problem (`application/problem+json`) with a stable `code`.
//!
//! Invariant: a 4xx says what the client can fix; a 5xx says nothing of the server's
//! insides (no SQL, no path, no source chain): the real error goes to the log.

use std::time::Duration;

use annals_commands::CommandError;
use annals_domain::{DomainError, RejectionKind};
use annals_engine::ConsumerError;
use annals_store::StoreError;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// The code of a 409 whose request may be retried after `Retry-After` seconds.
pub const IDEMPOTENCY_KEY_IN_USE: &str = "idempotency-key-in-use";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Projection(#[from] ConsumerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The body is not JSON (or not UTF-8): 400.
    #[error("the body is not valid JSON: {0}")]
    MalformedJson(String),
    /// A header the server reads is malformed: 400.
    #[error("{detail}")]
    BadHeader { code: &'static str, detail: String },
    /// The request is well-formed JSON but not a valid request: 422.
    #[error("{detail}")]
    Invalid { code: &'static str, detail: String },
    #[error("{detail}")]
    NotFound { code: &'static str, detail: String },
    #[error("{detail}")]
    Conflict { code: &'static str, detail: String },
    #[error("a bearer token is required, and this one is not known")]
    Unauthorized,
    #[error("this token's role may not use this endpoint")]
    Forbidden,
    #[error("the body is larger than 1 MiB")]
    PayloadTooLarge,
    #[error("the body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("this path does not take this method")]
    MethodNotAllowed,
    /// The request's `Host` names another server (a DNS rebinding, or a setting missing
    /// from `ANNALS_ALLOWED_HOSTS`): 421.
    #[error(
        "this server does not answer to the request's Host; it answers to its listen \
         address and to the names in ANNALS_ALLOWED_HOSTS"
    )]
    UnknownHost,
    /// A browser page of another origin tried to change state: 403.
    #[error(
        "a page of origin {0} may not change state here; the server's own origin and those \
         in ANNALS_ALLOWED_ORIGINS may"
    )]
    CrossOrigin(String),
    #[error("projection {projection} has not reached position {position} yet")]
    ProjectionLagging { projection: String, position: u64 },
    #[error("the request took longer than {0:?}")]
    Timeout(Duration),
    /// A command's body did not arrive before its deadline: nothing was written.
    #[error("the body did not arrive in time; nothing was written")]
    BodyTimeout,
    #[error("the server is not ready: {0}")]
    NotReady(String),
    /// What was asked for is gone for good (an erased lead's personal data): 410.
    #[error("the lead's personal data was erased")]
    Gone,
    /// A handler panicked (a bug): the answer is a plain 500.
    #[error("a handler panicked")]
    Panicked,
    /// A setting the server starts with is wrong (never an HTTP answer).
    #[error("{0}")]
    InvalidSettings(String),
}

/// An RFC 9457 problem, as every error answer carries it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem (`urn:annals:problem:<code>`).
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The stable code clients match on (`duplicate-email`, `version-mismatch`, …).
    pub code: String,
    /// For `duplicate-email`, to a caller whose role may read leads: the lead that
    /// holds the email.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub existing_id: Option<String>,
}

impl From<DomainError> for ApiError {
    fn from(rejection: DomainError) -> Self {
        ApiError::Command(CommandError::Domain(rejection))
    }
}

impl ApiError {
    pub fn invalid(code: &'static str, detail: impl Into<String>) -> Self {
        ApiError::Invalid {
            code,
            detail: detail.into(),
        }
    }

    pub fn not_found(code: &'static str, detail: impl Into<String>) -> Self {
        ApiError::NotFound {
            code,
            detail: detail.into(),
        }
    }

    /// The stable code of the answer (`ok` is not one): also the outcome label of the
    /// command metrics.
    pub fn code(&self) -> &'static str {
        self.answer().1
    }

    /// The status, the stable code, and what the client is told.
    fn answer(&self) -> (StatusCode, &'static str, String) {
        use ApiError::*;
        let told = || self.to_string();
        match self {
            Command(CommandError::Domain(rejection)) => domain(rejection),
            Command(CommandError::VersionMismatch { .. }) => {
                (StatusCode::PRECONDITION_FAILED, "version-mismatch", told())
            }
            Command(CommandError::ConcurrencyConflict { .. }) => {
                (StatusCode::CONFLICT, "concurrency-conflict", told())
            }
            Command(CommandError::IdempotencyKeyReused) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                told(),
            ),
            Command(CommandError::IdempotencyKeyInUse) => {
                (StatusCode::CONFLICT, IDEMPOTENCY_KEY_IN_USE, told())
            }
            Command(CommandError::InvalidId(_)) => (StatusCode::NOT_FOUND, "not-found", told()),
            Command(CommandError::Store(error)) | Store(error) => store(error),
            Command(CommandError::Decode(_)) => internal(),
            Projection(ConsumerError::InvalidCursor) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid-cursor", told())
            }
            Projection(ConsumerError::Busy(_)) => (StatusCode::CONFLICT, "projection-busy", told()),
            Projection(ConsumerError::Store(error) | ConsumerError::Database(error)) => {
                store(error)
            }
            // An operator's retry of a process's event met the store down.
            Projection(ConsumerError::Action(action))
                if let Some(CommandError::Store(error)) = action.downcast_ref() =>
            {
                store(error)
            }
            // A process's retry met another runner moving the consumer on meanwhile.
            Projection(ConsumerError::CheckpointMoved(_)) => {
                (StatusCode::CONFLICT, "projection-busy", told())
            }
            Projection(ConsumerError::NotParked { .. }) => {
                (StatusCode::NOT_FOUND, "not-parked", told())
            }
            Projection(ConsumerError::StillFailing { .. }) => {
                (StatusCode::CONFLICT, "still-failing", told())
            }
            Projection(_) => internal(),
            MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed-json", told()),
            BadHeader { code, .. } => (StatusCode::BAD_REQUEST, code, told()),
            Invalid { code, .. } => (StatusCode::UNPROCESSABLE_ENTITY, code, told()),
            NotFound { code, .. } => (StatusCode::NOT_FOUND, code, told()),
            Conflict { code, .. } => (StatusCode::CONFLICT, code, told()),
            Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", told()),
            Forbidden => (StatusCode::FORBIDDEN, "forbidden", told()),
            PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "body-too-large", told()),
            UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                told(),
            ),
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", told()),
            UnknownHost => (StatusCode::MISDIRECTED_REQUEST, "unknown-host", told()),
            CrossOrigin(_) => (StatusCode::FORBIDDEN, "cross-origin", told()),
            ProjectionLagging { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "projection-lagging",
                told(),
            ),
            Timeout(_) | BodyTimeout | Command(CommandError::TimedOut) => {
                (StatusCode::SERVICE_UNAVAILABLE, "timeout", told())
            }
            InvalidSettings(_) | Panicked => internal(),
            Gone => (StatusCode::GONE, "erased", told()),
            NotReady(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "not-ready",
                "the event store does not answer".to_owned(),
            ),
        }
    }
}

fn domain(rejection: &DomainError) -> (StatusCode, &'static str, String) {
    let status = match rejection.kind() {
        RejectionKind::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
        RejectionKind::Conflict => StatusCode::CONFLICT,
        RejectionKind::NotFound => StatusCode::NOT_FOUND,
    };
    (status, rejection.code(), rejection.to_string())
}

fn store(error: &StoreError) -> (StatusCode, &'static str, String) {
    match error {
        StoreError::Unavailable(_) | StoreError::Closed => unavailable(),
        StoreError::InvalidInput(input) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-request",
            input.to_string(),
        ),
        StoreError::Shredded { .. } => (
            StatusCode::CONFLICT,
            "erased",
            "the lead's personal data was erased".to_owned(),
        ),
        _ => internal(),
    }
}

fn unavailable() -> (StatusCode, &'static str, String) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the database is unavailable; retry shortly".to_owned(),
    )
}

fn internal() -> (StatusCode, &'static str, String) {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the server failed; the error is in its log".to_owned(),
    )
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, detail) = self.answer();
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(error = %chain(&self), "request failed");
        } else if status.is_server_error() {
            tracing::warn!(error = %chain(&self), "request refused: {code}");
        }
        let existing_id = match &self {
            ApiError::Command(CommandError::Domain(DomainError::DuplicateEmail { existing })) => {
                Some(existing.to_string())
            }
            _ => None,
        };
        let problem = Problem {
            kind: format!("urn:annals:problem:{code}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail,
            code: code.to_owned(),
            existing_id,
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        // Worth retrying shortly: an outage, or a key whose first request is still being
        // carried out (the retry then gets its answer).
        if status == StatusCode::SERVICE_UNAVAILABLE || code == IDEMPOTENCY_KEY_IN_USE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// The error and its causes, for the log.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
