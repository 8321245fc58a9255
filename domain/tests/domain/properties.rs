//! Invariants over random command sequences: whatever clients send, in whatever order,
//! the aggregates never break their rules.

use annals_domain::deal::{Deal, DealCommand, DealEvent, DealStatus};
use annals_domain::lead::{
    ConversionAccount, ConversionDeal, Lead, LeadCommand, LeadEvent, LeadStatus,
};
use annals_domain::routing::{Routing, RoutingCommand, RoutingEvent, RoutingRule, RoutingRules};
use annals_domain::timer::{Timer, TimerCommand, TimerEvent, TimerStatus};
use annals_domain::values::*;
use annals_domain::{Aggregate, Event};
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
