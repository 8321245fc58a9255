//! Invariants over random command sequences: whatever clients send, in whatever order,
//! the aggregates never break their rules.

use annals_domain::deal::{Deal, DealCommand, DealEvent, DealStatus};
use annals_domain::lead::{
    ConversionAccount, ConversionDeal, Lead, LeadCommand, LeadEvent, LeadStatus,
};
use annals_domain::order::{
    Order, OrderCommand, OrderDeal, OrderEvent, OrderLine, OrderLines, OrderStatus,
};
use annals_domain::routing::{Routing, RoutingCommand, RoutingEvent, RoutingRule, RoutingRules};
use annals_domain::subscription::{
    Subscription, SubscriptionCommand, SubscriptionEvent, SubscriptionStatus,
};
use annals_domain::timer::{Timer, TimerCommand, TimerEvent, TimerStatus};
use annals_domain::values::*;
use annals_domain::{Aggregate, DomainError, Event};
use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use uuid::Uuid;

fn lead_command() -> impl Strategy<Value = LeadCommand> {
    let kind = proptest::sample::select(SignalKind::ALL.to_vec());
    let owner = proptest::sample::select(vec!["ann", "bob", "cy"]);
    prop_oneof![
        1 => Just(LeadCommand::Capture {
            lead_id: Uuid::from_u128(1),
            email: Email::parse("a@b.co").unwrap(),
            name: PersonName::parse("A").unwrap(),
            company: None,
            source: Source::Web,
        }),
        8 => kind.prop_map(|kind| LeadCommand::RecordSignal { kind, occurred_at: None }),
        2 => owner.prop_map(|o| LeadCommand::Assign { owner: Owner::parse(o).unwrap() }),
        1 => Just(LeadCommand::Disqualify { reason: Reason::parse("r").unwrap() }),
        1 => any::<bool>().prop_map(|new_account| LeadCommand::Convert {
            deal_name: Name::parse("d").unwrap(),
            amount: Money::parse("EUR", 5).unwrap(),
            account: if new_account {
                ConversionAccount::New(Uuid::from_u128(2))
            } else {
                ConversionAccount::Existing(Uuid::from_u128(2))
            },
            deal: ConversionDeal::New(Uuid::from_u128(3)),
        }),
    ]
}

fn deal_command() -> impl Strategy<Value = DealCommand> {
    let stage = proptest::sample::select(Stage::ALL.to_vec());
    let currency = proptest::sample::select(vec!["EUR", "USD"]);
    prop_oneof![
        1 => any::<bool>().prop_map(|account_exists| DealCommand::Open {
            deal_id: Uuid::from_u128(3),
            account_id: Uuid::from_u128(2),
            account_exists,
            name: Name::parse("d").unwrap(),
            amount: Money::parse("EUR", 100).unwrap(),
            owner: None,
            expected_close: None,
        }),
        4 => stage.prop_map(|stage| DealCommand::Advance { stage }),
        2 => (currency, 0i64..300).prop_map(|(c, a)| DealCommand::ChangeAmount {
            amount: Money::parse(c, a).unwrap(),
        }),
        1 => Just(DealCommand::Win),
        1 => Just(DealCommand::Lose { reason: Reason::parse("r").unwrap() }),
    ]
}

/// Routing commands for one rule, `everyone`, over `owners` owners: leads of any source,
/// score and domain, now and then a reassignment of one of them.
fn routing_commands(owners: usize) -> impl Strategy<Value = Vec<RoutingCommand>> {
    let source = proptest::sample::select(Source::ALL.to_vec());
    let domain = proptest::sample::select(vec!["example.com", "eu.acme.example", "x.io"]);
    let command = prop_oneof![
        4 => (any::<u128>(), source, 0u32..200, domain).prop_map(|(lead, source, score, domain)| {
            RoutingCommand::Route {
                lead_id: Uuid::from_u128(lead),
                source,
                score,
                email_domain: domain.into(),
            }
        }),
        1 => (0..owners + 1).prop_map(|current| RoutingCommand::Reassign {
            lead_id: Uuid::from_u128(1),
            rule: RuleName::parse("everyone").unwrap(),
            current_owner: Owner::parse(&format!("owner-{current}")).unwrap(),
        }),
    ];
    proptest::collection::vec(command, 0..60)
}

fn pool(owners: usize) -> RoutingRules {
    RoutingRules::new(vec![RoutingRule {
        name: RuleName::parse("everyone").unwrap(),
        matches: Default::default(),
        owners: (0..owners)
            .map(|n| Owner::parse(&format!("owner-{n}")).unwrap())
            .collect(),
    }])
    .unwrap()
}

fn timer_command() -> impl Strategy<Value = TimerCommand> {
    prop_oneof![
        1 => (0i64..10).prop_map(|minutes| TimerCommand::Schedule {
            timer_id: Uuid::from_u128(4),
            process: "order_process".into(),
            due_at: at(minutes),
            payload: serde_json::json!({"minutes": minutes}),
        }),
        1 => Just(TimerCommand::Cancel {}),
        3 => (0i64..20).prop_map(|minutes| TimerCommand::Fire { now: at(minutes) }),
    ]
}

/// An order line of any size: prices small enough to add up, or up to the largest amount
/// (so that products and sums overflow now and then), mostly in euros.
fn order_line() -> impl Strategy<Value = OrderLine> {
    let sku = proptest::sample::select(vec!["SEAT", "SETUP", "SUPPORT"]);
    let currency = prop_oneof![9 => Just("EUR"), 1 => Just("USD")];
    let quantity = prop_oneof![3 => 1i64..100, 1 => 1i64..=1_000_000];
    let price = prop_oneof![3 => 0i64..1_000_000, 1 => 0i64..=Money::MAX_MINOR];
    (sku, quantity, currency, price, any::<bool>()).prop_map(
        |(sku, quantity, currency, price, recurring)| OrderLine {
            sku: Sku::parse(sku).unwrap(),
            quantity: Quantity::parse(quantity).unwrap(),
            unit_price: Money::parse(currency, price).unwrap(),
            recurring,
        },
    )
}

fn order_lines() -> impl Strategy<Value = OrderLines> {
    prop_oneof![
        9 => proptest::collection::vec(order_line(), 1..8),
        1 => proptest::collection::vec(order_line(), 1..=100),
    ]
    .prop_map(|lines| OrderLines::new(lines).unwrap())
}

fn won_eur_deal() -> OrderDeal {
    OrderDeal::Won {
        deal_id: Uuid::from_u128(3),
        account_id: Uuid::from_u128(2),
        currency: Currency::parse("EUR").unwrap(),
    }
}

/// Σ quantity × unit price, in 128 bits (where it cannot overflow), over the lines that
/// `counted` picks.
fn sum_of(lines: &[OrderLine], counted: impl Fn(&OrderLine) -> bool) -> i128 {
    lines
        .iter()
        .filter(|line| counted(line))
        .map(|line| i128::from(line.quantity.get()) * i128::from(line.unit_price.amount_minor))
        .sum()
}

/// Order commands over two fixed sets of lines (totals 1,490.00 and 30.00 EUR), so that
/// payments of the total, and of other amounts, both come up.
fn order_command() -> impl Strategy<Value = OrderCommand> {
    let eur = |minor| Money::parse("EUR", minor).unwrap();
    let line = move |sku: &str, quantity, price, recurring| OrderLine {
        sku: Sku::parse(sku).unwrap(),
        quantity: Quantity::parse(quantity).unwrap(),
        unit_price: eur(price),
        recurring,
    };
    let lines = proptest::sample::select(vec![
        vec![
            line("SEAT", 10, 4_900, true),
            line("SETUP", 1, 100_000, false),
        ],
        vec![line("SUPPORT", 3, 1_000, true)],
    ])
    .prop_map(|lines| OrderLines::new(lines).unwrap());
    let deal = prop_oneof![
        6 => Just(won_eur_deal()),
        1 => Just(OrderDeal::Unknown(Uuid::from_u128(3))),
        1 => proptest::sample::select(vec![DealStatus::Open, DealStatus::Lost])
            .prop_map(|status| OrderDeal::NotWon { deal_id: Uuid::from_u128(3), status }),
    ];
    let amount = proptest::sample::select(vec![149_000i64, 3_000, 0, 148_999]);
    let reason = proptest::sample::select(vec!["payment-timeout", "changed their mind"]);
    prop_oneof![
        1 => (deal, lines).prop_map(|(deal, lines)| OrderCommand::Place {
            order_id: Uuid::from_u128(5),
            deal,
            lines,
        }),
        2 => (0i64..10).prop_map(|minutes| OrderCommand::Invoice {
            invoice_id: Uuid::from_u128(6),
            due_at: at(minutes),
        }),
        2 => amount.prop_map(move |minor| OrderCommand::Pay { amount: eur(minor) }),
        1 => Just(OrderCommand::Fulfil {}),
        1 => reason.clone().prop_map(|r| OrderCommand::VoidInvoice {
            reason: Reason::parse(r).unwrap(),
        }),
        1 => reason.prop_map(|r| OrderCommand::Cancel { reason: Reason::parse(r).unwrap() }),
    ]
}

fn subscription_command() -> impl Strategy<Value = SubscriptionCommand> {
    let currency = prop_oneof![9 => Just("EUR"), 1 => Just("USD")];
    // Zero now and then: an MRR the rules refuse, which must never get in.
    let amount = prop_oneof![1 => Just(0i64), 6 => 1i64..2_000];
    let mrr = (currency, amount).prop_map(|(c, a)| Money::parse(c, a).unwrap());
    prop_oneof![
        1 => mrr.clone().prop_map(|mrr| SubscriptionCommand::Start {
            subscription_id: Uuid::from_u128(7),
            account_id: Uuid::from_u128(2),
            order_id: Uuid::from_u128(5),
            mrr,
        }),
        3 => mrr.clone().prop_map(|mrr| SubscriptionCommand::Expand { mrr }),
        3 => mrr.prop_map(|mrr| SubscriptionCommand::Contract { mrr }),
        1 => proptest::option::of(Just(Reason::parse("too expensive").unwrap()))
            .prop_map(|reason| SubscriptionCommand::Churn { reason }),
    ]
}

fn at(minutes: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 3, 9, 0, 0).unwrap() + Duration::minutes(minutes)
}

/// Decides every command on the state so far and applies what it accepts; checks that
/// every event round-trips through its stored form and that folding the events from
/// scratch gives the state the next command saw.
type Decision<A> = Result<Vec<<A as Aggregate>::Event>, annals_domain::DomainError>;

fn run<A: Aggregate + PartialEq>(
    commands: Vec<A::Command>,
    mut check: impl FnMut(&A, &A::Command, &Decision<A>, &A),
) -> Vec<A::Event> {
    let mut state = A::default();
    let mut log = Vec::new();
    for command in commands {
        let result = state.decide(command.clone());
        let before = state.clone();
        if let Ok(events) = &result {
            assert!(!events.is_empty(), "an accepted command appends something");
            for event in events {
                assert_eq!(&A::Event::decode(&event.encode()).unwrap(), event);
            }
            state = state.replay(events);
            log.extend(events.iter().cloned());
        }
        check(&before, &command, &result, &state);
        assert_eq!(
            A::default().replay(&log),
            state,
            "evolve folded from scratch"
        );
    }
    log
}

proptest! {
    #[test]
    fn lead_invariants_hold_for_any_command_sequence(
        commands in proptest::collection::vec(lead_command(), 0..40)
    ) {
        let log = run::<Lead>(commands, |before, _command, result, after| {
            // A closed lead never changes.
            if !before.status.is_open() && before.status != LeadStatus::Absent {
                assert!(result.is_err());
                assert_eq!(before, after);
            }
            // The score is the sum of the points of every recorded signal.
            if result.is_ok() {
                assert!(after.score >= before.score);
            }
        });
        let points: u32 = log
            .iter()
            .map(|e| match e {
                LeadEvent::SignalRecorded { points, kind, .. } => {
                    assert_eq!(*points, kind.points());
                    *points
                }
                _ => 0,
            })
            .sum();
        let lead = Lead::default().replay(&log);
        prop_assert_eq!(lead.score, points);
        // Qualified at most once, and only at 50 points or more.
        let qualified: Vec<u32> = log
            .iter()
            .filter_map(|e| match e {
                LeadEvent::LeadQualified { score } => Some(*score),
                _ => None,
            })
            .collect();
        prop_assert!(qualified.len() <= 1);
        prop_assert!(qualified.iter().all(|s| *s >= 50));
        // Converted only from qualified.
        if lead.status == LeadStatus::Converted {
            prop_assert!(lead.qualified);
        }
    }

    #[test]
    fn deal_invariants_hold_for_any_command_sequence(
        commands in proptest::collection::vec(deal_command(), 0..40)
    ) {
        let log = run::<Deal>(commands, |before, _command, result, after| {
            if matches!(before.status, DealStatus::Won | DealStatus::Lost) {
                assert!(result.is_err(), "a closed deal never changes");
                assert_eq!(before, after);
            }
            if let (Some(from), Some(to)) = (before.stage, after.stage) {
                assert!(to >= from, "stages only move forward");
            }
            if let (Some(from), Some(to)) = (&before.amount, &after.amount) {
                assert_eq!(from.currency, to.currency, "the currency never changes");
            }
        });
        let openings = log.iter().filter(|e| matches!(e, DealEvent::DealOpened { .. })).count();
        prop_assert!(openings <= 1);
    }
}

proptest! {
    #[test]
    fn round_robin_shares_the_leads_evenly_and_a_replay_gives_the_same_cursor(
        (owners, commands) in (1usize..6).prop_flat_map(|k| (Just(k), routing_commands(k))),
    ) {
        let all = std::iter::once(RoutingCommand::SetRules { rules: pool(owners) })
            .chain(commands)
            .collect();
        let log = run::<Routing>(all, |_, _, _, _| {});
        let mut leads = vec![0usize; owners];
        for event in &log {
            if let RoutingEvent::LeadRouted { owner, reason: RoutingReason::Qualified, .. } = event {
                let n: usize = owner.as_str()["owner-".len()..].parse().unwrap();
                leads[n] += 1;
            }
        }
        let routed: usize = leads.iter().sum();
        for (n, got) in leads.iter().enumerate() {
            prop_assert!(
                *got == routed / owners || *got == routed.div_ceil(owners),
                "owner {} got {} of {} leads over {} owners", n, got, routed, owners
            );
        }
        // The cursor is rebuilt from the `LeadRouted` events alone, on the same rules.
        let routed_only: Vec<RoutingEvent> = log
            .iter()
            .filter(|e| matches!(e, RoutingEvent::LeadRouted { .. }))
            .cloned()
            .collect();
        let everyone = RuleName::parse("everyone").unwrap();
        let live = Routing::default().replay(&log);
        let rebuilt = Routing::default()
            .replay(&[RoutingEvent::RoutingRulesSet { rules: pool(owners) }])
            .replay(&routed_only);
        prop_assert_eq!(live.cursor(&everyone), routed as u64);
        prop_assert_eq!(rebuilt.cursor(&everyone), live.cursor(&everyone));
    }

    #[test]
    fn a_timer_fires_at_most_once_never_early_and_never_once_cancelled(
        commands in proptest::collection::vec(timer_command(), 0..30)
    ) {
        let log = run::<Timer>(commands, |before, command, result, after| {
            if matches!(before.status, TimerStatus::Fired | TimerStatus::Cancelled) {
                assert!(result.is_err(), "a fired or cancelled timer never changes");
                assert_eq!(before, after);
            }
            if let (TimerCommand::Fire { now }, Ok(_)) = (command, result) {
                assert!(before.due_at.is_some_and(|due_at| *now >= due_at));
            }
        });
        let fired = log.iter().filter(|e| matches!(e, TimerEvent::TimerFired { .. })).count();
        let cancelled = log.iter().filter(|e| matches!(e, TimerEvent::TimerCancelled {})).count();
        prop_assert!(fired + cancelled <= 1);
    }
}

proptest! {
    #[test]
    fn an_orders_total_is_the_sum_of_its_lines_and_never_overflows(lines in order_lines()) {
        let all = sum_of(lines.as_slice(), |_| true);
        let recurring = sum_of(lines.as_slice(), |line| line.recurring);
        let foreign = lines.as_slice().iter().any(|line| line.unit_price.currency.as_str() != "EUR");
        let result = Order::default().decide(OrderCommand::Place {
            order_id: Uuid::from_u128(5),
            deal: won_eur_deal(),
            lines: lines.clone(),
        });
        match result {
            Ok(events) => {
                prop_assert!(!foreign);
                prop_assert!(all <= i128::from(Money::MAX_MINOR));
                let order = Order::default().replay(&events);
                let (total, recurring_total) = (order.total.unwrap(), order.recurring_total.unwrap());
                prop_assert_eq!(i128::from(total.amount_minor), all);
                prop_assert_eq!(i128::from(recurring_total.amount_minor), recurring);
                prop_assert_eq!(total.currency.as_str(), "EUR");
                prop_assert_eq!(recurring_total.currency.as_str(), "EUR");
                prop_assert_eq!(order.lines, lines.as_slice());
            }
            Err(DomainError::CurrencyMismatch { .. }) => prop_assert!(foreign),
            Err(DomainError::TooLarge { field: "total", .. }) => {
                prop_assert!(!foreign);
                prop_assert!(all > i128::from(Money::MAX_MINOR));
            }
            Err(other) => panic!("unexpected refusal {other:?}"),
        }
    }

    #[test]
    fn order_invariants_hold_for_any_command_sequence(
        commands in proptest::collection::vec(order_command(), 0..40)
    ) {
        let log = run::<Order>(commands, |before, command, result, after| {
            if before.status.is_closed() {
                assert!(result.is_err(), "no command on a closed order appends anything");
                assert_eq!(before, after);
            }
            // The totals are fixed at placement, and are the sums of the lines.
            if before.status != OrderStatus::Absent {
                assert_eq!((&before.total, &before.recurring_total), (&after.total, &after.recurring_total));
            }
            if let (Some(total), Some(recurring)) = (&after.total, &after.recurring_total) {
                assert_eq!(i128::from(total.amount_minor), sum_of(&after.lines, |_| true));
                assert_eq!(i128::from(recurring.amount_minor), sum_of(&after.lines, |l| l.recurring));
            }
            let allowed = [
                (OrderStatus::Absent, OrderStatus::Placed),
                (OrderStatus::Placed, OrderStatus::Invoiced),
                (OrderStatus::Invoiced, OrderStatus::Paid),
                (OrderStatus::Invoiced, OrderStatus::Placed),
                (OrderStatus::Paid, OrderStatus::Fulfilled),
                (OrderStatus::Placed, OrderStatus::Cancelled),
                (OrderStatus::Invoiced, OrderStatus::Cancelled),
                (OrderStatus::Paid, OrderStatus::Cancelled),
            ];
            if let Ok(events) = result {
                assert!(allowed.contains(&(before.status, after.status)), "{:?} → {:?}", before.status, after.status);
                for event in events {
                    if let OrderEvent::PaymentReceived { amount } = event {
                        assert_eq!(Some(amount), before.total.as_ref(), "a payment is of the total");
                    }
                    if let OrderEvent::PaymentRefunded { amount } = event {
                        assert_eq!(before.status, OrderStatus::Paid);
                        assert_eq!(Some(amount), before.paid.as_ref(), "the refund is the payment");
                    }
                }
            } else {
                assert_eq!(before, after);
            }
            if matches!(command, OrderCommand::Pay { .. }) && result.is_ok() {
                assert_eq!(before.status, OrderStatus::Invoiced, "only an invoiced order is paid");
            }
        });
        let count = |pick: fn(&OrderEvent) -> bool| log.iter().filter(|e| pick(e)).count();
        let placements = count(|e| matches!(e, OrderEvent::OrderPlaced { .. }));
        prop_assert!(placements <= 1);
        let payments = count(|e| matches!(e, OrderEvent::PaymentReceived { .. }));
        let refunds = count(|e| matches!(e, OrderEvent::PaymentRefunded { .. }));
        prop_assert!(payments <= 1 && refunds <= payments);
        // A cancelled order keeps no money and leaves no invoice open: a paid one is
        // refunded its payment, an invoiced one has its invoice voided first.
        let order = Order::default().replay(&log);
        if order.status == OrderStatus::Cancelled {
            prop_assert_eq!(&order.refunded, &order.paid);
            if order.paid.is_none() {
                prop_assert_eq!(order.invoice_id, None);
            }
        }
    }

    #[test]
    fn a_subscriptions_mrr_is_never_negative_whatever_the_commands(
        commands in proptest::collection::vec(subscription_command(), 0..40)
    ) {
        let log = run::<Subscription>(commands, |before, _command, result, after| {
            if before.status == SubscriptionStatus::Churned {
                assert!(result.is_err(), "no command on a churned subscription appends anything");
                assert_eq!(before, after);
            }
            if let Some(mrr) = &after.mrr {
                assert!(mrr.amount_minor >= 0, "never negative");
                if after.status == SubscriptionStatus::Active {
                    assert!(mrr.amount_minor > 0, "more than zero while active");
                }
            }
            if let (Some(from), Some(to)) = (&before.mrr, &after.mrr) {
                assert_eq!(from.currency, to.currency, "the currency never changes");
            }
        });
        // The MRR is the starting MRR plus every expansion, less every contraction.
        let mut mrr = 0i64;
        for event in &log {
            match event {
                SubscriptionEvent::SubscriptionStarted { mrr: start, .. } => mrr = start.amount_minor,
                SubscriptionEvent::SubscriptionExpanded { from, to }
                | SubscriptionEvent::SubscriptionContracted { from, to } => {
                    prop_assert_eq!(from.amount_minor, mrr);
                    mrr += to.amount_minor - from.amount_minor;
                }
                SubscriptionEvent::SubscriptionChurned { mrr: lost, .. } => {
                    prop_assert_eq!(lost.amount_minor, mrr);
                }
            }
            prop_assert!(mrr >= 0);
        }
        let subscription = Subscription::default().replay(&log);
        prop_assert_eq!(subscription.mrr.map_or(0, |m| m.amount_minor), mrr);
    }
}
