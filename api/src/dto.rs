//! The JSON shapes every resource shares: money, a command's answer and headers, the
//! consistency a read asks for, an aggregate's history and an event as stored, each with
//! its OpenAPI schema. A resource's own bodies and answers are in its file under
//! `routes`. Only this crate knows these shapes.

use annals_domain::DomainError;
use annals_domain::values::Money;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::contract::Position;

/// An amount of money: an ISO 4217 code and a whole number of minor units (cents).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"currency": "EUR", "amount_minor": 129900}))]
pub struct MoneyBody {
    #[schema(pattern = "^[A-Z]{3}$")]
    pub currency: String,
    #[schema(minimum = 0, maximum = 1_000_000_000_000_000_i64)]
    #[serde(deserialize_with = "crate::contract::integer")]
    pub amount_minor: i64,
}

impl MoneyBody {
    pub fn parse(&self) -> Result<Money, DomainError> {
        Money::parse(&self.currency, self.amount_minor)
    }
}

/// An amount of money above zero: an ISO 4217 code and a whole number of minor units.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"currency": "EUR", "amount_minor": 9900}))]
pub struct PositiveMoneyBody {
    #[schema(pattern = "^[A-Z]{3}$")]
    pub currency: String,
    #[schema(minimum = 1, maximum = 1_000_000_000_000_000_i64)]
    #[serde(deserialize_with = "crate::contract::integer")]
    pub amount_minor: i64,
}

impl PositiveMoneyBody {
    pub fn parse(&self) -> Result<Money, DomainError> {
        Money::parse(&self.currency, self.amount_minor)
    }
}

impl From<&Money> for MoneyBody {
    fn from(money: &Money) -> Self {
        MoneyBody {
            currency: money.currency.as_str().to_owned(),
            amount_minor: money.amount_minor,
        }
    }
}

/// What a command did.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(example = json!({"id": "0193a1f0-7c2e-7d3a-9b1e-2f4c5d6e7f80", "version": 3, "position": 1042, "events": ["SignalRecorded", "LeadQualified"]}))]
pub struct CommandAnswer {
    pub id: Uuid,
    /// The aggregate's version after the command (its number of events).
    pub version: u64,
    /// The global log position of the last event appended: the consistency token for
    /// `min_position`.
    pub position: u64,
    /// The events appended, in order.
    pub events: Vec<String>,
    /// For a conversion: the account the lead was converted into.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_id: Option<Uuid>,
    /// For a conversion: the deal it opens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deal_id: Option<Uuid>,
    /// For an erasure of a lead captured before personal data was encrypted: how many of
    /// its events hold its email and name in clear, which the log keeps (rewriting them
    /// would break the hash chain); every answer shows them as erased all the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events_in_clear: Option<u64>,
}

/// The headers a command reads.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct CommandHeaders {
    /// `"<version>"`: apply only if the aggregate is at exactly this version (412
    /// `version-mismatch` otherwise). Empty: no condition. (The spaces and tabs around a
    /// header's value are not part of it, RFC 9110 §5.5.)
    #[serde(rename = "If-Match")]
    #[param(pattern = r#"^[ \t]*("[0-9]{1,18}"[ \t]*)?$"#)]
    pub if_match: Option<String>,
    /// 1–200 visible ASCII characters: a retry with the same key and body gets the
    /// first answer and appends nothing; kept at least 24 hours. Empty: no key.
    #[serde(rename = "Idempotency-Key")]
    #[param(pattern = r"^[ \t]*([!-~]([ -~]{0,198}[!-~])?[ \t]*)?$")]
    pub idempotency_key: Option<String>,
    /// Ties the request's events together; echoed, or made by the server.
    #[serde(rename = "Correlation-Id")]
    pub correlation_id: Option<String>,
}

/// A read model that is behind by up to `min_position`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Consistency {
    /// Wait (up to `ANNALS_CONSISTENCY_WAIT_MS`) until the read model has applied the log
    /// up to this position (a command's `position`); 503 `projection-lagging` otherwise.
    /// A position beyond the log's last one was never given out: 422
    /// `invalid-parameter`, at once.
    #[param(inline)]
    pub min_position: Option<Position>,
}

impl Consistency {
    /// The position asked for, if any.
    pub fn position(&self) -> Option<u64> {
        self.min_position.map(Position::unsigned)
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// The state as it was at this time (RFC 3339). With `version` too: the state at
    /// whichever of the two comes first.
    pub as_of: Option<DateTime<Utc>>,
    /// The state as it was at this version (the current one when it is past it).
    #[param(inline)]
    pub version: Option<Position>,
}

/// An aggregate as it was at a version or a time, rebuilt from its events.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryView {
    pub id: Uuid,
    /// The version the state includes (0: it did not exist yet).
    pub version: u64,
    pub as_of: Option<DateTime<Utc>>,
    #[schema(value_type = Object)]
    pub state: serde_json::Value,
}

/// An event as stored.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventItem {
    pub position: u64,
    pub stream: String,
    pub version: u64,
    #[serde(rename = "type")]
    pub event_type: String,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    /// `event_id`, `correlation_id`, `causation_id`, `actor`, `recorded_at`,
    /// `schema_version`, and any other keys the writer added.
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    pub recorded_at: DateTime<Utc>,
}

impl From<annals_store::RecordedEvent> for EventItem {
    fn from(event: annals_store::RecordedEvent) -> Self {
        let mut metadata =
            serde_json::to_value(&event.metadata).unwrap_or_else(|_| serde_json::json!({}));
        if let serde_json::Value::Object(fields) = &mut metadata {
            fields.insert("event_id".into(), serde_json::json!(event.event_id));
            fields.insert("recorded_at".into(), serde_json::json!(event.recorded_at));
            fields.insert(
                "schema_version".into(),
                serde_json::json!(event.schema_version),
            );
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
}
