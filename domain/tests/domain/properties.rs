//! Invariants over random command sequences: whatever clients send, in whatever order,
//! the aggregates never break their rules.

use annals_domain::deal::{Deal, DealCommand, DealEvent, DealStatus};
use annals_domain::lead::{
    ConversionAccount, ConversionDeal, Lead, LeadCommand, LeadEvent, LeadStatus,
};
use annals_domain::values::*;
use annals_domain::{Aggregate, Event};
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
