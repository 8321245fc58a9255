//! Every rule of lead routing (`domain.md`, Lead routing), accepted and refused, as
//! given / when / then; and the deadline check over a routed lead's events.

use annals_domain::lead::LeadEvent;
use annals_domain::routing::{
    ROUTING_ID, Response, Routing, RoutingCommand, RoutingEvent, RoutingRule, RoutingRules,
    RuleMatch, response,
};
use annals_domain::values::*;
use annals_domain::{Aggregate, DomainError, RejectionKind};
use serde_json::json;

use crate::rules::{given, id};

fn owner(name: &str) -> Owner {
    Owner::parse(name).unwrap()
}

fn name(rule: &str) -> RuleName {
    RuleName::parse(rule).unwrap()
}

fn rule(rule: &str, matches: RuleMatch, owners: &[&str]) -> RoutingRule {
    RoutingRule {
        name: name(rule),
        matches,
        owners: owners.iter().copied().map(owner).collect(),
    }
}

fn rules(rules: Vec<RoutingRule>) -> RoutingRules {
    RoutingRules::new(rules).unwrap()
}

fn every_lead() -> RuleMatch {
    RuleMatch::default()
}

fn domains(patterns: &[&str]) -> RuleMatch {
    RuleMatch {
        email_domains: Some(
            patterns
                .iter()
                .map(|p| DomainPattern::parse(p).unwrap())
                .collect(),
        ),
        ..RuleMatch::default()
    }
}

/// Rule `partners` takes partner leads at 60 points or more; `everyone` every lead.
fn two_rules() -> RoutingRules {
    rules(vec![
        rule(
            "partners",
            RuleMatch {
                sources: Some(vec![Source::Partner, Source::Referral]),
                min_score: Some(60),
                email_domains: None,
            },
            &["pat"],
        ),
        rule("everyone", every_lead(), &["ann", "bob"]),
    ])
}

fn set(rules: RoutingRules) -> RoutingEvent {
    RoutingEvent::RoutingRulesSet { rules }
}

fn route(lead: u128, source: Source, score: u32, email_domain: &str) -> RoutingCommand {
    RoutingCommand::Route {
        lead_id: id(lead),
        source,
        score,
        email_domain: email_domain.into(),
    }
}

fn routed(lead: u128, rule: &str, to: &str) -> RoutingEvent {
    RoutingEvent::LeadRouted {
        lead_id: id(lead),
        rule: name(rule),
        owner: owner(to),
        previous_owner: None,
        reason: RoutingReason::Qualified,
    }
}

fn reassign(rule: &str, current: &str) -> RoutingCommand {
    RoutingCommand::Reassign {
        lead_id: id(1),
        rule: name(rule),
        current_owner: owner(current),
    }
}

fn reassigned(rule: &str, from: &str, to: &str) -> RoutingEvent {
    RoutingEvent::LeadRouted {
        lead_id: id(1),
        rule: name(rule),
        owner: owner(to),
        previous_owner: Some(owner(from)),
        reason: RoutingReason::ResponseDeadline,
    }
}

// ----- Rules -------------------------------------------------------------------------

#[test]
fn set_rules_records_them_in_order() {
    let routing = given::<Routing>([])
        .when(RoutingCommand::SetRules { rules: two_rules() })
        .then([set(two_rules())]);
    let names: Vec<&str> = routing
        .rules
        .as_slice()
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, ["partners", "everyone"]);
}

#[test]
fn set_the_same_rules_again_is_a_conflict() {
    given::<Routing>([set(two_rules())])
        .when(RoutingCommand::SetRules { rules: two_rules() })
        .then_err(DomainError::RoutingRulesUnchanged);
    // No rules yet and none given: nothing changes either.
    given::<Routing>([])
        .when(RoutingCommand::SetRules {
            rules: RoutingRules::default(),
        })
        .then_err(DomainError::RoutingRulesUnchanged);
    assert_eq!(
        DomainError::RoutingRulesUnchanged.kind(),
        RejectionKind::Conflict
    );
    assert_eq!(
        DomainError::RoutingRulesUnchanged.code(),
        "routing-rules-unchanged"
    );
}

#[test]
fn set_no_rules_turns_routing_off() {
    let routing = given::<Routing>([set(two_rules())])
        .when(RoutingCommand::SetRules {
            rules: rules(vec![]),
        })
        .then([set(RoutingRules::default())]);
    assert!(routing.rules.is_empty());
    given::<Routing>([set(two_rules()), set(RoutingRules::default())])
        .when(route(1, Source::Web, 0, "example.com"))
        .then_err(DomainError::NoRoutingRuleMatches);
}

#[test]
fn a_rule_has_one_to_fifty_owners_none_twice() {
    let fifty: Vec<String> = (0..50).map(|n| format!("owner-{n}")).collect();
    let fifty: Vec<&str> = fifty.iter().map(String::as_str).collect();
    assert!(RoutingRules::new(vec![rule("r", every_lead(), &fifty)]).is_ok());
    let too_many = [fifty.clone(), vec!["one-more"]].concat();
    for owners in [&[][..], &too_many[..]] {
        assert_eq!(
            RoutingRules::new(vec![rule("r", every_lead(), owners)]),
            Err(DomainError::InvalidCount {
                field: "owners",
                min: 1,
                max: 50
            })
        );
    }
    assert_eq!(
        RoutingRules::new(vec![rule("r", every_lead(), &["ann", "bob", "ann"])]),
        Err(DomainError::Duplicate {
            field: "owners",
            value: "ann".into()
        })
    );
}

#[test]
fn rule_names_are_unique_and_a_set_holds_at_most_a_hundred_rules() {
    assert_eq!(
        RoutingRules::new(vec![
            rule("web", every_lead(), &["ann"]),
            rule("web", every_lead(), &["bob"]),
        ]),
        Err(DomainError::Duplicate {
            field: "rule name",
            value: "web".into()
        })
    );
    let many = |n: usize| -> Vec<RoutingRule> {
        (0..n)
            .map(|i| rule(&format!("rule {i}"), every_lead(), &["ann"]))
            .collect()
    };
    assert!(RoutingRules::new(many(100)).is_ok());
    assert_eq!(
        RoutingRules::new(many(101)),
        Err(DomainError::InvalidCount {
            field: "rules",
            min: 0,
            max: 100
        })
    );
    assert!(RuleName::parse(&"n".repeat(101)).is_err());
}

#[test]
fn a_match_list_given_must_not_be_empty() {
    let no_sources = RuleMatch {
        sources: Some(vec![]),
        ..RuleMatch::default()
    };
    assert_eq!(
        RoutingRules::new(vec![rule("r", no_sources, &["ann"])]),
        Err(DomainError::EmptyList {
            field: "match.sources"
        })
    );
    assert_eq!(
        RoutingRules::new(vec![rule("r", domains(&[]), &["ann"])]),
        Err(DomainError::EmptyList {
            field: "match.email_domains"
        })
    );
    assert!(matches!(
        DomainPattern::parse("*.com"),
        Err(DomainError::InvalidDomainPattern(_))
    ));
    for invalid in [
        DomainError::EmptyList { field: "f" },
        DomainError::InvalidCount {
            field: "f",
            min: 1,
            max: 2,
        },
        DomainError::Duplicate {
            field: "f",
            value: "v".into(),
        },
        DomainError::InvalidDomainPattern("x".into()),
    ] {
        assert_eq!(invalid.kind(), RejectionKind::Invalid, "{invalid:?}");
    }
}

#[test]
fn rules_are_stored_in_the_shape_the_api_shows() {
    let stored = serde_json::to_value(two_rules()).unwrap();
    assert_eq!(
        stored,
        json!([
            {"name": "partners", "match": {"sources": ["partner", "referral"], "min_score": 60}, "owners": ["pat"]},
            {"name": "everyone", "match": {}, "owners": ["ann", "bob"]},
        ])
    );
    let read: RoutingRules = serde_json::from_value(stored).unwrap();
    assert_eq!(read, two_rules());
}

// ----- Route -------------------------------------------------------------------------

#[test]
fn route_takes_turns_within_the_first_matching_rule() {
    let routing = given::<Routing>([set(two_rules())])
        .when(route(1, Source::Web, 50, "example.com"))
        .then([routed(1, "everyone", "ann")]);
    assert_eq!(routing.cursor(&name("everyone")), 1);
    assert_eq!(routing.cursor(&name("partners")), 0);
    let routing = given::<Routing>([set(two_rules()), routed(1, "everyone", "ann")])
        .when(route(2, Source::Web, 50, "example.com"))
        .then([routed(2, "everyone", "bob")]);
    assert_eq!(routing.cursor(&name("everyone")), 2);
    given::<Routing>([
        set(two_rules()),
        routed(1, "everyone", "ann"),
        routed(2, "everyone", "bob"),
    ])
    .when(route(3, Source::Web, 50, "example.com"))
    .then([routed(3, "everyone", "ann")]);
}

#[test]
fn a_lead_rule_two_matches_but_not_rule_one_goes_through_rule_two() {
    // A partner lead below 60 points fails `partners` on its score.
    given::<Routing>([set(two_rules())])
        .when(route(1, Source::Partner, 59, "example.com"))
        .then([routed(1, "everyone", "ann")]);
    // A web lead fails it on its source.
    given::<Routing>([set(two_rules())])
        .when(route(1, Source::Web, 90, "example.com"))
        .then([routed(1, "everyone", "ann")]);
    // A lead that meets both criteria goes through the first rule.
    given::<Routing>([set(two_rules())])
        .when(route(1, Source::Referral, 60, "example.com"))
        .then([routed(1, "partners", "pat")]);
}

#[test]
fn email_domains_match_exactly_or_any_subdomain() {
    let by_domain = rules(vec![
        rule(
            "acme",
            domains(&["acme.example", "*.acme.example"]),
            &["ann"],
        ),
        rule("eu", domains(&["*.eu.example"]), &["bob"]),
    ]);
    for (domain, expected) in [
        ("acme.example", "acme"),
        ("Sales.ACME.example", "acme"),
        ("shop.eu.example", "eu"),
    ] {
        given::<Routing>([set(by_domain.clone())])
            .when(route(1, Source::Web, 0, domain))
            .then([routed(
                1,
                expected,
                if expected == "acme" { "ann" } else { "bob" },
            )]);
    }
    for domain in ["notacme.example", "eu.example", "acme.example.org"] {
        given::<Routing>([set(by_domain.clone())])
            .when(route(1, Source::Web, 0, domain))
            .then_err(DomainError::NoRoutingRuleMatches);
    }
}

#[test]
fn route_with_no_rule_that_matches_is_a_conflict() {
    let strict = rules(vec![rule(
        "big partners",
        RuleMatch {
            sources: Some(vec![Source::Partner]),
            min_score: Some(80),
            email_domains: Some(vec![DomainPattern::parse("*.example.com").unwrap()]),
        },
        &["pat"],
    )]);
    for command in [
        route(1, Source::Web, 90, "eu.example.com"),
        route(1, Source::Partner, 79, "eu.example.com"),
        route(1, Source::Partner, 90, "example.com"),
    ] {
        given::<Routing>([set(strict.clone())])
            .when(command)
            .then_err(DomainError::NoRoutingRuleMatches);
    }
    given::<Routing>([set(strict)])
        .when(route(1, Source::Partner, 80, "eu.example.com"))
        .then([routed(1, "big partners", "pat")]);
    given::<Routing>([])
        .when(route(1, Source::Web, 0, "example.com"))
        .then_err(DomainError::NoRoutingRuleMatches);
    assert_eq!(
        DomainError::NoRoutingRuleMatches.code(),
        "no-routing-rule-matches"
    );
}

#[test]
fn the_cursor_survives_a_new_set_of_rules() {
    let wider = rules(vec![rule("everyone", every_lead(), &["ann", "bob", "cy"])]);
    let routing = given::<Routing>([
        set(two_rules()),
        routed(1, "everyone", "ann"),
        routed(2, "everyone", "bob"),
        set(wider),
    ])
    .when(route(3, Source::Web, 0, "example.com"))
    .then([routed(3, "everyone", "cy")]);
    assert_eq!(routing.cursor(&name("everyone")), 3);
}

#[test]
fn the_routing_rules_are_one_stream_named_routing() {
    assert_eq!(Routing::stream_name(ROUTING_ID), "routing");
    assert_eq!(Routing::stream_name(id(7)), "routing");
    assert_eq!(Routing::CATEGORY, "routing");
}

// ----- Reassign ----------------------------------------------------------------------

#[test]
fn reassign_goes_to_the_next_owner_of_the_pool_cyclically() {
    let pool = rules(vec![rule("everyone", every_lead(), &["ann", "bob", "cy"])]);
    for (current, next) in [("ann", "bob"), ("bob", "cy"), ("cy", "ann")] {
        given::<Routing>([set(pool.clone())])
            .when(reassign("everyone", current))
            .then([reassigned("everyone", current, next)]);
    }
}

#[test]
fn reassign_from_an_owner_no_longer_in_the_pool_goes_to_its_first_owner() {
    let pool = rules(vec![rule("everyone", every_lead(), &["bob", "cy"])]);
    given::<Routing>([set(pool)])
        .when(reassign("everyone", "ann"))
        .then([reassigned("everyone", "ann", "bob")]);
    let alone = rules(vec![rule("solo", every_lead(), &["bob"])]);
    given::<Routing>([set(alone)])
        .when(reassign("solo", "ann"))
        .then([reassigned("solo", "ann", "bob")]);
}

#[test]
fn reassign_does_not_move_the_round_robin() {
    let routing = given::<Routing>([set(two_rules()), routed(1, "everyone", "ann")])
        .when(reassign("everyone", "ann"))
        .then([reassigned("everyone", "ann", "bob")]);
    assert_eq!(routing.cursor(&name("everyone")), 1);
}

#[test]
fn record_writes_the_routing_applied_and_only_a_qualification_moves_the_cursor() {
    let routing = given::<Routing>([set(two_rules())])
        .when(RoutingCommand::Record {
            lead_id: id(1),
            rule: name("everyone"),
            owner: owner("bob"),
            previous_owner: None,
            reason: RoutingReason::Qualified,
        })
        .then([routed(1, "everyone", "bob")]);
    assert_eq!(routing.cursor(&name("everyone")), 1);
    let routing = given::<Routing>([set(two_rules()), routed(1, "everyone", "ann")])
        .when(RoutingCommand::Record {
            lead_id: id(1),
            rule: name("everyone"),
            owner: owner("bob"),
            previous_owner: Some(owner("ann")),
            reason: RoutingReason::ResponseDeadline,
        })
        .then([reassigned("everyone", "ann", "bob")]);
    assert_eq!(routing.cursor(&name("everyone")), 1);
}

#[test]
fn reassign_with_no_other_owner_or_a_rule_gone_is_a_conflict() {
    given::<Routing>([set(two_rules())])
        .when(reassign("partners", "pat"))
        .then_err(DomainError::NoOtherOwner {
            rule: "partners".into(),
        });
    given::<Routing>([set(two_rules())])
        .when(reassign("gone", "ann"))
        .then_err(DomainError::NoOtherOwner {
            rule: "gone".into(),
        });
    let error = DomainError::NoOtherOwner { rule: "r".into() };
    assert_eq!(error.kind(), RejectionKind::Conflict);
    assert_eq!(error.code(), "no-other-owner");
}

// ----- The response deadline ---------------------------------------------------------

const ROUTER: &str = "routing";

fn signal() -> LeadEvent {
    LeadEvent::SignalRecorded {
        kind: SignalKind::EmailClick,
        points: 3,
        occurred_at: None,
    }
}

fn assigned(to: &str) -> LeadEvent {
    LeadEvent::LeadAssigned {
        owner: owner(to),
        previous_owner: Some(owner("ann")),
    }
}

fn answer(events: &[(&str, LeadEvent)]) -> Response {
    response("ann", ROUTER, events.iter().map(|(actor, e)| (*actor, e)))
}

#[test]
fn acting_is_a_signal_as_the_owner_disqualifying_or_converting() {
    assert_eq!(answer(&[("ann", signal())]), Response::Acted);
    let disqualified = LeadEvent::LeadDisqualified {
        reason: Reason::parse("no budget").unwrap(),
    };
    assert_eq!(answer(&[("carol", disqualified)]), Response::Acted);
    let converted = LeadEvent::LeadConverted {
        account_id: id(20),
        deal_id: id(30),
        deal_name: Name::parse("Engines").unwrap(),
        amount: Money::parse("EUR", 1).unwrap(),
        account_name: None,
    };
    assert_eq!(answer(&[("carol", converted)]), Response::Acted);
}

#[test]
fn a_signal_recorded_by_someone_else_is_not_acting() {
    assert_eq!(answer(&[("bob", signal())]), Response::Waiting);
    assert_eq!(answer(&[(ROUTER, signal())]), Response::Waiting);
    assert_eq!(answer(&[]), Response::Waiting);
    assert_eq!(
        answer(&[("anonymous", LeadEvent::LeadQualified { score: 50 })]),
        Response::Waiting
    );
}

#[test]
fn an_assignment_by_anyone_but_the_router_is_by_hand() {
    assert_eq!(
        answer(&[("carol", assigned("bob"))]),
        Response::AssignedByHand
    );
    assert_eq!(answer(&[(ROUTER, assigned("bob"))]), Response::Waiting);
}

#[test]
fn the_first_decisive_event_wins() {
    assert_eq!(
        answer(&[
            ("bob", signal()),
            ("carol", assigned("bob")),
            ("ann", signal()),
        ]),
        Response::AssignedByHand
    );
    assert_eq!(
        answer(&[
            (ROUTER, assigned("bob")),
            ("ann", signal()),
            ("carol", assigned("bob")),
        ]),
        Response::Acted
    );
}
