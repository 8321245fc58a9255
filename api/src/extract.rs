//! What handlers take from a request, with every failure an `ApiError`: a JSON body
//! (400 when it is not JSON, 422 when it is not the command, 413 past the limit), query
//! parameters (422), and a command's headers and caller.

use annals_commands::CommandContext;
use annals_store::EncryptedStore;
use axum::extract::{
    FromRequest, FromRequestParts, MatchedPath, Path, Query, RawPathParams, Request,
};
use axum::http::header;
use axum::http::request::Parts;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::auth::Caller;
use crate::contract::{self, Limit};

use crate::error::ApiError;
use crate::observe::{CorrelationId, RequestDeadline};

/// The largest body the API reads.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// A JSON body, sent as `application/json` (or a `+json` type; 415 otherwise); an empty
/// body reads as `{}`. `digest` identifies the body's content
/// (whatever its key order or spacing), for idempotency.
#[derive(Debug)]
pub struct JsonBody<T> {
    pub value: T,
    pub digest: String,
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, ApiError> {
        let json_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                let essence = v
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                essence == "application/json" || essence.ends_with("+json")
            });
        let deadline = request.extensions().get::<RequestDeadline>().copied();
        let bytes = match deadline {
            Some(RequestDeadline(deadline)) => {
                tokio::time::timeout_at(deadline, read_body(request))
                    .await
                    .map_err(|_| ApiError::BodyTimeout)??
            }
            None => read_body(request).await?,
        };
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else if json_type != Some(true) {
            // Without a type too: a page's no-CORS `fetch` of a Blob sends none.
            return Err(ApiError::UnsupportedMediaType);
        } else {
            &bytes
        };
        let value = serde_json::from_slice::<T>(bytes).map_err(|error| match error.classify() {
            serde_json::error::Category::Data => {
                ApiError::invalid("invalid-request", error.to_string())
            }
            _ => ApiError::MalformedJson(error.to_string()),
        })?;
        // The same content hashes the same, whatever the key order or spacing.
        let canonical = serde_json::from_slice::<serde_json::Value>(bytes)
            .map(|v| v.to_string())
            .unwrap_or_default();
        Ok(JsonBody {
            value,
            digest: hex::encode(Sha256::digest(canonical.as_bytes())),
        })
    }
}

/// How much of an over-long body is read and thrown away before the 413 goes out: a
/// client still sending when the connection closes sees a broken connection, not the
/// answer. Past this much, the connection is closed on it anyway.
const DRAIN_LIMIT: usize = 16 * BODY_LIMIT;

/// The body, up to `BODY_LIMIT`; past it, 413 once the rest is drained.
async fn read_body(request: Request) -> Result<Vec<u8>, ApiError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|length| length > DRAIN_LIMIT) {
        return Err(ApiError::PayloadTooLarge);
    }
    let mut chunks = request.into_body().into_data_stream();
    let mut body = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = chunks.next().await {
        let chunk =
            chunk.map_err(|_| ApiError::MalformedJson("the body could not be read".to_owned()))?;
        seen = seen.saturating_add(chunk.len());
        if seen > DRAIN_LIMIT {
            break;
        }
        if seen <= BODY_LIMIT {
            body.extend_from_slice(&chunk);
        }
    }
    if seen > BODY_LIMIT {
        return Err(ApiError::PayloadTooLarge);
    }
    Ok(body)
}

/// Query parameters; a value that does not parse is a 422.
#[derive(Debug)]
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        // No database stores NUL in text; refused here, it never reaches one.
        if parts
            .uri
            .query()
            .is_some_and(|q| q.to_ascii_lowercase().contains("%00"))
        {
            return Err(ApiError::invalid(
                "invalid-parameter",
                "parameters may not contain the NUL character",
            ));
        }
        Query::<T>::try_from_uri(&parts.uri)
            .map(|Query(value)| Params(value))
            .map_err(|rejection| ApiError::invalid("invalid-parameter", rejection.body_text()))
    }
}

/// The page size of a list: 1–500 (`Limit` refuses anything else), 50 when not given.
pub fn limit(given: Option<Limit>) -> usize {
    given.map_or(50, |n| usize::try_from(n.get()).unwrap_or(50))
}

/// Who sends a command and under which preconditions: the caller, the correlation id,
/// `If-Match` and `Idempotency-Key`, and the route (part of the idempotency digest).
#[derive(Debug, Clone)]
pub struct CommandMeta {
    pub caller: Caller,
    pub correlation_id: String,
    pub expected_version: Option<u64>,
    pub idempotency_key: Option<String>,
    route: String,
    deadline: Option<tokio::time::Instant>,
}

impl CommandMeta {
    /// The command context for a body with this digest. The request's digest is a keyed
    /// hash (the idempotency record keeps it, and a body may carry personal data).
    pub fn context(&self, body_digest: &str, personal: &EncryptedStore) -> CommandContext {
        let request = [self.route.as_bytes(), &[0], body_digest.as_bytes()].concat();
        CommandContext {
            actor: self.caller.actor.clone(),
            correlation_id: Some(self.correlation_id.clone()),
            causation_id: None,
            expected_version: self.expected_version,
            idempotency_key: self.idempotency_key.clone(),
            request_hash: Some(personal.keyed_hash(&request)),
            deadline: self.deadline,
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for CommandMeta {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let caller = parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or(ApiError::Unauthorized)?;
        let correlation_id = parts
            .extensions
            .get::<CorrelationId>()
            .map(|c| c.0.clone())
            .unwrap_or_default();
        let header_text = |name: &str, code: &'static str| -> Result<Option<String>, ApiError> {
            parts
                .headers
                .get(name)
                // An empty value is no value (as schemathesis and most clients send an
                // empty string for an absent one).
                .filter(|v| !v.is_empty())
                .map(|v| {
                    v.to_str()
                        .map(str::to_owned)
                        .map_err(|_| ApiError::BadHeader {
                            code,
                            detail: format!("{name} must be visible ASCII"),
                        })
                })
                .transpose()
        };
        // Each header has exactly the form the document gives it (`contract`).
        let expected_version = header_text("if-match", "invalid-if-match")?
            .map(|text| {
                contract::if_match(&text).ok_or_else(|| ApiError::BadHeader {
                    code: "invalid-if-match",
                    detail: format!("If-Match must be a version in quotes, like \"3\", not {text}"),
                })
            })
            .transpose()?;
        let idempotency_key = header_text("idempotency-key", "invalid-idempotency-key")?;
        if let Some(key) = &idempotency_key
            && !contract::idempotency_key(key)
        {
            return Err(ApiError::invalid(
                "invalid-idempotency-key",
                "Idempotency-Key must be 1 to 200 visible ASCII characters",
            ));
        }
        let path = understood_path(parts).await;
        let route = format!("{} {path}", parts.method);
        let deadline = parts
            .extensions
            .get::<RequestDeadline>()
            .map(|deadline| deadline.0);
        Ok(CommandMeta {
            caller,
            correlation_id,
            expected_version,
            idempotency_key,
            route,
            deadline,
        })
    }
}

/// The path as the server understood it: the route with each parameter as it was read
/// (an id in its one spelling, whatever the letter case it was sent in), so that a retry
/// spelled otherwise is the same request.
async fn understood_path(parts: &mut Parts) -> String {
    let Some(route) = parts
        .extensions
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
    else {
        return parts.uri.path().to_owned();
    };
    let Ok(params) = RawPathParams::from_request_parts(parts, &()).await else {
        return parts.uri.path().to_owned();
    };
    params.iter().fold(route, |path, (name, value)| {
        let value =
            uuid::Uuid::parse_str(value).map_or_else(|_| value.to_owned(), |id| id.to_string());
        path.replace(&format!("{{{name}}}"), &value)
    })
}

/// A name from the path (a projection's, a consumer's, a stream's); one that is not
/// UTF-8 names nothing (404, as every refusal, a problem).
#[derive(Debug, Clone)]
pub struct Name(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Name {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(name)| Name(name))
            .map_err(|_| ApiError::not_found("not-found", "the path names nothing here"))
    }
}

/// An aggregate id from the path; one that is not a UUID names nothing (404).
#[derive(Debug, Clone, Copy)]
pub struct Id(pub uuid::Uuid);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(text) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::not_found("not-found", "no such id"))?;
        uuid::Uuid::parse_str(&text).map(Id).map_err(|_| {
            ApiError::not_found(
                "not-found",
                format!("{text:?} is not an id this server gave out"),
            )
        })
    }
}
