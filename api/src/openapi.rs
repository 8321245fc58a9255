//! The OpenAPI document's shared parts: the bearer scheme whose scopes are the roles,
//! and the problem answers each kind of endpoint may give.

use std::collections::BTreeMap;

use annals_domain::deal::DealStatus;
use annals_domain::lead::LeadStatus;
use annals_domain::order::OrderStatus;
use annals_domain::subscription::SubscriptionStatus;
use annals_domain::values::{
    Label, Name, Owner, PersonName, Reason, RuleName, SignalKind, Sku, Source, Stage, Tier,
};
use serde_json::Value;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, ObjectBuilder, Ref, RefOr, Response, ResponseBuilder, Schema, Type,
};
use utoipa::{Modify, OpenApi};

use crate::contract::{EMAIL_PATTERN, text_pattern};
use crate::error::Problem;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Annals",
        description = "An event-sourced revenue backend: leads, accounts and deals as \
                       commands in, events in an append-only log, read models out. \
                       Roles are the bearer scheme's scopes: `writer` issues commands, \
                       `analyst` reads, `operator` may do everything.\n\n\
                       The edge's bounds, each a setting of `annals serve`: a request's \
                       headers must arrive within `ANNALS_HEADER_READ_TIMEOUT` (10s) of \
                       the connection's start or of the previous answer, so an idle \
                       keep-alive connection is closed after as long; at most \
                       `ANNALS_MAX_CONNECTIONS` (1024) connections are open at once, more \
                       wait to be accepted; a request takes at most \
                       `ANNALS_REQUEST_TIMEOUT_MS` (30000; operator jobs under `/admin` \
                       excepted), and a command is cut by it only before its append, so \
                       its `503 timeout` means nothing was written; at shutdown, requests \
                       in flight have `ANNALS_SHUTDOWN_GRACE` (10s). A body is at most \
                       1 MiB and must be `application/json` (415). A request whose `Host` \
                       is not the listen address or a name in `ANNALS_ALLOWED_HOSTS` is \
                       refused (421 `unknown-host`); a state change from a browser page \
                       of another origin than the server's own or one in \
                       `ANNALS_ALLOWED_ORIGINS` is refused (403 `cross-origin`). Every \
                       answer carries `X-Content-Type-Options: nosniff` and \
                       `Cache-Control: no-store`."
    ),
    modifiers(&BearerScheme),
    components(schemas(Problem)),
    // The tags of the first resources, in their order; a resource added later brings
    // its own (`routes::resource`), listed after these.
    tags(
        (name = "leads"), (name = "accounts"), (name = "deals"), (name = "analytics"),
        (name = "history"), (name = "log"), (name = "admin"), (name = "health"),
    )
)]
#[derive(Debug)]
pub struct ApiDoc;

#[derive(Debug)]
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub(crate) fn problems(answers: &[(u16, &str)]) -> BTreeMap<String, RefOr<Response>> {
    answers
        .iter()
        .map(|(status, description)| {
            let response = ResponseBuilder::new()
                .description(*description)
                .content(
                    "application/problem+json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("Problem")))
                        .build(),
                )
                .build();
            (status.to_string(), RefOr::T(response))
        })
        .collect()
}

const UNAUTHORIZED: (u16, &str) = (401, "No token, or an unknown one");
const FORBIDDEN: (u16, &str) = (403, "The token's role may not do this");
const UNAVAILABLE: (u16, &str) = (
    503,
    "The database is unavailable, the request timed out (`timeout`), or (`projection-lagging`) the read model did not reach `min_position` in time; with `Retry-After`",
);

/// A command's 503: never an answer to a command whose append may have committed.
const COMMAND_UNAVAILABLE: (u16, &str) = (
    503,
    "The database is unavailable (`unavailable`), or the command did not reach its append \
     before the request timeout (`timeout`): in both, nothing was written, and the command \
     may be sent again as it is (with `Retry-After`). A command whose append was sent is \
     never cut by the timeout: it is answered with what the store did. A client that lost \
     the answer (its connection cut) learns the outcome by sending the command again with \
     the same `Idempotency-Key`: the first outcome comes back, nothing is appended twice.",
);

/// What a command may answer besides success.
#[derive(Debug)]
pub struct CommandProblems;

impl utoipa::IntoResponses for CommandProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut responses = problems(&[
            (400, "The body is not JSON, or a header is malformed"),
            UNAUTHORIZED,
            FORBIDDEN,
            (404, "The aggregate (or an account it names) does not exist"),
            (
                409,
                "The aggregate's state forbids the command, concurrent writers kept winning \
                 (`concurrency-conflict`), or a request with the same `Idempotency-Key` is \
                 still being carried out (`idempotency-key-in-use`, with `Retry-After`: a \
                 retry after it gets that request's answer)",
            ),
            (412, "`If-Match` names another version (`version-mismatch`)"),
            (413, "The body is larger than 1 MiB"),
            (415, "The body is not `application/json`"),
            (
                422,
                "The command is invalid, has unknown fields, or reuses an idempotency key",
            ),
            COMMAND_UNAVAILABLE,
        ]);
        if let Some(RefOr::T(conflict)) = responses.get_mut("409") {
            let seconds = ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(0));
            conflict.headers.insert(
                "Retry-After".to_owned(),
                HeaderBuilder::new()
                    .schema(seconds)
                    .description(Some(
                        "With `idempotency-key-in-use`: seconds to wait before retrying",
                    ))
                    .build(),
            );
        }
        responses
    }
}

/// What a query may answer besides success.
#[derive(Debug)]
pub struct QueryProblems;

impl utoipa::IntoResponses for QueryProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problems(&[
            UNAUTHORIZED,
            FORBIDDEN,
            (404, "Nothing has this id"),
            (422, "A parameter is invalid"),
            UNAVAILABLE,
        ])
    }
}

/// What an operator endpoint may answer besides success.
#[derive(Debug)]
pub struct OperatorProblems;

impl utoipa::IntoResponses for OperatorProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problems(&[
            UNAUTHORIZED,
            FORBIDDEN,
            (404, "No stream or projection has this name"),
            (409, "The projection is already being rebuilt or verified"),
            (422, "A parameter is invalid"),
            UNAVAILABLE,
        ])
    }
}

/// What an operator's list without parameters may answer besides success.
#[derive(Debug)]
pub struct OperatorListProblems;

impl utoipa::IntoResponses for OperatorListProblems {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        problems(&[UNAUTHORIZED, FORBIDDEN, UNAVAILABLE])
    }
}

/// The closed sets of words the domain accepts, written into the document from the
/// domain's own lists (so the document cannot drift from the rules) as named `enum`
/// components, each referred to wherever it is taken: on the command bodies' fields and
/// on the query parameters of the same names. Named once, a generated client has one
/// type for each (a `LeadSource` wherever a source is), and no generator can make two
/// clashing names of its own for them.
pub fn describe_domain_words(openapi: &mut utoipa::openapi::OpenApi) {
    if let Some(components) = openapi.components.as_mut() {
        for (name, description, values) in domain_words() {
            let schema = ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some(description))
                .enum_values(Some(values))
                .build();
            components
                .schemas
                .insert(name.to_owned(), RefOr::T(Schema::Object(schema)));
        }
        refer_fields_to_words(components);
    }
    refer_parameters_to_words(openapi);
}

/// Each closed set of words: its component's name, its description, its words.
fn domain_words() -> [(&'static str, &'static str, Vec<Value>); 8] {
    let words =
        |all: Vec<&'static str>| -> Vec<Value> { all.into_iter().map(Value::from).collect() };
    let stages = words(Stage::ALL.iter().map(|s| s.as_str()).collect());
    let mut stages_and_outcomes = stages.clone();
    stages_and_outcomes.extend(words(
        DealStatus::CLOSED.iter().map(|s| s.as_str()).collect(),
    ));
    [
        (
            "LeadSource",
            "Where a lead came from.",
            words(Source::ALL.iter().map(|s| s.as_str()).collect()),
        ),
        (
            "SignalKind",
            "What a lead did.",
            words(SignalKind::ALL.iter().map(|k| k.as_str()).collect()),
        ),
        (
            "AccountTier",
            "An account's tier.",
            words(Tier::ALL.iter().map(|t| t.as_str()).collect()),
        ),
        (
            "DealStage",
            "An open deal's stage, in the funnel's order.",
            stages,
        ),
        (
            "DealStageOrOutcome",
            "A deal's stage, or how it closed.",
            stages_and_outcomes,
        ),
        (
            "LeadStatus",
            "A captured lead's status.",
            words(LeadStatus::CAPTURED.iter().map(|s| s.as_str()).collect()),
        ),
        (
            "OrderStatus",
            "An order's status.",
            words(OrderStatus::PLACED.iter().map(|s| s.as_str()).collect()),
        ),
        (
            "SubscriptionStatus",
            "A subscription's status.",
            words(
                SubscriptionStatus::STARTED
                    .iter()
                    .map(|s| s.as_str())
                    .collect(),
            ),
        ),
    ]
}

/// A reference to the words of `name`, keeping the field's description.
fn words_of(name: &str, description: Option<String>) -> RefOr<Schema> {
    let mut to = Ref::from_schema_name(name);
    to.description = description.unwrap_or_default();
    RefOr::Ref(to)
}

/// The command bodies' fields that take a closed set of words, referred to it (an
/// optional one may also be null).
fn refer_fields_to_words(components: &mut utoipa::openapi::Components) {
    use utoipa::openapi::schema::{ArrayItems, OneOfBuilder};

    for (schema, property, name) in [
        ("CaptureLead", "source", "LeadSource"),
        ("RecordSignal", "kind", "SignalKind"),
        ("OpenAccount", "tier", "AccountTier"),
        ("SetAccountTier", "tier", "AccountTier"),
        ("AdvanceDeal", "stage", "DealStage"),
    ] {
        let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut(schema) else {
            continue;
        };
        let required = object.required.iter().any(|r| r == property);
        let Some(field) = object.properties.get_mut(property) else {
            continue;
        };
        let description = match field {
            RefOr::T(Schema::Object(field)) => field.description.clone(),
            _ => None,
        };
        *field = if required {
            words_of(name, description)
        } else {
            RefOr::T(Schema::OneOf(
                OneOfBuilder::new()
                    .item(words_of(name, None))
                    .item(ObjectBuilder::new().schema_type(Type::Null))
                    .description(description)
                    .build(),
            ))
        };
    }
    if let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut("RuleMatchBody")
        && let Some(RefOr::T(Schema::Array(array))) = object.properties.get_mut("sources")
    {
        array.items = ArrayItems::RefOrSchema(Box::new(words_of("LeadSource", None)));
    }
}

/// The query parameters that take a closed set of words, referred to it.
fn refer_parameters_to_words(openapi: &mut utoipa::openapi::OpenApi) {
    for (path, item) in openapi.paths.paths.iter_mut() {
        let Some(get) = item.get.as_mut() else {
            continue;
        };
        for parameter in get.parameters.iter_mut().flatten() {
            let name = match (parameter.name.as_str(), path.as_str()) {
                ("source", _) => "LeadSource",
                ("status", "/leads") => "LeadStatus",
                ("status", "/orders") => "OrderStatus",
                ("status", "/subscriptions") => "SubscriptionStatus",
                ("stage", "/deals") => "DealStageOrOutcome",
                _ => continue,
            };
            let description = match &parameter.schema {
                Some(RefOr::T(Schema::Object(field))) => field.description.clone(),
                _ => None,
            };
            parameter.schema = Some(words_of(name, description));
        }
    }
}

/// The domain's rules for the text of a command body, written into the document as
/// patterns (`contract`): each free-text field with the most characters its value type
/// keeps once trimmed (`PersonName::MAX`, ...), and the email. A new free-text field
/// belongs in this list; one left out has no pattern, and
/// `every_string_of_a_request_body_has_a_pattern_a_format_or_words` fails.
pub fn describe_text_rules(openapi: &mut utoipa::openapi::OpenApi) {
    const FREE_TEXT: [(&str, &str, usize); 16] = [
        ("CaptureLead", "name", PersonName::MAX),
        ("CaptureLead", "company", Label::MAX),
        ("AssignLead", "owner", Owner::MAX),
        ("DisqualifyLead", "reason", Reason::MAX),
        ("ConvertLead", "deal_name", Name::MAX),
        ("OpenAccount", "name", Name::MAX),
        ("OpenAccount", "domain", Label::MAX),
        ("OpenAccount", "industry", Label::MAX),
        ("RenameAccount", "name", Name::MAX),
        ("OpenDeal", "name", Name::MAX),
        ("OpenDeal", "owner", Owner::MAX),
        ("LoseDeal", "reason", Reason::MAX),
        ("RoutingRuleBody", "name", RuleName::MAX),
        ("OrderLineBody", "sku", Sku::MAX),
        ("CancelOrder", "reason", Reason::MAX),
        ("ChurnSubscription", "reason", Reason::MAX),
    ];
    let Some(components) = openapi.components.as_mut() else {
        return;
    };
    let rules = FREE_TEXT
        .iter()
        .map(|(schema, property, max)| (*schema, *property, text_pattern(*max)))
        .chain([("CaptureLead", "email", EMAIL_PATTERN.to_owned())]);
    for (schema, property, pattern) in rules {
        if let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut(schema)
            && let Some(RefOr::T(Schema::Object(field))) = object.properties.get_mut(property)
        {
            field.pattern = Some(pattern);
        }
    }
    // Lists of free text: each item as its field would be.
    if let Some(owners) = items_of(components, "RoutingRuleBody", "owners") {
        owners.pattern = Some(text_pattern(Owner::MAX));
    }
    if let Some(domains) = items_of(components, "RuleMatchBody", "email_domains") {
        domains.pattern = Some(DOMAIN_PATTERN.to_owned());
        domains.max_length = Some(253);
    }
}

/// A routing rule's email domain pattern (`values::DomainPattern`): `*.` or not, then
/// ASCII labels of letters, digits and `-`, at least two, dot-separated.
const DOMAIN_PATTERN: &str = r"^(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$";

/// The schema of the items of an array property of a component.
fn items_of<'a>(
    components: &'a mut utoipa::openapi::Components,
    schema: &str,
    property: &str,
) -> Option<&'a mut utoipa::openapi::schema::Object> {
    use utoipa::openapi::schema::ArrayItems;
    let RefOr::T(Schema::Object(object)) = components.schemas.get_mut(schema)? else {
        return None;
    };
    let RefOr::T(Schema::Array(array)) = object.properties.get_mut(property)? else {
        return None;
    };
    let ArrayItems::RefOrSchema(items) = &mut array.items else {
        return None;
    };
    match items.as_mut() {
        RefOr::T(Schema::Object(items)) => Some(items),
        _ => None,
    }
}

/// A header is text or absent, never JSON's `null`: utoipa types an optional header as
/// `string | null`, which a client would send as the text `null`.
pub fn headers_are_never_null(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::path::ParameterIn;
    use utoipa::openapi::schema::{SchemaType, Type};
    for item in openapi.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            for parameter in operation.parameters.iter_mut().flatten() {
                if parameter.parameter_in != ParameterIn::Header {
                    continue;
                }
                if let Some(RefOr::T(Schema::Object(schema))) = parameter.schema.as_mut()
                    && let SchemaType::Array(types) = &schema.schema_type
                {
                    let types: Vec<Type> = types
                        .iter()
                        .filter(|t| **t != Type::Null)
                        .cloned()
                        .collect();
                    schema.schema_type = match types.as_slice() {
                        [only] => SchemaType::Type(only.clone()),
                        _ => SchemaType::Array(types),
                    };
                }
            }
        }
    }
}

/// The edge's refusals (`edge.rs`), on every operation they can answer: 421 for a `Host`
/// that names another server, on all; 403 `cross-origin` for a page of another origin,
/// on every operation that changes state; 415 for a body that is not JSON, on every
/// operation that takes one.
pub fn describe_edge_refusals(openapi: &mut utoipa::openapi::OpenApi) {
    let unknown_host = problems(&[(
        421,
        "The request's `Host` names another server (`unknown-host`): the server answers \
         to its listen address and the names in `ANNALS_ALLOWED_HOSTS` only",
    )]);
    let not_json = problems(&[(415, "The body is not `application/json`")]);
    let cross_origin = "; or (`cross-origin`) a browser page of another origin than the \
                        server's own or one in `ANNALS_ALLOWED_ORIGINS` tried to change state";
    for item in openapi.paths.paths.values_mut() {
        let reads = [&mut item.get].into_iter().flatten().map(|o| (o, false));
        let writes = [
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        .map(|o| (o, true));
        for (operation, changes_state) in reads.chain(writes) {
            let responses = &mut operation.responses.responses;
            responses.extend(unknown_host.clone());
            if operation.request_body.is_some() {
                responses.extend(not_json.clone());
            }
            if !changes_state {
                continue;
            }
            match responses.get_mut("403") {
                Some(RefOr::T(forbidden)) => forbidden.description.push_str(cross_origin),
                _ => {
                    let mut refusal = problems(&[(403, cross_origin.trim_start_matches("; or "))]);
                    responses.append(&mut refusal);
                }
            }
        }
    }
}
