//! The smallest outbound consumer: every event it follows, posted as JSON to one URL
//! with a bearer secret; the shape the webhooks and the broker relay take.
//!
//! A delivery is a `POST` of `{id, type, position, stream, data}` with the headers
//! `authorization: Bearer <secret>` and `idempotency-key: <event id>` (the same on
//! every redelivery, so the receiver drops duplicates). Any 2xx is delivered; a 4xx
//! other than 408 and 429 is the receiver refusing the event for good (parked); any
//! other answer, no answer within the timeout, or no connection is retried.

use std::time::Duration;

use annals_engine::{ActionError, Outbound};
use annals_store::{LogFilter, RecordedEvent};
use async_trait::async_trait;

/// The consumer's name: its checkpoint's, lease's and dead letters' key.
pub const NAME: &str = "forward";

/// Where to deliver, and how: the URL, the secret, and the client that delivers (made
/// once, with the timeout and no redirects).
#[derive(Clone)]
pub struct Target {
    pub url: String,
    /// Sent as a bearer token with every delivery; never logged.
    secret: String,
    /// The event types delivered (every type when empty).
    pub event_types: Vec<String>,
    client: reqwest::Client,
}

impl Target {
    /// A target whose deliveries each take at most `timeout` before they are tried again.
    pub fn new(
        url: impl Into<String>,
        secret: impl Into<String>,
        timeout: Duration,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            // A redirect could point a delivery anywhere: it is an answer, not followed.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Target {
            url: url.into(),
            secret: secret.into(),
            event_types: Vec::new(),
            client,
        })
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("url", &self.url)
            .field("secret", &"***")
            .field("event_types", &self.event_types)
            .finish()
    }
}

/// Posts each event to the target.
#[derive(Debug)]
pub struct Forward {
    target: Target,
}

impl Forward {
    pub fn new(target: Target) -> Self {
        Forward { target }
    }
}

#[async_trait]
impl Outbound for Forward {
    fn name(&self) -> &'static str {
        NAME
    }

    fn filter(&self) -> LogFilter {
        match self.target.event_types.as_slice() {
            [] => LogFilter::all(),
            types => LogFilter::event_types(types.iter().cloned()),
        }
    }

    async fn deliver(&self, event: &RecordedEvent) -> Result<(), ActionError> {
        let body = serde_json::json!({
            "id": event.event_id,
            "type": event.event_type,
            "position": event.position,
            "stream": event.stream,
            "data": event.data,
        });
        let answer = self
            .target
            .client
            .post(&self.target.url)
            .bearer_auth(&self.target.secret)
            .header("idempotency-key", event.event_id.to_string())
            .json(&body)
            .send()
            .await
            .map_err(|error| ActionError::not_now(error.without_url()))?;
        let status = answer.status();
        if status.is_success() {
            return Ok(());
        }
        let refused = format!("{} answered {status}", self.target.url);
        if status.is_client_error()
            && status != reqwest::StatusCode::REQUEST_TIMEOUT
            && status != reqwest::StatusCode::TOO_MANY_REQUESTS
        {
            Err(ActionError::refused(refused))
        } else {
            Err(ActionError::not_now(refused))
        }
    }
}
