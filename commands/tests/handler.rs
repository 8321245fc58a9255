//! The command handler against both backends: no lost update under concurrency,
//! idempotency across restarts and under concurrent duplicates (on one server and on
//! two), cross-aggregate rules, snapshots and the cache.

// A test that cannot go on should stop loudly; `unwrap` says so shortest.
#![allow(clippy::unwrap_used)]

#[macro_use]
#[path = "../../tests/support/database.rs"]
mod database;

use std::num::NonZeroUsize;
use std::sync::Arc;

use annals_commands::{CommandContext, CommandError, CommandHandler, HandlerConfig};
use annals_domain::account::{Account, AccountCommand};
use annals_domain::deal::{Deal, DealCommand};
use annals_domain::lead::{
    self, ConversionAccount, ConversionDeal, Lead, LeadCommand, LeadEvent, LeadStatus,
};
use annals_domain::values::*;
use annals_domain::{Aggregate, DomainError, Event, StoredForm};
use annals_store::{
    AppendOutcome, AppendRequest, Direction, EventStore, IdempotencyRecord, LogFilter, Snapshot,
    StoreError,
};
use database::Fixture;
use uuid::Uuid;

on_both_backends!(
    concurrent_signals_on_one_lead_lose_no_update,
    an_idempotent_retry_after_a_restart_appends_nothing,
    concurrent_retries_of_one_idempotent_command_append_once,
    a_duplicate_email_is_refused_naming_the_existing_lead,
    a_caller_supplied_version_is_checked_and_never_retried,
    snapshots_are_taken_and_an_unreadable_one_is_ignored,
    every_event_carries_its_metadata,
    a_deal_opens_only_for_an_existing_account,
    a_stale_cache_is_dropped_and_the_command_decided_again,
    a_refusal_decided_on_a_stale_cache_is_checked_against_the_store,
    history_rebuilds_the_state_as_of_a_version_or_a_time,
    expired_idempotency_keys_are_purged,
    a_key_reused_after_its_record_was_purged_is_a_new_command,
    if_match_is_checked_against_the_store_not_a_stale_cache,
    a_keyed_create_in_flight_makes_its_duplicate_wait,
    a_key_reused_after_its_purge_is_one_new_request_under_concurrency,
    a_duplicate_create_on_another_server_answers_the_stored_outcome,
    a_duplicate_convert_without_a_deal_id_never_fails,
    a_convert_retried_on_another_server_names_what_it_opened,
    a_signal_that_lost_its_race_is_decided_again_and_qualifies_no_one_twice,
    an_assignment_that_lost_its_race_to_the_same_owner_is_refused,
    a_conversion_that_lost_its_race_is_refused,
    commands_to_one_aggregate_on_one_handler_take_turns_and_all_succeed,
    a_key_reused_with_another_body_after_the_append_lost_its_race_is_refused,
    a_key_reused_with_another_body_meanwhile_is_refused_for_the_key,
    an_erasure_destroys_its_subjects_key_in_its_append_and_nothing_else_does,
    a_command_that_keeps_losing_to_another_server_gives_up_only_after_its_wait,
    a_deadline_gives_a_command_up_only_before_its_append,
);

fn config() -> HandlerConfig {
    HandlerConfig {
        cache_capacity: NonZeroUsize::new(100).unwrap(),
        ..HandlerConfig::default()
    }
}

fn leads(store: Arc<dyn EventStore>) -> CommandHandler<Lead> {
    CommandHandler::new(store, config())
}

fn actor(name: &str) -> CommandContext {
    CommandContext {
        actor: name.into(),
        ..CommandContext::default()
    }
}

fn capture(id: Uuid, email: &str) -> LeadCommand {
    LeadCommand::Capture {
        lead_id: id,
        email: Email::parse(email).unwrap(),
        name: PersonName::parse("Ada").unwrap(),
        company: None,
        source: Source::Web,
    }
}

fn signal(kind: SignalKind) -> LeadCommand {
    LeadCommand::RecordSignal {
        kind,
        occurred_at: None,
    }
}

async fn concurrent_signals_on_one_lead_lose_no_update(db: Arc<Fixture>) {
    // Two handlers on two stores: two processes, each with a cache of its own.
    let gates = [Gate::new(db.store()), Gate::new(db.open_again().await)];
    let handlers = [
        Arc::new(leads(gates[0].clone())),
        Arc::new(CommandHandler::<Lead>::new(
            gates[1].clone(),
            HandlerConfig {
                max_attempts: 50,
                ..config()
            },
        )),
    ];
    // At 40, each server's first signal (+10) decides to qualify the lead, and neither
    // append goes on until both have decided: one loses, and must decide again. (Within a
    // server, commands to one lead take turns.)
    let id = nearly_qualified(&handlers[0]).await;
    let tasks_n = 16;
    let together = Arc::new(tokio::sync::Barrier::new(gates.len()));
    for gate in &gates {
        gate.hold_together(together.clone(), 1);
    }
    let mut tasks = Vec::new();
    for task in 0..tasks_n {
        let handler = handlers[task % 2].clone();
        tasks.push(tokio::spawn(async move {
            let mut acknowledged = 0u32;
            for i in 0..6 {
                let kind = match i {
                    0 => SignalKind::PricingPageView,
                    _ => SignalKind::ALL[(task + i) % SignalKind::ALL.len()],
                };
                match handler.execute(id, signal(kind), &actor("t")).await {
                    Ok(outcome) => {
                        assert_eq!(outcome.events[0], "SignalRecorded");
                        acknowledged += kind.points();
                    }
                    Err(CommandError::ConcurrencyConflict { .. }) => {}
                    Err(other) => panic!("unexpected {other:?}"),
                }
            }
            acknowledged
        }));
    }
    let mut expected = 40;
    for task in tasks {
        expected += within(task).await.unwrap();
    }
    let fresh = leads(db.store());
    let lead = fresh.load(id).await.unwrap();
    assert_eq!(
        lead.state.score, expected,
        "score = sum of acknowledged signals"
    );
    let events = lead_events(&db, id).await;
    assert_eq!(lead.version, events.len() as u64);
    assert_qualified_once_at_the_crossing(&events);
}

/// Every event of a lead's stream, decoded.
async fn lead_events(db: &Fixture, id: Uuid) -> Vec<LeadEvent> {
    db.store()
        .read_stream(
            &CommandHandler::<Lead>::stream(id).unwrap(),
            1,
            Direction::Forwards,
            10_000,
        )
        .await
        .unwrap()
        .iter()
        .map(|e| {
            LeadEvent::decode(&StoredForm {
                event_type: e.event_type.clone(),
                schema_version: e.schema_version,
                data: e.data.clone(),
            })
            .unwrap()
        })
        .collect()
}

/// The stream holds exactly one `LeadQualified`, right after the signal that took the
/// score to the qualifying score, and it names that score.
fn assert_qualified_once_at_the_crossing(events: &[LeadEvent]) {
    let mut score = 0;
    let mut qualified = Vec::new();
    for (i, event) in events.iter().enumerate() {
        match event {
            LeadEvent::SignalRecorded { points, .. } => score += points,
            LeadEvent::LeadQualified { score: named } => qualified.push((i, *named, score)),
            _ => {}
        }
    }
    assert_eq!(
        qualified.len(),
        1,
        "qualified (index, named, score): {qualified:?}"
    );
    let (at, named, score_then) = qualified[0];
    assert_eq!(
        named, score_then,
        "the qualification names the score it was decided on"
    );
    let before = score_then - {
        match &events[at - 1] {
            LeadEvent::SignalRecorded { points, .. } => *points,
            other => panic!("a qualification not right after a signal: {other:?}"),
        }
    };
    assert!(
        before < lead::QUALIFYING_SCORE && score_then >= lead::QUALIFYING_SCORE,
        "qualified at the crossing: {before} -> {score_then}"
    );
}

async fn an_idempotent_retry_after_a_restart_appends_nothing(db: Arc<Fixture>) {
    let id = Uuid::now_v7();
    let with_key = |key: &str| CommandContext {
        idempotency_key: Some(key.into()),
        ..actor("alice")
    };
    let first = {
        let handler = leads(db.store());
        handler
            .execute(id, capture(id, "ada@example.com"), &actor("alice"))
            .await
            .unwrap();
        handler
            .execute(id, signal(SignalKind::DemoRequest), &with_key("k-1"))
            .await
            .unwrap()
    };
    let head = db.store().head().await.unwrap();

    // A new process: a store and a handler that remember nothing.
    let handler = leads(db.open_again().await);
    let again = handler
        .execute(id, signal(SignalKind::DemoRequest), &with_key("k-1"))
        .await
        .unwrap();
    assert_eq!(again, first);
    assert_eq!(
        db.store().head().await.unwrap(),
        head,
        "the retry appended nothing"
    );

    let reused = handler
        .execute(id, signal(SignalKind::PageView), &with_key("k-1"))
        .await;
    assert!(matches!(reused, Err(CommandError::IdempotencyKeyReused)));
    // Keys are scoped by the actor: bob's k-1 is another key.
    let bob = CommandContext {
        idempotency_key: Some("k-1".into()),
        ..actor("bob")
    };
    let outcome = handler
        .execute(id, signal(SignalKind::DemoRequest), &bob)
        .await
        .unwrap();
    assert_eq!(outcome.events, vec!["SignalRecorded", "LeadQualified"]);
    assert_eq!(db.store().head().await.unwrap(), head + 2);
}

async fn concurrent_retries_of_one_idempotent_command_append_once(db: Arc<Fixture>) {
    let id = Uuid::now_v7();
    let handlers = [
        Arc::new(leads(db.store())),
        Arc::new(leads(db.open_again().await)),
    ];
    handlers[0]
        .execute(id, capture(id, "ret@example.com"), &actor("a"))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let handler = handlers[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            let context = CommandContext {
                idempotency_key: Some("same".into()),
                ..actor("a")
            };
            handler
                .execute(id, signal(SignalKind::EmailClick), &context)
                .await
        }));
    }
    // Each gets the one outcome, or (while a try on its own handler is in flight) is
    // told to come back for it.
    let mut outcomes = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(outcome) => outcomes.push(outcome),
            Err(CommandError::IdempotencyKeyInUse) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(!outcomes.is_empty());
    assert!(outcomes.windows(2).all(|w| w[0] == w[1]), "{outcomes:?}");
    let lead = leads(db.store()).load(id).await.unwrap();
    assert_eq!((lead.version, lead.state.score), (2, 3));
}

async fn a_duplicate_email_is_refused_naming_the_existing_lead(db: Arc<Fixture>) {
    let handler = leads(db.store());
    let first = Uuid::now_v7();
    handler
        .execute(first, capture(first, "ada@example.com"), &actor("a"))
        .await
        .unwrap();
    let second = Uuid::now_v7();
    let refused = handler
        .execute(second, capture(second, "ADA@example.com"), &actor("a"))
        .await;
    match refused {
        Err(CommandError::Domain(DomainError::DuplicateEmail { existing })) => {
            assert_eq!(existing, first)
        }
        other => panic!("expected DuplicateEmail, got {other:?}"),
    }
    assert!(!handler.exists(second).await.unwrap());

    // Racing captures of one new email, from two processes: exactly one lead gets it.
    let handlers = [Arc::new(handler), Arc::new(leads(db.open_again().await))];
    let mut tasks = Vec::new();
    for i in 0..8 {
        let handler = handlers[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            let id = Uuid::now_v7();
            handler
                .execute(id, capture(id, "race@example.com"), &actor("a"))
                .await
        }));
    }
    let mut won = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => won += 1,
            Err(CommandError::Domain(DomainError::DuplicateEmail { .. })) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(won, 1);
}

async fn a_caller_supplied_version_is_checked_and_never_retried(db: Arc<Fixture>) {
    let handler = leads(db.store());
    let id = Uuid::now_v7();
    handler
        .execute(id, capture(id, "v@example.com"), &actor("a"))
        .await
        .unwrap();
    let at = |version| CommandContext {
        expected_version: Some(version),
        ..actor("a")
    };
    let mismatch = handler
        .execute(id, signal(SignalKind::PageView), &at(5))
        .await;
    assert!(matches!(
        mismatch,
        Err(CommandError::VersionMismatch {
            expected: 5,
            actual: 1
        })
    ));
    // Another process moves the lead on; our handler's cache still says version 1.
    leads(db.open_again().await)
        .execute(id, signal(SignalKind::PageView), &actor("b"))
        .await
        .unwrap();
    let raced = handler
        .execute(id, signal(SignalKind::PageView), &at(1))
        .await;
    assert!(matches!(
        raced,
        Err(CommandError::VersionMismatch {
            expected: 1,
            actual: 2
        })
    ));
    let ok = handler
        .execute(id, signal(SignalKind::PageView), &at(2))
        .await
        .unwrap();
    assert_eq!(ok.version, 3);
}

async fn snapshots_are_taken_and_an_unreadable_one_is_ignored(db: Arc<Fixture>) {
    let store = db.store();
    let handler = CommandHandler::<Lead>::new(
        store.clone(),
        HandlerConfig {
            snapshot_every: 3,
            ..config()
        },
    );
    let id = Uuid::now_v7();
    handler
        .execute(id, capture(id, "s@example.com"), &actor("a"))
        .await
        .unwrap();
    for _ in 0..6 {
        handler
            .execute(id, signal(SignalKind::ContentDownload), &actor("a"))
            .await
            .unwrap();
    }
    let stream = CommandHandler::<Lead>::stream(id).unwrap();
    let snapshot = store.load_snapshot(&stream).await.unwrap().unwrap();
    assert_eq!(snapshot.version, 6);
    assert_eq!(snapshot.schema_version, Lead::SNAPSHOT_VERSION);
    let expected = handler.load(id).await.unwrap();
    assert_eq!(expected.state.score, 30);

    // A fresh handler loads from the snapshot and the events after it.
    assert_eq!(leads(store.clone()).load(id).await.unwrap(), expected);
    // An unreadable snapshot (or one of another schema) is ignored: rebuilt from events.
    for (version, schema, state) in [
        (
            7,
            Lead::SNAPSHOT_VERSION,
            serde_json::json!({"score": "lots"}),
        ),
        (7, Lead::SNAPSHOT_VERSION + 1, serde_json::json!({})),
    ] {
        store
            .save_snapshot(&Snapshot {
                stream: stream.as_str().to_owned(),
                version,
                schema_version: schema,
                state,
            })
            .await
            .unwrap();
        assert_eq!(leads(store.clone()).load(id).await.unwrap(), expected);
    }
}

async fn every_event_carries_its_metadata(db: Arc<Fixture>) {
    let handler = leads(db.store());
    let id = Uuid::now_v7();
    let context = CommandContext {
        actor: "writer-1".into(),
        correlation_id: Some("corr-9".into()),
        ..CommandContext::default()
    };
    handler
        .execute(id, capture(id, "m@example.com"), &context)
        .await
        .unwrap();
    let caused = CommandContext {
        causation_id: Some("event-42".into()),
        ..actor("process")
    };
    handler
        .execute(id, signal(SignalKind::DemoRequest), &caused)
        .await
        .unwrap();
    let events = db
        .store()
        .read_all(1, 100, &LogFilter::all())
        .await
        .unwrap()
        .events;
    let first = &events[0].metadata;
    assert_eq!(first.actor.as_deref(), Some("writer-1"));
    assert_eq!(first.correlation_id.as_deref(), Some("corr-9"));
    let command_id = first.causation_id.clone().unwrap();
    assert!(Uuid::parse_str(&command_id).is_ok(), "the command's own id");
    assert_eq!(first.extra["command"], "Capture");
    let second = &events[1].metadata;
    assert_eq!(second.causation_id.as_deref(), Some("event-42"));
    assert_eq!(second.actor.as_deref(), Some("process"));
    assert!(
        second.correlation_id.is_some(),
        "a new correlation id when none is given"
    );
    assert_eq!(second.extra["command"], "RecordSignal");
}

async fn a_deal_opens_only_for_an_existing_account(db: Arc<Fixture>) {
    let accounts = CommandHandler::<Account>::new(db.store(), config());
    let deals = CommandHandler::<Deal>::new(db.store(), config());
    let account_id = Uuid::now_v7();
    let open_deal = |deal_id: Uuid, account_exists: bool| DealCommand::Open {
        deal_id,
        account_id,
        account_exists,
        name: Name::parse("Engines").unwrap(),
        amount: Money::parse("EUR", 10_000).unwrap(),
        owner: None,
        expected_close: None,
    };
    let deal_id = Uuid::now_v7();
    let exists = accounts.exists(account_id).await.unwrap();
    assert!(!exists);
    let refused = deals
        .execute(deal_id, open_deal(deal_id, exists), &actor("a"))
        .await;
    assert!(matches!(
        refused,
        Err(CommandError::Domain(DomainError::AccountNotFound))
    ));
    // Another process (or the conversion process's own handler) opens the account: the
    // absence this handler saw before must not hide it.
    CommandHandler::<Account>::new(db.open_again().await, config())
        .execute(
            account_id,
            AccountCommand::Open {
                account_id,
                name: Name::parse("Acme").unwrap(),
                domain: None,
                industry: None,
                employees: None,
                tier: Tier::Standard,
            },
            &actor("a"),
        )
        .await
        .unwrap();
    let exists = accounts.exists(account_id).await.unwrap();
    let opened = deals
        .execute(deal_id, open_deal(deal_id, exists), &actor("a"))
        .await
        .unwrap();
    assert_eq!(
        (opened.version, opened.events.clone()),
        (1, vec!["DealOpened".to_owned()])
    );
}

async fn a_stale_cache_is_dropped_and_the_command_decided_again(db: Arc<Fixture>) {
    let ours = leads(db.store());
    let theirs = leads(db.open_again().await);
    let id = Uuid::now_v7();
    ours.execute(id, capture(id, "c@example.com"), &actor("a"))
        .await
        .unwrap();
    // Ours now caches version 1; theirs moves the lead to qualified behind its back.
    theirs
        .execute(id, signal(SignalKind::DemoRequest), &actor("b"))
        .await
        .unwrap();
    theirs
        .execute(id, signal(SignalKind::DemoRequest), &actor("b"))
        .await
        .unwrap();
    // Decided on the stale state, this signal would qualify the lead a second time.
    let outcome = ours
        .execute(id, signal(SignalKind::DemoRequest), &actor("a"))
        .await
        .unwrap();
    assert_eq!(outcome.events, vec!["SignalRecorded"]);
    assert_eq!(outcome.version, 5);
    let lead = ours.load(id).await.unwrap();
    assert_eq!(
        (lead.state.score, lead.state.status),
        (75, LeadStatus::Qualified)
    );
}

/// Another server qualifies a lead this one has cached as new: a conversion decided on
/// the cache alone would be refused (only a qualified lead converts). A refusal is
/// confirmed against the store before it is answered, and the conversion goes through.
async fn a_refusal_decided_on_a_stale_cache_is_checked_against_the_store(db: Arc<Fixture>) {
    let ours = leads(db.store());
    let theirs = leads(db.open_again().await);
    let id = Uuid::now_v7();
    ours.execute(id, capture(id, "r@example.com"), &actor("a"))
        .await
        .unwrap();
    for _ in 0..2 {
        theirs
            .execute(id, signal(SignalKind::DemoRequest), &actor("b"))
            .await
            .unwrap();
    }
    let outcome = ours.execute(id, convert_anew(), &actor("a")).await.unwrap();
    assert_eq!(outcome.events, vec!["LeadConverted"]);
    // Converted, it does not convert again (their cache, still at qualified, loses to
    // the store's version and the command is decided again: refused).
    let head = db.store().head().await.unwrap();
    assert!(matches!(
        theirs.execute(id, convert_anew(), &actor("b")).await,
        Err(CommandError::Domain(DomainError::LeadClosed { .. }))
    ));
    assert_eq!(db.store().head().await.unwrap(), head);
}

async fn history_rebuilds_the_state_as_of_a_version_or_a_time(db: Arc<Fixture>) {
    let handler = leads(db.store());
    let id = Uuid::now_v7();
    handler
        .execute(id, capture(id, "h@example.com"), &actor("a"))
        .await
        .unwrap();
    handler
        .execute(id, signal(SignalKind::PricingPageView), &actor("a"))
        .await
        .unwrap();
    let between = chrono::Utc::now();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    handler
        .execute(id, signal(SignalKind::PricingPageView), &actor("a"))
        .await
        .unwrap();
    let at_1 = handler.load_as_of(id, Some(1), None).await.unwrap();
    assert_eq!((at_1.version, at_1.state.score), (1, 0));
    let at_time = handler.load_as_of(id, None, Some(between)).await.unwrap();
    assert_eq!((at_time.version, at_time.state.score), (2, 10));
    let now = handler.load_as_of(id, None, None).await.unwrap();
    assert_eq!((now.version, now.state.score), (3, 20));
}

async fn a_key_reused_after_its_record_was_purged_is_a_new_command(db: Arc<Fixture>) {
    let handler = leads(db.store());
    let id = Uuid::now_v7();
    handler
        .execute(id, capture(id, "reuse@example.com"), &actor("a"))
        .await
        .unwrap();
    let context = CommandContext {
        idempotency_key: Some("daily".into()),
        ..actor("a")
    };
    let first = handler
        .execute(id, signal(SignalKind::PageView), &context)
        .await
        .unwrap();
    assert_eq!(first.version, 2);
    let tomorrow = chrono::Utc::now() + chrono::Duration::hours(25);
    handler
        .purge_expired_idempotency_keys(tomorrow)
        .await
        .unwrap();
    // The same key and command a day later: recorded anew, not taken for the old one.
    let again = handler
        .execute(id, signal(SignalKind::PageView), &context)
        .await
        .unwrap();
    assert_eq!((again.version, again.events.len()), (3, 1));
}

async fn if_match_is_checked_against_the_store_not_a_stale_cache(db: Arc<Fixture>) {
    let ours = leads(db.store());
    let theirs = leads(db.open_again().await);
    let id = Uuid::now_v7();
    ours.execute(id, capture(id, "stale@example.com"), &actor("a"))
        .await
        .unwrap();
    // Another process moves the lead on; our cache still says version 1.
    theirs
        .execute(id, signal(SignalKind::PageView), &actor("b"))
        .await
        .unwrap();
    let at_two = CommandContext {
        expected_version: Some(2),
        ..actor("a")
    };
    let applied = ours
        .execute(id, signal(SignalKind::EmailOpen), &at_two)
        .await
        .unwrap();
    assert_eq!(applied.version, 3);
}

async fn expired_idempotency_keys_are_purged(db: Arc<Fixture>) {
    let handler = leads(db.store());
    let id = Uuid::now_v7();
    let context = CommandContext {
        idempotency_key: Some("old".into()),
        ..actor("a")
    };
    handler
        .execute(id, capture(id, "p@example.com"), &context)
        .await
        .unwrap();
    let now = chrono::Utc::now();
    assert_eq!(
        handler.purge_expired_idempotency_keys(now).await.unwrap(),
        0
    );
    let tomorrow = now + chrono::Duration::hours(25);
    assert_eq!(
        handler
            .purge_expired_idempotency_keys(tomorrow)
            .await
            .unwrap(),
        1
    );
    assert_eq!(db.store().find_idempotency("a/old").await.unwrap(), None);
}

// Idempotency keys under concurrency: the same key sent twice at once, on one server
// and on two, for creates whose id the server makes and conversions whose deal id it
// makes (each try decides other ids, so only the key says they are one request).

/// A caller's deadline (the HTTP request timeout) that passes while the command is held
/// before its append (at its idempotency look-up) gives it up, `TimedOut`, with nothing
/// written; one that passes while its append is held at the store does not: the command
/// is carried out and answered with what the store did, so a `TimedOut` never hides a
/// write (and never invites a retry that duplicates it).
async fn a_deadline_gives_a_command_up_only_before_its_append(db: Arc<Fixture>) {
    let gate = Gate::new(db.store());
    let handler = Arc::new(leads(gate.clone()));
    let id = Uuid::now_v7();
    handler
        .execute(id, capture(id, "ada@example.com"), &actor("a"))
        .await
        .unwrap();
    let soon = |key: &str| CommandContext {
        deadline: Some(tokio::time::Instant::now() + std::time::Duration::from_millis(100)),
        ..keyed(key)
    };
    let past_the_deadline = std::time::Duration::from_millis(300);
    let signal_under = |key: &str| {
        let (handler, context) = (handler.clone(), soon(key));
        tokio::spawn(async move {
            handler
                .execute(id, signal(SignalKind::EmailClick), &context)
                .await
        })
    };

    gate.hold_lookup(1);
    let before = signal_under("before");
    within(gate.lookup_arrival()).await;
    tokio::time::sleep(past_the_deadline).await;
    let given_up = within(before).await.unwrap();
    gate.open_lookup();
    assert!(
        matches!(given_up, Err(CommandError::TimedOut)),
        "{given_up:?}"
    );
    assert_eq!(count(&db, "SignalRecorded").await, 0, "nothing written");

    gate.hold_next_append();
    let during = signal_under("during");
    within(gate.arrival()).await;
    tokio::time::sleep(past_the_deadline).await;
    gate.open();
    let carried_out = within(during).await.unwrap();
    assert!(carried_out.is_ok(), "{carried_out:?}");
    assert_eq!(count(&db, "SignalRecorded").await, 1);
}

/// Waits at most 10 s: a test that would hang fails instead.
async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(10), future)
        .await
        .expect("finished within 10 s")
}

/// What the API sends for one keyed body: the key, and the body's digest as the request
/// hash (the same for every try of a create without an id, whatever id each try makes).
fn keyed(key: &str) -> CommandContext {
    CommandContext {
        idempotency_key: Some(key.into()),
        request_hash: Some(format!("digest of the body sent with {key}")),
        ..actor("a")
    }
}

fn open_account(id: Uuid) -> AccountCommand {
    AccountCommand::Open {
        account_id: id,
        name: Name::parse("Acme").unwrap(),
        domain: None,
        industry: None,
        employees: None,
        tier: Tier::Standard,
    }
}

/// A conversion into a new account, with the account and deal ids the server makes.
fn convert_anew() -> LeadCommand {
    LeadCommand::Convert {
        deal_name: Name::parse("Acme engines").unwrap(),
        amount: Money::parse("EUR", 129_900).unwrap(),
        account: ConversionAccount::New(Uuid::now_v7()),
        deal: ConversionDeal::New(Uuid::now_v7()),
    }
}

/// A qualified lead (score 60), ready to convert.
async fn qualified(handler: &CommandHandler<Lead>) -> Uuid {
    let id = Uuid::now_v7();
    let email = format!("{}@example.com", id.simple());
    handler
        .execute(id, capture(id, &email), &actor("a"))
        .await
        .unwrap();
    for _ in 0..2 {
        handler
            .execute(id, signal(SignalKind::DemoRequest), &actor("a"))
            .await
            .unwrap();
    }
    id
}

async fn count(db: &Fixture, event_type: &str) -> usize {
    db.store()
        .read_all(1, 10_000, &LogFilter::event_types([event_type]))
        .await
        .unwrap()
        .events
        .len()
}

/// Two creates with one key, each with an id of its own (as the server makes them), the
/// first held after it took its key and before its append commits: the second is told
/// the key is in use; after the first, a third try gets the first's answer.
async fn creates_with_one_key_at_once<A>(
    gate: &Gate,
    handler: &Arc<CommandHandler<A>>,
    create: fn(Uuid) -> A::Command,
    context: &CommandContext,
) -> annals_commands::CommandOutcome
where
    A: Aggregate + 'static,
    A::Command: 'static,
{
    let first_id = Uuid::now_v7();
    gate.hold_next_append();
    let first = {
        let (handler, context) = (handler.clone(), context.clone());
        tokio::spawn(async move { handler.execute(first_id, create(first_id), &context).await })
    };
    within(gate.arrival()).await;
    let second_id = Uuid::now_v7();
    let second = within(handler.execute(second_id, create(second_id), context)).await;
    assert!(
        matches!(second, Err(CommandError::IdempotencyKeyInUse)),
        "the second try while the first is in flight: {second:?}"
    );
    gate.open();
    let first = within(first).await.unwrap().unwrap();
    assert_eq!(first.id, first_id);
    let third_id = Uuid::now_v7();
    let third = within(handler.execute(third_id, create(third_id), context))
        .await
        .unwrap();
    assert_eq!(third, first, "a try after the first gets its answer");
    first
}

async fn a_keyed_create_in_flight_makes_its_duplicate_wait(db: Arc<Fixture>) {
    let gate = Gate::new(db.store());
    let accounts = Arc::new(CommandHandler::<Account>::new(gate.clone(), config()));
    creates_with_one_key_at_once(&gate, &accounts, open_account, &keyed("open-acme")).await;
    assert_eq!(count(&db, "AccountOpened").await, 1);

    let leads = Arc::new(leads(gate.clone()));
    let capture_dup = |id| capture(id, "dup@example.com");
    creates_with_one_key_at_once(&gate, &leads, capture_dup, &keyed("capture-dup")).await;
    assert_eq!(count(&db, "LeadCaptured").await, 1);
}

async fn a_key_reused_after_its_purge_is_one_new_request_under_concurrency(db: Arc<Fixture>) {
    let gate = Gate::new(db.store());
    let accounts = Arc::new(CommandHandler::<Account>::new(gate.clone(), config()));
    let context = keyed("open-acme");
    let old = accounts
        .execute(Uuid::now_v7(), open_account(Uuid::now_v7()), &context)
        .await
        .unwrap();
    let tomorrow = chrono::Utc::now() + chrono::Duration::hours(25);
    assert_eq!(
        accounts
            .purge_expired_idempotency_keys(tomorrow)
            .await
            .unwrap(),
        1
    );
    // The same key and body a day later is a new request: a second account, once.
    let new = creates_with_one_key_at_once(&gate, &accounts, open_account, &context).await;
    assert_ne!(new.id, old.id);
    assert_eq!(count(&db, "AccountOpened").await, 2);
}

async fn a_duplicate_create_on_another_server_answers_the_stored_outcome(db: Arc<Fixture>) {
    // Two servers on one database, no memory shared: ours holds its try at the append,
    // theirs carries out the same key meanwhile.
    let gate = Gate::new(db.store());
    let ours = Arc::new(CommandHandler::<Account>::new(gate.clone(), config()));
    let theirs = CommandHandler::<Account>::new(db.open_again().await, config());
    let context = keyed("open-acme");
    let our_id = Uuid::now_v7();
    gate.hold_next_append();
    let held = {
        let (ours, context) = (ours.clone(), context.clone());
        tokio::spawn(async move { ours.execute(our_id, open_account(our_id), &context).await })
    };
    within(gate.arrival()).await;
    let their_id = Uuid::now_v7();
    let winner = within(theirs.execute(their_id, open_account(their_id), &context))
        .await
        .unwrap();
    assert_eq!(winner.id, their_id);
    gate.open();
    let loser = within(held).await.unwrap();
    assert_eq!(
        loser.unwrap(),
        winner,
        "the loser answers the stored outcome"
    );
    assert_eq!(count(&db, "AccountOpened").await, 1);

    // A lead takes its email as a claim: the loser must not read that as a duplicate.
    let ours = Arc::new(leads(gate.clone()));
    let theirs = leads(db.open_again().await);
    let context = keyed("capture-ada");
    let our_id = Uuid::now_v7();
    gate.hold_next_append();
    let held = {
        let (ours, context) = (ours.clone(), context.clone());
        tokio::spawn(async move {
            ours.execute(our_id, capture(our_id, "ada@example.com"), &context)
                .await
        })
    };
    within(gate.arrival()).await;
    let their_id = Uuid::now_v7();
    let winner = within(theirs.execute(their_id, capture(their_id, "ada@example.com"), &context))
        .await
        .unwrap();
    gate.open();
    let loser = within(held).await.unwrap();
    assert_eq!(
        loser.unwrap(),
        winner,
        "the loser answers the stored outcome"
    );
    assert_eq!(count(&db, "LeadCaptured").await, 1);
}

async fn a_duplicate_convert_without_a_deal_id_never_fails(db: Arc<Fixture>) {
    let gate = Gate::new(db.store());
    let ours = Arc::new(leads(gate.clone()));
    let theirs = leads(db.open_again().await);
    let id = qualified(&ours).await;
    let context = keyed("convert-1");
    gate.hold_next_append();
    let held = {
        let (ours, context) = (ours.clone(), context.clone());
        tokio::spawn(async move { ours.execute(id, convert_anew(), &context).await })
    };
    within(gate.arrival()).await;
    // On this server the key is in flight …
    let second = within(ours.execute(id, convert_anew(), &context)).await;
    assert!(
        matches!(second, Err(CommandError::IdempotencyKeyInUse)),
        "{second:?}"
    );
    // … another server knows nothing of it and converts.
    let winner = within(theirs.execute(id, convert_anew(), &context))
        .await
        .unwrap();
    gate.open();
    let loser = within(held).await.unwrap();
    assert_eq!(
        loser.unwrap(),
        winner,
        "the loser answers the stored outcome"
    );
    assert_eq!(count(&db, "LeadConverted").await, 1);
}

async fn a_convert_retried_on_another_server_names_what_it_opened(db: Arc<Fixture>) {
    let ours = leads(db.store());
    let theirs = leads(db.open_again().await);
    let id = qualified(&ours).await;
    // Their cache holds the lead as it was before the conversion.
    assert_eq!(
        theirs.load(id).await.unwrap().state.status,
        LeadStatus::Qualified
    );
    let context = keyed("convert-1");
    let first = ours.convert(id, convert_anew(), &context).await.unwrap();
    assert!(first.account_id.is_some() && first.deal_id.is_some());
    // The retry (the server makes other ids for it) answers what the first converted into.
    let retry = theirs.convert(id, convert_anew(), &context).await.unwrap();
    assert_eq!(retry, first);
}

// A command that lost its race: ours decides and is held at the gate before its append;
// another process carries out a command that changes what ours would decide; ours then
// loses on the version and must decide again on the new state, never append what it
// decided on the old one.

/// Runs `ours` through a held gate while `theirs` commits first, and returns our outcome.
async fn lose_a_race(
    gate: &Gate,
    ours: &Arc<CommandHandler<Lead>>,
    theirs: &CommandHandler<Lead>,
    id: Uuid,
    command: LeadCommand,
) -> (
    annals_commands::CommandOutcome,
    Result<annals_commands::CommandOutcome, CommandError>,
) {
    gate.hold_next_append();
    let held = {
        let (ours, command) = (ours.clone(), command.clone());
        tokio::spawn(async move { ours.execute(id, command, &actor("ours")).await })
    };
    within(gate.arrival()).await;
    let winner = within(theirs.execute(id, command, &actor("theirs")))
        .await
        .unwrap();
    gate.open();
    (winner, within(held).await.unwrap())
}

/// A lead at 40, one signal short of qualifying, cached by `ours` at its version.
async fn nearly_qualified(ours: &CommandHandler<Lead>) -> Uuid {
    let id = Uuid::now_v7();
    ours.execute(
        id,
        capture(id, &format!("{}@example.com", id.simple())),
        &actor("a"),
    )
    .await
    .unwrap();
    for kind in [
        SignalKind::DemoRequest,
        SignalKind::PricingPageView,
        SignalKind::ContentDownload,
    ] {
        ours.execute(id, signal(kind), &actor("a")).await.unwrap();
    }
    let lead = ours.load(id).await.unwrap();
    assert_eq!((lead.version, lead.state.score), (4, 40));
    id
}

async fn a_signal_that_lost_its_race_is_decided_again_and_qualifies_no_one_twice(db: Arc<Fixture>) {
    let gate = Gate::new(db.store());
    let ours = Arc::new(leads(gate.clone()));
    let theirs = leads(db.open_again().await);
    let id = nearly_qualified(&ours).await;
    // Both decide at 40: +10 crosses 50, so each decides to qualify the lead.
    let (winner, loser) = lose_a_race(
        &gate,
        &ours,
        &theirs,
        id,
        signal(SignalKind::PricingPageView),
    )
    .await;
    assert_eq!(winner.events, ["SignalRecorded", "LeadQualified"]);
    let loser = loser.unwrap();
    assert_eq!(
        (loser.version, loser.events.as_slice()),
        (7, ["SignalRecorded".to_owned()].as_slice()),
        "decided again on the qualified lead: a signal only"
    );
    let events = lead_events(&db, id).await;
    assert_eq!(events.len(), 7);
    assert_qualified_once_at_the_crossing(&events);
    assert_eq!(leads(db.store()).load(id).await.unwrap().state.score, 60);
}

async fn an_assignment_that_lost_its_race_to_the_same_owner_is_refused(db: Arc<Fixture>) {
    let gate = Gate::new(db.store());
    let ours = Arc::new(leads(gate.clone()));
    let theirs = leads(db.open_again().await);
    let id = Uuid::now_v7();
    ours.execute(id, capture(id, "own@example.com"), &actor("a"))
        .await
        .unwrap();
    let assign = LeadCommand::Assign {
        owner: Owner::parse("grace").unwrap(),
    };
    let (winner, loser) = lose_a_race(&gate, &ours, &theirs, id, assign).await;
    assert_eq!(winner.events, ["LeadAssigned"]);
    match loser {
        Err(CommandError::Domain(DomainError::AlreadyAssigned(owner))) => {
            assert_eq!(owner, "grace")
        }
        other => panic!("expected AlreadyAssigned, got {other:?}"),
    }
    let assigned = lead_events(&db, id)
        .await
        .into_iter()
        .filter(|e| matches!(e, LeadEvent::LeadAssigned { .. }))
        .count();
    assert_eq!(assigned, 1);
}

async fn a_conversion_that_lost_its_race_is_refused(db: Arc<Fixture>) {
    let gate = Gate::new(db.store());
    let ours = Arc::new(leads(gate.clone()));
    let theirs = leads(db.open_again().await);
    let id = qualified(&ours).await;
    let (winner, loser) = lose_a_race(&gate, &ours, &theirs, id, convert_anew()).await;
    assert_eq!(winner.events, ["LeadConverted"]);
    assert!(
        matches!(
            loser,
            Err(CommandError::Domain(DomainError::LeadClosed {
                status: "converted"
            }))
        ),
        "a second conversion: {loser:?}"
    );
    assert_eq!(count(&db, "LeadConverted").await, 1);
}

/// 64 signals sent at once to one lead through one handler (one server), every append
/// held until all 64 have arrived (or 2 s): they take turns, so every one succeeds and
/// none is lost, the score is their sum, and the lead qualified once. (Racing, all 64
/// decided on one version, and most gave up `ConcurrencyConflict` after 5 attempts.)
async fn commands_to_one_aggregate_on_one_handler_take_turns_and_all_succeed(db: Arc<Fixture>) {
    let gate = Gate::new(db.store());
    let handler = Arc::new(leads(gate.clone()));
    let id = nearly_qualified(&handler).await;
    let n = 64;
    gate.pile_up(n, std::time::Duration::from_secs(2));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let handler = handler.clone();
            tokio::spawn(async move {
                handler
                    .execute(id, signal(SignalKind::EmailClick), &actor("t"))
                    .await
            })
        })
        .collect();
    for task in tasks {
        let outcome = within(task).await.unwrap();
        assert!(outcome.is_ok(), "{outcome:?}");
    }
    let lead = leads(db.store()).load(id).await.unwrap();
    assert_eq!(lead.state.score, 40 + 3 * n as u32, "no signal lost");
    let events = lead_events(&db, id).await;
    assert_eq!(lead.version, events.len() as u64);
    assert_qualified_once_at_the_crossing(&events);
}

/// Two servers, one idempotency key, two bodies (signals of different kinds) on one
/// lead: ours decides and is held at its append; another writer's signal commits, so
/// ours loses the race; before ours looks for the key's record, theirs commits the key
/// with its other body. Ours finds a record made for another request: refused
/// `IdempotencyKeyReused`, never answered with the other request's outcome (its own
/// signal would be silently dropped).
async fn a_key_reused_with_another_body_after_the_append_lost_its_race_is_refused(
    db: Arc<Fixture>,
) {
    let gate = Gate::new(db.store());
    let ours = Arc::new(leads(gate.clone()));
    let theirs = leads(db.open_again().await);
    let id = nearly_qualified(&theirs).await;
    let key = |body: &str| CommandContext {
        idempotency_key: Some("signal-1".into()),
        request_hash: Some(format!("digest of {body}")),
        ..actor("a")
    };
    gate.hold_next_append();
    // The first look-up (before deciding) goes on; the second (after the lost race) waits.
    gate.hold_lookup(2);
    let held = {
        let (ours, context) = (ours.clone(), key("a page view"));
        tokio::spawn(async move {
            ours.execute(id, signal(SignalKind::PageView), &context)
                .await
        })
    };
    within(gate.arrival()).await;
    within(theirs.execute(id, signal(SignalKind::EmailOpen), &actor("b")))
        .await
        .unwrap();
    gate.open();
    within(gate.lookup_arrival()).await;
    within(theirs.execute(id, signal(SignalKind::EmailClick), &key("an email click")))
        .await
        .unwrap();
    gate.open_lookup();
    let loser = within(held).await.unwrap();
    assert!(
        matches!(loser, Err(CommandError::IdempotencyKeyReused)),
        "{loser:?}"
    );
    assert_eq!(
        count(&db, "SignalRecorded").await,
        5,
        "the three before, the other writer's and theirs"
    );
}

/// Two servers, one idempotency key, two bodies on two aggregates: ours opens one
/// account and is held at its append, theirs opens another account with the same key
/// meanwhile; ours's append is refused for the key, whose record is another request's:
/// `IdempotencyKeyReused`, never theirs's outcome.
async fn a_key_reused_with_another_body_meanwhile_is_refused_for_the_key(db: Arc<Fixture>) {
    let gate = Gate::new(db.store());
    let ours = Arc::new(CommandHandler::<Account>::new(gate.clone(), config()));
    let theirs = CommandHandler::<Account>::new(db.open_again().await, config());
    let (our_id, their_id) = (Uuid::now_v7(), Uuid::now_v7());
    let key = |body: &str| CommandContext {
        idempotency_key: Some("open-1".into()),
        request_hash: Some(format!("digest of {body}")),
        ..actor("a")
    };
    gate.hold_next_append();
    let held = {
        let (ours, context) = (ours.clone(), key("our account"));
        tokio::spawn(async move { ours.execute(our_id, open_account(our_id), &context).await })
    };
    within(gate.arrival()).await;
    within(theirs.execute(their_id, open_account(their_id), &key("their account")))
        .await
        .unwrap();
    gate.open();
    let loser = within(held).await.unwrap();
    assert!(
        matches!(loser, Err(CommandError::IdempotencyKeyReused)),
        "{loser:?}"
    );
    assert_eq!(count(&db, "AccountOpened").await, 1, "theirs only");
}

/// A lead captured, scored and erased through the handler: the erasure's append, and
/// only it, names the lead's stream as the subject whose data key it destroys (in its
/// own transaction); every other append destroys nothing.
async fn an_erasure_destroys_its_subjects_key_in_its_append_and_nothing_else_does(
    db: Arc<Fixture>,
) {
    let gate = Gate::new(db.store());
    let handler = leads(gate.clone());
    let id = nearly_qualified(&handler).await;
    let erased = handler
        .execute(id, LeadCommand::Erase {}, &actor("olga"))
        .await
        .unwrap();
    assert_eq!(erased.events, ["LeadErased"]);
    let stream = format!("lead-{id}");
    let appends = gate.shredding.lock().unwrap().clone();
    assert_eq!(
        appends.len(),
        5,
        "the capture, three signals and the erasure"
    );
    for (n, (on, shred)) in appends.iter().enumerate() {
        assert_eq!(on, &stream);
        let expected: &[String] = if n == 4 {
            std::slice::from_ref(&stream)
        } else {
            &[]
        };
        assert_eq!(shred.as_slice(), expected, "append {n}");
    }
}

/// Another server wins every race for the lead (the store answers each append with a
/// wrong version): the command is decided again, after a backoff each time, for its
/// whole `conflict_wait` and at least `max_attempts` times, and only then gives up
/// `ConcurrencyConflict`; within a bound (a few backoffs past the wait).
async fn a_command_that_keeps_losing_to_another_server_gives_up_only_after_its_wait(
    db: Arc<Fixture>,
) {
    let gate = Gate::new(db.store());
    let wait = std::time::Duration::from_millis(300);
    let handler = CommandHandler::<Lead>::new(
        gate.clone(),
        HandlerConfig {
            conflict_wait: wait,
            ..config()
        },
    );
    let id = nearly_qualified(&handler).await;
    gate.always_loses
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let started = std::time::Instant::now();
    let lost = within(handler.execute(id, signal(SignalKind::PageView), &actor("a"))).await;
    let waited = started.elapsed();
    let Err(CommandError::ConcurrencyConflict { attempts }) = lost else {
        panic!("{lost:?}");
    };
    assert!(attempts > config().max_attempts, "{attempts} attempts");
    assert!(waited >= wait, "gave up after {waited:?}");
    assert!(waited < wait * 10, "gave up only after {waited:?}");
    assert_eq!(count(&db, "SignalRecorded").await, 3, "nothing appended");
}

/// A store whose next append, once held, waits at the gate: the command that makes it
/// has taken its idempotency key and decided, and nothing of it is committed yet.
#[derive(Debug)]
struct Gate {
    inner: Arc<dyn EventStore>,
    hold: std::sync::atomic::AtomicBool,
    arrived: tokio::sync::Semaphore,
    opened: tokio::sync::Semaphore,
    /// Appends still to hold at a barrier, and the barrier (see `hold_together`).
    together: std::sync::Mutex<Option<(Arc<tokio::sync::Barrier>, usize)>>,
    /// Appends that arrived, and how many to wait for until when (see `pile_up`).
    piled: std::sync::Mutex<(usize, Option<(usize, std::time::Instant)>)>,
    /// Idempotency look-ups still to let through before one is held (see `hold_lookup`).
    lookups_before_hold: std::sync::Mutex<Option<usize>>,
    lookup_arrived: tokio::sync::Semaphore,
    lookup_opened: tokio::sync::Semaphore,
    /// Each append's stream and the subjects whose keys it destroys, in order.
    shredding: std::sync::Mutex<Vec<(String, Vec<String>)>>,
    /// Every append loses its race, as if another server always wrote first.
    always_loses: std::sync::atomic::AtomicBool,
}

impl Gate {
    fn new(inner: Arc<dyn EventStore>) -> Arc<Gate> {
        Arc::new(Gate {
            inner,
            hold: false.into(),
            arrived: tokio::sync::Semaphore::new(0),
            opened: tokio::sync::Semaphore::new(0),
            together: std::sync::Mutex::new(None),
            piled: std::sync::Mutex::new((0, None)),
            lookups_before_hold: std::sync::Mutex::new(None),
            lookup_arrived: tokio::sync::Semaphore::new(0),
            lookup_opened: tokio::sync::Semaphore::new(0),
            shredding: std::sync::Mutex::new(Vec::new()),
            always_loses: false.into(),
        })
    }

    /// Holds the `nth` idempotency look-up from now (1 is the next) at the gate.
    fn hold_lookup(&self, nth: usize) {
        *self.lookups_before_hold.lock().unwrap() = Some(nth - 1);
    }

    /// Returns once the held look-up has arrived.
    async fn lookup_arrival(&self) {
        self.lookup_arrived.acquire().await.unwrap().forget();
    }

    /// Lets the held look-up through.
    fn open_lookup(&self) {
        self.lookup_opened.add_permits(1);
    }

    /// Holds every append until `appends` have arrived (each decided on what it loaded,
    /// none committed), or until `patience` has passed, whichever comes first.
    fn pile_up(&self, appends: usize, patience: std::time::Duration) {
        *self.piled.lock().unwrap() = (0, Some((appends, std::time::Instant::now() + patience)));
    }

    /// Holds the next `appends` appends at `barrier` until it lets its whole party through
    /// (appends through other gates that share the barrier count too): each has decided,
    /// and none is committed, until all have.
    fn hold_together(&self, barrier: Arc<tokio::sync::Barrier>, appends: usize) {
        *self.together.lock().unwrap() = Some((barrier, appends));
    }

    fn hold_next_append(&self) {
        self.hold.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Returns once the held append has arrived at the gate.
    async fn arrival(&self) {
        self.arrived.acquire().await.unwrap().forget();
    }

    /// Lets the held append through.
    fn open(&self) {
        self.opened.add_permits(1);
    }
}

// Holds, piles up, or loses appends, and holds idempotency look-ups, as a test asks;
// everything else goes to the store as it is.
#[async_trait::async_trait]
impl annals_store::StoreLayer for Gate {
    fn inner(&self) -> &dyn EventStore {
        self.inner.as_ref()
    }
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        let barrier = match &mut *self.together.lock().unwrap() {
            Some((barrier, left)) if *left > 0 => {
                *left -= 1;
                Some(barrier.clone())
            }
            _ => None,
        };
        if let Some(barrier) = barrier {
            barrier.wait().await;
        }
        self.shredding
            .lock()
            .unwrap()
            .push((request.stream.as_str().to_owned(), request.shred.clone()));
        if self.always_loses.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::WrongExpectedVersion {
                stream: request.stream.as_str().to_owned(),
                expected: request.expected,
                actual: 1_000,
            });
        }
        let pile = {
            let mut piled = self.piled.lock().unwrap();
            piled.0 += 1;
            piled.1
        };
        if let Some((appends, until)) = pile {
            while self.piled.lock().unwrap().0 < appends && std::time::Instant::now() < until {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        if self.hold.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.arrived.add_permits(1);
            self.opened.acquire().await.unwrap().forget();
        }
        self.inner.append(request).await
    }
    async fn find_idempotency(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        let held = {
            let mut before = self.lookups_before_hold.lock().unwrap();
            match *before {
                Some(0) => {
                    *before = None;
                    true
                }
                Some(n) => {
                    *before = Some(n - 1);
                    false
                }
                None => false,
            }
        };
        if held {
            self.lookup_arrived.add_permits(1);
            self.lookup_opened.acquire().await.unwrap().forget();
        }
        self.inner.find_idempotency(key).await
    }
}

// A stream longer than one page of the handler's reads, loaded cold; a key whose record
// was purged while a stale cache decides its ids again. (The lead-conversion process is a
// consumer of the log: its tests are the consumers' runtime's.)
mod pages_and_purges {
    use annals_domain::Event;
    use annals_domain::lead::LeadEvent;
    use annals_store::{ExpectedVersion, NewEvent};

    use super::*;

    on_both_backends!(
        a_stream_longer_than_a_page_loads_whole_when_cold,
        a_key_purged_meeting_its_own_ids_from_a_stale_cache_is_told_to_come_back,
    );

    async fn a_stream_longer_than_a_page_loads_whole_when_cold(db: Arc<Fixture>) {
        // Written straight to the store, in one append: the lead, 1,000 signals (the
        // handler reads 1,000 events a page), and at version 1,002, on the second page,
        // its disqualification.
        let id = Uuid::now_v7();
        let mut events = vec![LeadEvent::LeadCaptured {
            lead_id: id,
            email: Some(Email::parse("long@example.com").unwrap()),
            name: Some(PersonName::parse("Ada").unwrap()),
            company: None,
            source: Source::Web,
        }];
        events.extend((0..1_000).map(|_| LeadEvent::SignalRecorded {
            kind: SignalKind::PageView,
            points: 1,
            occurred_at: None,
        }));
        events.push(LeadEvent::LeadDisqualified {
            reason: Reason::parse("no budget").unwrap(),
        });
        let stored = events
            .iter()
            .map(|event| {
                let form = event.encode();
                NewEvent::new(form.event_type, form.data).with_schema_version(form.schema_version)
            })
            .collect();
        db.store()
            .append(AppendRequest::new(
                CommandHandler::<Lead>::stream(id).unwrap(),
                ExpectedVersion::NoStream,
                stored,
            ))
            .await
            .unwrap();
        // A new handler (a restart): nothing cached, and no snapshot to start from.
        let cold = CommandHandler::<Lead>::new(
            db.store(),
            HandlerConfig {
                snapshot_every: 10_000,
                ..config()
            },
        );
        let lead = cold.load(id).await.unwrap();
        assert_eq!(
            (lead.version, lead.state.score, lead.state.status),
            (1_002, 1_000, LeadStatus::Disqualified),
            "the lead as of its last event"
        );
        // Decided on the whole stream: a disqualified lead takes no signal.
        let refused = cold
            .execute(id, signal(SignalKind::DemoRequest), &actor("a"))
            .await;
        assert!(
            matches!(
                refused,
                Err(CommandError::Domain(DomainError::LeadClosed {
                    status: "disqualified"
                }))
            ),
            "{refused:?}"
        );
        // History reads past the first page too.
        let before = cold.load_as_of(id, Some(1_001), None).await.unwrap();
        assert_eq!(
            (before.version, before.state.score, before.state.status),
            (1_001, 1_000, LeadStatus::New)
        );
    }

    async fn a_key_purged_meeting_its_own_ids_from_a_stale_cache_is_told_to_come_back(
        db: Arc<Fixture>,
    ) {
        let ours = leads(db.store());
        let theirs = leads(db.open_again().await);
        let id = qualified(&ours).await;
        // Their cache holds the lead as it was before the conversion.
        let before = theirs.load(id).await.unwrap();
        assert_eq!(before.state.status, LeadStatus::Qualified);
        let context = keyed("convert-1");
        let first = ours.execute(id, convert_anew(), &context).await.unwrap();
        assert_eq!(first.version, before.version + 1);
        // The key's record is purged; the conversion's events stay.
        let tomorrow = chrono::Utc::now() + chrono::Duration::hours(25);
        assert_eq!(
            ours.purge_expired_idempotency_keys(tomorrow).await.unwrap(),
            1
        );
        // Their try decides on the stale cache, at the version before, so with the first
        // try's event ids (key, request, stream, version) around other account and deal
        // ids: the store refuses the ids, and no record says what they were for.
        let retry = within(theirs.execute(id, convert_anew(), &context)).await;
        assert!(
            matches!(retry, Err(CommandError::IdempotencyKeyInUse)),
            "told to come back, never a store error: {retry:?}"
        );
        assert_eq!(count(&db, "LeadConverted").await, 1);
        // Coming back, it is decided on the lead as stored: converted already.
        let again = within(theirs.execute(id, convert_anew(), &context)).await;
        assert!(
            matches!(
                again,
                Err(CommandError::Domain(DomainError::LeadClosed {
                    status: "converted"
                }))
            ),
            "{again:?}"
        );
        assert_eq!(count(&db, "LeadConverted").await, 1);
    }
}
