//! The JSON the API speaks: command bodies (unknown fields refused), answers, and query
//! parameters, each with its OpenAPI schema. Only this crate knows these shapes; turning
//! a body into a domain command validates it through the domain's value objects.

use annals_domain::DomainError;
use annals_domain::values::Money;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::contract::{Count, FromNumber, Limit, Position};

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

impl From<&Money> for MoneyBody {
    fn from(money: &Money) -> Self {
        MoneyBody {
            currency: money.currency.as_str().to_owned(),
            amount_minor: money.amount_minor,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"email": "ada@example.com", "name": "Ada Lovelace", "company": "Analytical Engines", "source": "web"}))]
pub struct CaptureLead {
    /// The id the client wants (idempotent creation); the server makes a UUIDv7 otherwise.
    pub id: Option<Uuid>,
    /// One `@`, a dot after it, at most 254 characters (the pattern says exactly
    /// which); stored trimmed and lower-cased.
    #[schema(min_length = 1, max_length = 254)]
    pub email: String,
    /// 1–200 characters once trimmed (the pattern says so).
    pub name: String,
    /// 1–200 characters once trimmed (the pattern says so).
    pub company: Option<String>,
    /// `web`, `event`, `referral`, `outbound` or `partner`.
    pub source: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"kind": "demo_request"}))]
pub struct RecordSignal {
    /// `page_view`, `email_open`, `email_click`, `content_download`, `webinar_attended`,
    /// `pricing_page_view` or `demo_request`.
    pub kind: String,
    pub occurred_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"owner": "grace"}))]
pub struct AssignLead {
    /// 1–100 characters once trimmed.
    pub owner: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"reason": "no budget this year"}))]
pub struct DisqualifyLead {
    /// 1–500 characters once trimmed.
    pub reason: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"deal_name": "Engines for Acme", "amount": {"currency": "EUR", "amount_minor": 129900}}))]
pub struct ConvertLead {
    /// 1–200 characters once trimmed.
    pub deal_name: String,
    pub amount: MoneyBody,
    /// An existing account to convert into; a new account is opened otherwise.
    pub account_id: Option<Uuid>,
    /// The id the new deal gets; the server makes one otherwise.
    pub deal_id: Option<Uuid>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "Initech", "domain": "initech.example", "employees": 40, "tier": "key"}))]
pub struct OpenAccount {
    pub id: Option<Uuid>,
    /// 1–200 characters once trimmed.
    pub name: String,
    /// 1–200 characters once trimmed.
    pub domain: Option<String>,
    /// 1–200 characters once trimmed.
    pub industry: Option<String>,
    /// Not negative (`negative-number` otherwise).
    #[schema(minimum = 0, maximum = 9_223_372_036_854_775_807_i64)]
    #[serde(default, deserialize_with = "crate::contract::optional_integer")]
    pub employees: Option<i64>,
    /// `standard` (the default) or `key`.
    pub tier: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenameAccount {
    /// 1–200 characters once trimmed.
    pub name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"tier": "key"}))]
pub struct SetAccountTier {
    pub tier: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenDeal {
    pub id: Option<Uuid>,
    pub account_id: Uuid,
    /// 1–200 characters once trimmed.
    pub name: String,
    pub amount: MoneyBody,
    /// 1–100 characters once trimmed.
    pub owner: Option<String>,
    pub expected_close: Option<NaiveDate>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"stage": "demo"}))]
pub struct AdvanceDeal {
    /// `qualification`, `demo`, `proposal` or `negotiation`: a later stage than now.
    pub stage: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeDealAmount {
    pub amount: MoneyBody,
}

/// An empty object (the body may also be left out).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WinDeal {}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoseDeal {
    /// 1–500 characters once trimmed.
    pub reason: String,
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
pub struct LeadListQuery {
    /// `new`, `working`, `qualified`, `converted` or `disqualified`.
    pub status: Option<String>,
    #[param(pattern = r"^[^\x00]*$")]
    pub owner: Option<String>,
    pub source: Option<String>,
    #[param(inline)]
    pub min_score: Option<Count>,
    /// Default 50.
    #[param(inline)]
    pub limit: Option<Limit>,
    /// A `next_cursor` from an earlier page.
    #[param(pattern = r"^-?[0-9]{1,19}_[0-9A-Za-z:.\-]{0,64}_[0-9A-Za-z:.\-]{0,64}$")]
    pub cursor: Option<String>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DealListQuery {
    /// A stage (`prospecting` … `negotiation`: open deals at it) or `won` / `lost`.
    pub stage: Option<String>,
    #[param(pattern = r"^[^\x00]*$")]
    pub owner: Option<String>,
    pub account_id: Option<Uuid>,
    /// Default 50.
    #[param(inline)]
    pub limit: Option<Limit>,
    /// A `next_cursor` from an earlier page.
    #[param(pattern = r"^-?[0-9]{1,19}_[0-9A-Za-z:.\-]{0,64}$")]
    pub cursor: Option<String>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FunnelQuery {
    /// RFC 3339, inclusive; all time without it.
    pub from: Option<DateTime<Utc>>,
    /// RFC 3339, exclusive; all time without it.
    pub to: Option<DateTime<Utc>>,
    pub source: Option<String>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PipelineQuery {
    #[param(pattern = r"^[^\x00]*$")]
    pub owner: Option<String>,
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

/// One lead of the lead board.
#[derive(Debug, Serialize, ToSchema)]
pub struct LeadItem {
    pub id: String,
    pub email: String,
    pub name: String,
    pub company: Option<String>,
    pub source: String,
    pub status: String,
    pub score: i64,
    pub owner: Option<String>,
    pub captured_at: String,
    pub qualified_at: Option<String>,
    pub converted_deal_id: Option<String>,
    pub converted_account_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LeadList {
    pub items: Vec<LeadItem>,
    pub next_cursor: Option<String>,
}

/// One deal of the deal board.
#[derive(Debug, Serialize, ToSchema)]
pub struct DealItem {
    pub id: String,
    pub account_id: String,
    pub name: String,
    /// The last stage it reached.
    pub stage: String,
    /// `open`, `won` or `lost`.
    pub status: String,
    pub amount: MoneyBody,
    pub owner: Option<String>,
    pub expected_close: Option<String>,
    pub opened_at: String,
    pub closed_at: Option<String>,
    pub lost_reason: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DealList {
    pub items: Vec<DealItem>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AccountDealItem {
    pub id: String,
    pub name: String,
    pub stage: String,
    pub status: String,
    pub amount: MoneyBody,
}

/// An account with its deals, converted leads and won amounts.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountView {
    pub id: String,
    pub name: String,
    pub domain: Option<String>,
    pub industry: Option<String>,
    pub employees: Option<i64>,
    pub tier: String,
    pub deals: Vec<AccountDealItem>,
    pub converted_leads: Vec<String>,
    /// Won amount per currency.
    pub won: Vec<MoneyBody>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FunnelStepsView {
    pub captured: i64,
    pub qualified: i64,
    pub converted: i64,
    pub deal_won: i64,
    pub qualification_rate: Option<f64>,
    pub conversion_rate: Option<f64>,
    pub win_rate: Option<f64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FunnelSource {
    pub source: String,
    #[serde(flatten)]
    pub steps: FunnelStepsView,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FunnelView {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub overall: FunnelStepsView,
    pub by_source: Vec<FunnelSource>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StageFigureView {
    pub owner: Option<String>,
    pub stage: String,
    pub currency: String,
    pub count: i64,
    pub amount_minor: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PipelineView {
    pub stages: Vec<StageFigureView>,
    pub by_owner: Vec<StageFigureView>,
    pub won: i64,
    pub lost: i64,
    pub win_rate: Option<f64>,
    pub average_days_to_close: Option<f64>,
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

#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    pub items: Vec<EventItem>,
    pub next_cursor: Option<String>,
    /// The last position of the log when the page was read.
    pub head: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectionItem {
    pub name: String,
    pub checkpoint: u64,
    pub head: u64,
    pub lag: u64,
    /// `running`, `catching_up`, `rebuilding` or `halted`.
    pub status: String,
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProjectionList {
    pub items: Vec<ProjectionItem>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RebuildStarted {
    pub name: String,
    pub status: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VerifyAnswer {
    pub equal: bool,
    /// The log position the live and the rebuilt rows were compared at.
    pub position: u64,
    /// The first differences (at most ten), in key order, table by table.
    pub differences: Vec<VerifyDifference>,
}

/// One way the live read model differs from a rebuild, at one row.
#[derive(Debug, Serialize, ToSchema)]
pub struct VerifyDifference {
    /// The read-model table.
    pub table: String,
    /// The row's key.
    pub key: String,
    pub kind: DifferenceKind,
    /// The column whose value differs (`changed` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// The column's value in the live read model, as text (`changed` only; `null` also
    /// for a NULL).
    pub live: Option<String>,
    /// The column's value a rebuild from position 0 gives, as text (`changed` only).
    pub rebuilt: Option<String>,
}

/// `missing`: the rebuild has the row, the live read model lacks it; `extra`: the live
/// read model has a row the rebuild lacks; `changed`: both have it, one column differs.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DifferenceKind {
    Missing,
    Extra,
    Changed,
}

impl From<&annals_projections::Difference> for VerifyDifference {
    fn from(difference: &annals_projections::Difference) -> Self {
        use annals_projections::DifferenceKind as Kind;
        VerifyDifference {
            table: difference.table.clone(),
            key: difference.key.clone(),
            kind: match difference.kind {
                Kind::Missing => DifferenceKind::Missing,
                Kind::Extra => DifferenceKind::Extra,
                Kind::Changed => DifferenceKind::Changed,
            },
            column: difference.column.clone(),
            live: difference.live.clone(),
            rebuilt: difference.rebuilt.clone(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditAnswer {
    pub ok: bool,
    pub streams: u64,
    pub events: u64,
    /// The first broken link: of a stream's hash chain, else of the log's (a gap in
    /// positions, a cut tail), with `position` and a `reason`.
    #[schema(value_type = Option<Object>)]
    pub first_broken_link: Option<serde_json::Value>,
    /// The last position walked and its log hash. Kept somewhere the database's writers
    /// cannot reach, it shows a later rewrite that recomputed every hash
    /// (`annals audit verify --anchor <hash>`).
    pub anchor: AnchorAnswer,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AnchorAnswer {
    pub position: u64,
    /// SHA-256, 64 hex digits.
    pub hash: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthAnswer {
    pub status: String,
}
