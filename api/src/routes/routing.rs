//! The lead routing rules (`domain.md`, Lead routing), as an operator sets and reads them:
//! the ordered rules the routing process follows. Every route is the operator's.

use std::sync::Arc;

use annals_domain::DomainError;
use annals_domain::routing::{
    ROUTING_ID, Routing, RoutingCommand, RoutingRule, RoutingRules, RuleMatch,
};
use annals_domain::values::{DomainPattern, Owner, RuleName, Source};
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{answer, execute, resource};
use crate::dto::*;
use crate::error::ApiError;
use crate::extract::{CommandMeta, JsonBody};
use crate::openapi::{CommandProblems, OperatorListProblems};
use crate::server::App;

pub fn routes() -> OpenApiRouter<Arc<App>> {
    resource("admin").routes(routes!(get_routing, set_routing))
}

/// Which leads a rule takes: every criterion given must hold; none given (`{}`) matches
/// every lead.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleMatchBody {
    /// The lead's source is one of these (at least one).
    #[schema(min_items = 1)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<Vec<String>>,
    /// The lead's score is at least this.
    #[schema(minimum = 0, maximum = 4_294_967_295_i64, format = Int64)]
    #[serde(
        default,
        deserialize_with = "crate::contract::optional_integer",
        skip_serializing_if = "Option::is_none"
    )]
    pub min_score: Option<i64>,
    /// The domain of the lead's email is one of these (`example.com`), or a subdomain of
    /// one written `*.example.com` (at least one; each at most 253 characters, taken
    /// lower-cased).
    #[schema(min_items = 1)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_domains: Option<Vec<String>>,
}

/// One rule: the leads it takes, and the pool of owners it hands them to in turn.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoutingRuleBody {
    /// 1–100 characters once trimmed; unique among the rules.
    pub name: String,
    #[serde(rename = "match", deserialize_with = "crate::contract::object")]
    pub matches: RuleMatchBody,
    /// 1–50 owners (each 1–100 characters once trimmed), none twice once trimmed, in
    /// turn order.
    #[schema(min_items = 1, max_items = 50)]
    pub owners: Vec<String>,
}

/// The ordered routing rules: the first that matches a lead routes it.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"rules": [
    {"name": "enterprise", "match": {"min_score": 60, "email_domains": ["*.bigco.example"]}, "owners": ["ada", "bea"]},
    {"name": "everyone else", "match": {}, "owners": ["cid"]}
]}))]
pub struct RoutingRulesBody {
    /// At most 100, with names unique among them once trimmed; none turns routing off.
    #[schema(max_items = 100)]
    #[serde(deserialize_with = "crate::contract::objects")]
    pub rules: Vec<RoutingRuleBody>,
}

/// The rules as they are set, and the version of the `routing` stream they were read at
/// (for `If-Match`).
#[derive(Debug, Serialize, ToSchema)]
pub struct RoutingView {
    pub rules: Vec<RoutingRuleBody>,
    pub version: u64,
}

impl TryFrom<&RoutingRulesBody> for RoutingRules {
    type Error = DomainError;

    fn try_from(body: &RoutingRulesBody) -> Result<Self, DomainError> {
        let rules = body
            .rules
            .iter()
            .map(|rule| {
                let m = &rule.matches;
                Ok(RoutingRule {
                    name: RuleName::parse(&rule.name)?,
                    matches: RuleMatch {
                        sources: m
                            .sources
                            .as_ref()
                            .map(|s| s.iter().map(|s| Source::parse(s)).collect())
                            .transpose()?,
                        min_score: m
                            .min_score
                            .map(|score| {
                                u32::try_from(score).map_err(|_| DomainError::TooLarge {
                                    field: "min_score",
                                    max: i64::from(u32::MAX),
                                })
                            })
                            .transpose()?,
                        email_domains: m
                            .email_domains
                            .as_ref()
                            .map(|d| d.iter().map(|d| DomainPattern::parse(d)).collect())
                            .transpose()?,
                    },
                    owners: rule
                        .owners
                        .iter()
                        .map(|o| Owner::parse(o))
                        .collect::<Result<_, _>>()?,
                })
            })
            .collect::<Result<Vec<_>, DomainError>>()?;
        RoutingRules::new(rules)
    }
}

impl From<&RoutingRule> for RoutingRuleBody {
    fn from(rule: &RoutingRule) -> Self {
        let m = &rule.matches;
        RoutingRuleBody {
            name: rule.name.as_str().to_owned(),
            matches: RuleMatchBody {
                sources: m
                    .sources
                    .as_ref()
                    .map(|s| s.iter().map(|s| s.as_str().to_owned()).collect()),
                min_score: m.min_score.map(i64::from),
                email_domains: m
                    .email_domains
                    .as_ref()
                    .map(|d| d.iter().map(|d| d.as_str().to_owned()).collect()),
            },
            owners: rule.owners.iter().map(|o| o.as_str().to_owned()).collect(),
        }
    }
}

/// The lead routing rules, in order.
#[utoipa::path(get, path = "/admin/routing", tag = "admin",
    responses((status = 200, description = "The rules (none before any were set)", body = RoutingView), OperatorListProblems),
    security(("bearer" = ["operator"])))]
async fn get_routing(State(app): State<Arc<App>>) -> Result<Json<RoutingView>, ApiError> {
    let routing = app.system.handler::<Routing>().load(ROUTING_ID).await?;
    Ok(Json(RoutingView {
        rules: routing
            .state
            .rules
            .as_slice()
            .iter()
            .map(RoutingRuleBody::from)
            .collect(),
        version: routing.version,
    }))
}

/// Replace the lead routing rules (`RoutingRulesSet`); the same rules again are a
/// conflict (`routing-rules-unchanged`), an empty list turns routing off. The answer's
/// `id` is the nil UUID: the rules are one stream, `routing`.
#[utoipa::path(put, path = "/admin/routing", tag = "admin",
    request_body = RoutingRulesBody, params(CommandHeaders),
    responses((status = 200, description = "The rules are set", body = CommandAnswer), CommandProblems),
    security(("bearer" = ["operator"])))]
async fn set_routing(
    State(app): State<Arc<App>>,
    meta: CommandMeta,
    body: JsonBody<RoutingRulesBody>,
) -> Result<Json<CommandAnswer>, ApiError> {
    let command = RoutingCommand::SetRules {
        rules: RoutingRules::try_from(&body.value)?,
    };
    let outcome = execute::<Routing>(&app, ROUTING_ID, command, &meta, &body.digest).await?;
    Ok(Json(answer(outcome)))
}
