//! The stored form of every event: snapshot-tested so that a change to the wire format is
//! always a visible diff, round-tripped, and older schema versions upcast.

use annals_domain::account::AccountEvent;
use annals_domain::deal::DealEvent;
use annals_domain::lead::LeadEvent;
use annals_domain::order::{OrderEvent, OrderLine, OrderLines};
use annals_domain::routing::{RoutingEvent, RoutingRule, RoutingRules, RuleMatch};
use annals_domain::subscription::SubscriptionEvent;
use annals_domain::timer::TimerEvent;
use annals_domain::values::*;
use annals_domain::{Event, StoredForm};
use chrono::{NaiveDate, TimeZone, Utc};
use serde_json::json;
use uuid::Uuid;

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn eur(minor: i64) -> Money {
    Money::parse("EUR", minor).unwrap()
}

pub fn every_lead_event() -> Vec<LeadEvent> {
    vec![
        LeadEvent::LeadCaptured {
            lead_id: id(1),
            email: Some(Email::parse("ada@example.com").unwrap()),
            name: Some(PersonName::parse("Ada Lovelace").unwrap()),
            company: Some(Label::parse("Analytical Engines").unwrap()),
            source: Source::Web,
        },
        LeadEvent::SignalRecorded {
            kind: SignalKind::DemoRequest,
            points: 25,
            occurred_at: Some(Utc.with_ymd_and_hms(2026, 11, 26, 9, 30, 0).unwrap()),
        },
        LeadEvent::SignalRecorded {
            kind: SignalKind::PageView,
            points: 1,
            occurred_at: None,
        },
        LeadEvent::LeadQualified { score: 50 },
        LeadEvent::LeadAssigned {
            owner: Owner::parse("bob").unwrap(),
            previous_owner: None,
        },
        LeadEvent::LeadDisqualified {
            reason: Reason::parse("no budget").unwrap(),
        },
        LeadEvent::LeadConverted {
            account_id: id(20),
            deal_id: id(30),
            deal_name: Name::parse("Engines").unwrap(),
            amount: eur(129_900),
            account_name: Some(Name::parse("Analytical Engines").unwrap()),
        },
        LeadEvent::LeadErased {},
    ]
}

pub fn every_account_event() -> Vec<AccountEvent> {
    vec![
        AccountEvent::AccountOpened {
            account_id: id(20),
            name: Name::parse("Acme").unwrap(),
            domain: Some(Label::parse("acme.example").unwrap()),
            industry: Some(Label::parse("Manufacturing").unwrap()),
            employees: Some(250),
            tier: Tier::Key,
        },
        AccountEvent::AccountRenamed {
            name: Name::parse("Acme Corp").unwrap(),
            previous_name: Name::parse("Acme").unwrap(),
        },
        AccountEvent::AccountTierChanged {
            tier: Tier::Standard,
            previous_tier: Tier::Key,
        },
    ]
}

pub fn every_deal_event() -> Vec<DealEvent> {
    vec![
        DealEvent::DealOpened {
            deal_id: id(30),
            account_id: id(20),
            name: Name::parse("Engines").unwrap(),
            amount: eur(100_000),
            owner: Some(Owner::parse("bob").unwrap()),
            expected_close: NaiveDate::from_ymd_opt(2027, 3, 31),
            stage: Stage::Prospecting,
        },
        DealEvent::DealStageChanged {
            from: Stage::Prospecting,
            to: Stage::Demo,
        },
        DealEvent::DealAmountChanged {
            from: eur(100_000),
            to: eur(90_000),
        },
        DealEvent::DealWon {
            amount: eur(90_000),
        },
        DealEvent::DealLost {
            reason: Reason::parse("price").unwrap(),
        },
    ]
}

pub fn every_timer_event() -> Vec<TimerEvent> {
    let due_at = Utc.with_ymd_and_hms(2026, 12, 3, 9, 0, 0).unwrap();
    let payload = json!({"order_id": id(50), "step": "payment-deadline"});
    vec![
        TimerEvent::TimerScheduled {
            timer_id: id(40),
            process: "order_process".into(),
            due_at,
            payload: payload.clone(),
        },
        TimerEvent::TimerCancelled {},
        TimerEvent::TimerFired {
            process: "order_process".into(),
            due_at,
            payload,
        },
    ]
}

pub fn every_routing_event() -> Vec<RoutingEvent> {
    let owner = |name: &str| Owner::parse(name).unwrap();
    let rules = RoutingRules::new(vec![
        RoutingRule {
            name: RuleName::parse("EU partners").unwrap(),
            matches: RuleMatch {
                sources: Some(vec![Source::Partner, Source::Referral]),
                min_score: Some(60),
                email_domains: Some(vec![
                    DomainPattern::parse("acme.example").unwrap(),
                    DomainPattern::parse("*.eu.example").unwrap(),
                ]),
            },
            owners: vec![owner("pat")],
        },
        RoutingRule {
            name: RuleName::parse("everyone").unwrap(),
            matches: RuleMatch::default(),
            owners: vec![owner("ann"), owner("bob")],
        },
    ])
    .unwrap();
    vec![
        RoutingEvent::RoutingRulesSet { rules },
        RoutingEvent::LeadRouted {
            lead_id: id(1),
            rule: RuleName::parse("everyone").unwrap(),
            owner: owner("ann"),
            previous_owner: None,
            reason: RoutingReason::Qualified,
        },
        RoutingEvent::LeadRouted {
            lead_id: id(1),
            rule: RuleName::parse("everyone").unwrap(),
            owner: owner("bob"),
            previous_owner: Some(owner("ann")),
            reason: RoutingReason::ResponseDeadline,
        },
    ]
}

pub fn every_order_event() -> Vec<OrderEvent> {
    let reason = |text: &str| Reason::parse(text).unwrap();
    vec![
        OrderEvent::OrderPlaced {
            order_id: id(50),
            deal_id: id(30),
            account_id: id(20),
            lines: OrderLines::new(vec![
                OrderLine {
                    sku: Sku::parse("SEAT-PRO").unwrap(),
                    quantity: Quantity::parse(10).unwrap(),
                    unit_price: eur(4_900),
                    recurring: true,
                },
                OrderLine {
                    sku: Sku::parse("SETUP").unwrap(),
                    quantity: Quantity::parse(1).unwrap(),
                    unit_price: eur(100_000),
                    recurring: false,
                },
            ])
            .unwrap(),
            total: eur(149_000),
            recurring_total: eur(49_000),
        },
        OrderEvent::OrderInvoiced {
            invoice_id: id(60),
            due_at: Utc.with_ymd_and_hms(2026, 12, 3, 9, 0, 0).unwrap(),
        },
        OrderEvent::PaymentReceived {
            amount: eur(149_000),
        },
        OrderEvent::OrderFulfilled {},
        OrderEvent::InvoiceVoided {
            reason: reason("payment-timeout"),
        },
        OrderEvent::OrderCancelled {
            reason: reason("payment-timeout"),
        },
        OrderEvent::PaymentRefunded {
            amount: eur(149_000),
        },
    ]
}

pub fn every_subscription_event() -> Vec<SubscriptionEvent> {
    vec![
        SubscriptionEvent::SubscriptionStarted {
            subscription_id: id(70),
            account_id: id(20),
            order_id: id(50),
            mrr: eur(49_000),
        },
        SubscriptionEvent::SubscriptionExpanded {
            from: eur(49_000),
            to: eur(59_000),
        },
        SubscriptionEvent::SubscriptionContracted {
            from: eur(59_000),
            to: eur(39_000),
        },
        SubscriptionEvent::SubscriptionChurned {
            mrr: eur(39_000),
            reason: Some(Reason::parse("moved to a competitor").unwrap()),
            order_id: Some(id(50)),
        },
        SubscriptionEvent::SubscriptionChurned {
            mrr: eur(39_000),
            reason: None,
            order_id: None,
        },
    ]
}

fn stored_json<E: Event>(event: &E) -> serde_json::Value {
    let stored = event.encode();
    json!({"type": stored.event_type, "schema_version": stored.schema_version, "data": stored.data})
}

fn check_all<E: Event>(events: Vec<E>) {
    for (i, event) in events.iter().enumerate() {
        let stored = event.encode();
        assert!(stored.data.is_object());
        assert_eq!(E::decode(&stored).unwrap(), *event, "round trip");
        insta::assert_json_snapshot!(format!("{}-{i}", stored.event_type), stored_json(event));
    }
}

#[test]
fn lead_events_keep_their_stored_form() {
    check_all(every_lead_event());
}

#[test]
fn account_events_keep_their_stored_form() {
    check_all(every_account_event());
}

#[test]
fn deal_events_keep_their_stored_form() {
    check_all(every_deal_event());
}

#[test]
fn timer_events_keep_their_stored_form() {
    check_all(every_timer_event());
}

#[test]
fn routing_events_keep_their_stored_form() {
    check_all(every_routing_event());
}

#[test]
fn order_events_keep_their_stored_form() {
    check_all(every_order_event());
}

#[test]
fn subscription_events_keep_their_stored_form() {
    check_all(every_subscription_event());
}

#[test]
fn a_version_1_lead_captured_is_read_without_a_company() {
    let v1 = StoredForm {
        event_type: "LeadCaptured".into(),
        schema_version: 1,
        data: json!({
            "lead_id": id(1),
            "email": "ada@example.com",
            "name": "Ada",
            "source": "event",
        }),
    };
    assert_eq!(
        LeadEvent::decode(&v1).unwrap(),
        LeadEvent::LeadCaptured {
            lead_id: id(1),
            email: Some(Email::parse("ada@example.com").unwrap()),
            name: Some(PersonName::parse("Ada").unwrap()),
            company: None,
            source: Source::Event,
        }
    );
    // Without the upcaster the v1 data would not load as v2.
    let as_current = StoredForm {
        schema_version: 2,
        ..v1.clone()
    };
    assert!(LeadEvent::decode(&as_current).is_err());
    assert_eq!(
        every_lead_event()[0].encode().schema_version,
        2,
        "LeadCaptured is at v2"
    );
}

#[test]
fn a_version_1_subscription_churned_is_read_without_its_order() {
    let v1 = StoredForm {
        event_type: "SubscriptionChurned".into(),
        schema_version: 1,
        data: json!({
            "mrr": {"currency": "EUR", "amount_minor": 39_000},
            "reason": null,
        }),
    };
    assert_eq!(
        SubscriptionEvent::decode(&v1).unwrap(),
        SubscriptionEvent::SubscriptionChurned {
            mrr: eur(39_000),
            reason: None,
            order_id: None,
        }
    );
    let churned = SubscriptionEvent::SubscriptionChurned {
        mrr: eur(39_000),
        reason: None,
        order_id: Some(id(50)),
    };
    let stored = churned.encode();
    assert_eq!(stored.schema_version, 2, "SubscriptionChurned is at v2");
    assert_eq!(stored.data["order_id"], json!(id(50)));
}

#[test]
fn unknown_versions_and_types_are_decode_errors_not_panics() {
    let future = StoredForm {
        event_type: "LeadQualified".into(),
        schema_version: 9,
        data: json!({"score": 50}),
    };
    assert!(LeadEvent::decode(&future).is_err());
    let unknown = StoredForm {
        event_type: "LeadTeleported".into(),
        schema_version: 1,
        data: json!({}),
    };
    assert!(LeadEvent::decode(&unknown).is_err());
    let malformed = StoredForm {
        event_type: "LeadQualified".into(),
        schema_version: 1,
        data: json!({"score": "lots"}),
    };
    assert!(LeadEvent::decode(&malformed).is_err());
}
