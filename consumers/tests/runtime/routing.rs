//! The lead routing process at its crash windows, forced through a store that acts before
//! chosen appends: each of a routing's appends (its decision's deadline, the lead's
//! assignment, the record) failing once, and the process acting again; an operator
//! assigning the lead by hand between the process reading the lead and assigning it,
//! which leaves no trace of the routing; acting again after the keys were purged; an
//! owner who acted before the deadline keeping the lead.

use annals_commands::Handlers;
use annals_consumers::processes::lead_routing::{self, LeadRouting};
use annals_consumers::timers::SystemClock;
use annals_domain::routing::{
    ROUTING_ID, Routing, RoutingCommand, RoutingRule, RoutingRules, RuleMatch,
};
use annals_domain::timer::{Timer, TimerCommand};
use annals_engine::Process;
use annals_store::{AppendRequest, EventStore, StoreError};
use futures::future::BoxFuture;

use super::intercepting::{Intercepting, acting_once_before};
use super::*;

on_both_backends!(
    a_routing_that_failed_at_any_append_is_finished_once_when_acted_on_again,
    the_router_never_assigns_over_an_assignment_made_by_hand_meanwhile,
    a_routing_acted_on_again_after_the_keys_were_purged_is_done_once,
    an_owner_who_acted_before_the_deadline_keeps_the_lead,
    a_decision_made_meanwhile_by_another_attempt_is_the_one_applied,
);

/// The routing process's runner over `store`, with handlers of its own.
fn router(db: &Fixture, store: Arc<dyn EventStore>) -> ConsumerRunner {
    ConsumerRunner::new(
        store.clone(),
        read_database(db),
        Consumer::Process(process(store)),
    )
}

fn process(store: Arc<dyn EventStore>) -> Arc<LeadRouting> {
    let handlers = Handlers::new(store.clone(), HandlerConfig::default());
    Arc::new(LeadRouting::new(
        store,
        &handlers,
        chrono::Duration::hours(24),
        Arc::new(SystemClock),
    ))
}

/// One rule, taking every lead, with ada and bea in turn; and a qualified lead.
async fn routed_lead(db: &Fixture) -> Uuid {
    let rules = RoutingRules::new(vec![RoutingRule {
        name: RuleName::parse("all").unwrap(),
        matches: RuleMatch::default(),
        owners: vec![Owner::parse("ada").unwrap(), Owner::parse("bea").unwrap()],
    }])
    .unwrap();
    CommandHandler::<Routing>::new(db.store(), HandlerConfig::default())
        .execute(ROUTING_ID, RoutingCommand::SetRules { rules }, &context())
        .await
        .unwrap();
    qualified_lead(db).await
}

async fn events_of(db: &Fixture, event_type: &str) -> Vec<RecordedEvent> {
    db.store()
        .read_all(1, 10_000, &LogFilter::event_types([event_type]))
        .await
        .unwrap()
        .events
}

async fn owner(db: &Fixture, lead: Uuid) -> Option<String> {
    CommandHandler::<Lead>::new(db.store(), HandlerConfig::default())
        .load(lead)
        .await
        .unwrap()
        .state
        .owner
        .map(|o| o.as_str().to_owned())
}

/// A qualified lead, new: captured and brought to 50 points.
async fn qualified_lead(db: &Fixture) -> Uuid {
    let leads = CommandHandler::<Lead>::new(db.store(), HandlerConfig::default());
    let lead = Uuid::now_v7();
    leads
        .execute(lead, capture(lead, 0), &context())
        .await
        .unwrap();
    for _ in 0..2 {
        leads
            .execute(lead, signal(SignalKind::DemoRequest), &context())
            .await
            .unwrap();
    }
    lead
}

/// The store failing the first append that `fails` picks (an outage: retried, never
/// parked).
fn failing_once(
    db: &Fixture,
    fails: impl Fn(&AppendRequest) -> bool + Send + Sync + 'static,
) -> Arc<dyn EventStore> {
    let armed = AtomicBool::new(true);
    Arc::new(Intercepting {
        inner: db.store(),
        before: Box::new(move |request| {
            let fail = fails(request) && armed.swap(false, Ordering::SeqCst);
            Box::pin(async move {
                if fail {
                    Err(StoreError::Closed)
                } else {
                    Ok(())
                }
            })
        }),
    })
}

/// Which appends a test acts before.
type Picks = fn(&AppendRequest) -> bool;

/// A routing's three appends, each failed once in its turn: the decision's deadline
/// (a timer), the lead's assignment, the routing's record. Each time the process acts on
/// the qualification again and finishes the routing once: one deadline, one assignment,
/// one `LeadRouted`; nothing parks; and the cursor moved once (the next lead goes to
/// bea). (Recording before assigning, a routing that lost to a hand assignment stayed
/// recorded; assigning before scheduling lost the deadline for good.)
async fn a_routing_that_failed_at_any_append_is_finished_once_when_acted_on_again(
    db: Arc<Fixture>,
) {
    let points: [(&str, Picks); 3] = [
        ("the deadline", |r| r.stream.as_str().starts_with("timer-")),
        ("the assignment", |r| {
            r.stream.as_str().starts_with("lead-")
                && r.events.iter().any(|e| e.event_type == "LeadAssigned")
        }),
        ("the record", |r| r.stream.as_str() == "routing"),
    ];
    let first = routed_lead(&db).await;
    let mut leads = vec![first];
    for (n, (point, fails)) in points.into_iter().enumerate() {
        let lead = if n == 0 {
            first
        } else {
            qualified_lead(&db).await
        };
        if n > 0 {
            leads.push(lead);
        }
        let runner = router(&db, failing_once(&db, fails));
        assert!(runner.run_once().await.is_err(), "{point} failed");
        assert!(
            runner.parked().await.unwrap().is_empty(),
            "{point}: an outage parks nothing"
        );
        runner.catch_up().await.unwrap();
        let expected = ["ada", "bea", "ada"][n];
        assert_eq!(owner(&db, lead).await.as_deref(), Some(expected), "{point}");
        for event_type in ["LeadRouted", "TimerScheduled", "LeadAssigned"] {
            assert_eq!(
                events_of(&db, event_type).await.len(),
                n + 1,
                "{point}: {event_type} once per lead"
            );
        }
    }
    assert_eq!(leads.len(), 3);
}

/// An operator assigns the lead to zed by hand just before the process's assignment to
/// ada (decided on the lead as it read it) is appended: the process's assignment is
/// refused, it acts again, finds the lead assigned by hand and leaves it with zed. The
/// routing leaves no trace: no `LeadRouted`, the cursor unmoved (the next lead goes to
/// ada), the decision's deadline withdrawn, and speed to lead counts nothing for ada.
/// (Recording the routing first, the `LeadRouted` stayed and the rotation skipped ada.)
async fn the_router_never_assigns_over_an_assignment_made_by_hand_meanwhile(db: Arc<Fixture>) {
    let lead = routed_lead(&db).await;
    let done = Arc::new(AtomicBool::new(false));
    let store = {
        let (inner, done) = (db.store(), done.clone());
        acting_once_before(
            db.store(),
            |request| {
                request.stream.as_str().starts_with("lead-")
                    && request.events.iter().any(|e| {
                        e.event_type == "LeadAssigned"
                            && e.metadata.actor.as_deref() == Some(annals_domain::routing::ROUTER)
                    })
            },
            move || -> BoxFuture<'static, ()> {
                let (inner, done) = (inner.clone(), done.clone());
                Box::pin(async move {
                    let by_hand = LeadCommand::Assign {
                        owner: Owner::parse("zed").unwrap(),
                    };
                    let operator = CommandContext {
                        actor: "olga".into(),
                        ..CommandContext::default()
                    };
                    CommandHandler::<Lead>::new(inner, HandlerConfig::default())
                        .execute(lead, by_hand, &operator)
                        .await
                        .unwrap();
                    done.store(true, Ordering::SeqCst);
                })
            },
        )
    };
    let runner = router(&db, store);
    assert!(matches!(
        runner.run_once().await,
        Err(ConsumerError::Action(annals_engine::ActionError::NotNow(race)))
            if matches!(
                race.downcast_ref(),
                Some(annals_commands::CommandError::VersionMismatch { .. })
            )
    ));
    assert!(done.load(Ordering::SeqCst));
    runner.catch_up().await.unwrap();
    assert_eq!(
        owner(&db, lead).await.as_deref(),
        Some("zed"),
        "left as assigned by hand"
    );
    assert_eq!(
        events_of(&db, "LeadAssigned").await.len(),
        1,
        "only the operator's"
    );
    assert!(
        events_of(&db, "LeadRouted").await.is_empty(),
        "no routing recorded"
    );
    assert_eq!(
        events_of(&db, "TimerCancelled").await.len(),
        1,
        "the decision's deadline withdrawn"
    );
    assert!(runner.parked().await.unwrap().is_empty());
    let routing = CommandHandler::<Routing>::new(db.store(), HandlerConfig::default())
        .current(ROUTING_ID)
        .await
        .unwrap();
    assert_eq!(routing.state.cursor(&RuleName::parse("all").unwrap()), 0);
    let next = qualified_lead(&db).await;
    router(&db, db.store()).catch_up().await.unwrap();
    assert_eq!(owner(&db, next).await.as_deref(), Some("ada"), "ada's turn");
}

/// A lead routed in full; then every idempotency key is purged (as after a day) and
/// the process acts on the qualification again, as after a crash and a late restart:
/// nothing is appended. And a routing whose record failed (after the assignment),
/// acted on again only after the purge, is recorded once: the cursor moved once.
/// (With the key gone, the routing was recorded again and the cursor moved twice.)
async fn a_routing_acted_on_again_after_the_keys_were_purged_is_done_once(db: Arc<Fixture>) {
    let first = routed_lead(&db).await;
    router(&db, db.store()).catch_up().await.unwrap();
    assert_eq!(owner(&db, first).await.as_deref(), Some("ada"));
    let second = qualified_lead(&db).await;
    let runner = router(&db, failing_once(&db, |r| r.stream.as_str() == "routing"));
    assert!(runner.run_once().await.is_err(), "the record failed");
    assert_eq!(owner(&db, second).await.as_deref(), Some("bea"), "assigned");

    let purged = CommandHandler::<Lead>::new(db.store(), HandlerConfig::default())
        .purge_expired_idempotency_keys(chrono::Utc::now() + chrono::Duration::days(2))
        .await
        .unwrap();
    assert!(purged > 0);
    let again = process(db.store());
    for qualified in events_of(&db, "LeadQualified").await {
        again.handle(&qualified).await.unwrap();
        again.handle(&qualified).await.unwrap();
    }
    assert_eq!(
        events_of(&db, "LeadRouted").await.len(),
        2,
        "each recorded once"
    );
    assert_eq!(events_of(&db, "LeadAssigned").await.len(), 2);
    assert_eq!(events_of(&db, "TimerScheduled").await.len(), 2);
    let routing = CommandHandler::<Routing>::new(db.store(), HandlerConfig::default())
        .current(ROUTING_ID)
        .await
        .unwrap();
    assert_eq!(routing.state.cursor(&RuleName::parse("all").unwrap()), 2);
}

/// ada is routed the lead and records a signal on it as herself before her deadline
/// fires: the lead stays hers, and nothing is routed again.
async fn an_owner_who_acted_before_the_deadline_keeps_the_lead(db: Arc<Fixture>) {
    let lead = routed_lead(&db).await;
    let runner = router(&db, db.store());
    runner.catch_up().await.unwrap();
    assert_eq!(owner(&db, lead).await.as_deref(), Some("ada"));
    let ada = CommandContext {
        actor: "ada".into(),
        ..CommandContext::default()
    };
    CommandHandler::<Lead>::new(db.store(), HandlerConfig::default())
        .execute(lead, signal(SignalKind::EmailOpen), &ada)
        .await
        .unwrap();
    let deadline = events_of(&db, "TimerScheduled").await;
    assert_eq!(deadline.len(), 1);
    let timer = Uuid::parse_str(&aggregate_of(&deadline[0])).unwrap();
    CommandHandler::<Timer>::new(db.store(), HandlerConfig::default())
        .execute(
            timer,
            TimerCommand::Fire {
                now: chrono::Utc::now() + chrono::Duration::days(2),
            },
            &context(),
        )
        .await
        .unwrap();
    runner.catch_up().await.unwrap();
    assert_eq!(
        owner(&db, lead).await.as_deref(),
        Some("ada"),
        "still ada's"
    );
    assert_eq!(
        events_of(&db, "LeadRouted").await.len(),
        1,
        "not routed again"
    );
    assert_eq!(events_of(&db, "LeadAssigned").await.len(), 1);
}

fn aggregate_of(event: &RecordedEvent) -> String {
    event
        .stream
        .split_once('-')
        .map(|(_, id)| id.to_owned())
        .unwrap_or_default()
}

/// Another attempt at the same qualification (a stalled server waking) makes its
/// decision, zed, just before this one's deadline is scheduled: the timer is then
/// another attempt's, and this one applies and records what the timer holds, so the
/// lead's owner, its `LeadRouted` and its deadline all name zed. (Applying its own
/// decision, ada got the lead while the deadline waited for zed, who never had it: the
/// deadline never reassigned it.)
async fn a_decision_made_meanwhile_by_another_attempt_is_the_one_applied(db: Arc<Fixture>) {
    let lead = routed_lead(&db).await;
    let qualified = events_of(&db, "LeadQualified").await.remove(0);
    let store = {
        let (inner, cause) = (db.store(), qualified.event_id.to_string());
        acting_once_before(
            db.store(),
            |request| request.stream.as_str().starts_with("timer-"),
            move || -> BoxFuture<'static, ()> {
                let (inner, cause) = (inner.clone(), cause.clone());
                Box::pin(async move {
                    let theirs = serde_json::json!({
                        "lead_id": lead, "rule": "all", "owner": "zed",
                    });
                    annals_consumers::timers::schedule(
                        &CommandHandler::<Timer>::new(inner, HandlerConfig::default()),
                        lead_routing::NAME,
                        &cause,
                        chrono::Utc::now() + chrono::Duration::hours(24),
                        theirs,
                        &context(),
                    )
                    .await
                    .unwrap();
                })
            },
        )
    };
    router(&db, store).catch_up().await.unwrap();
    assert_eq!(
        owner(&db, lead).await.as_deref(),
        Some("zed"),
        "the timer's owner"
    );
    let routed = events_of(&db, "LeadRouted").await;
    assert_eq!(routed.len(), 1);
    assert_eq!(routed[0].data["owner"], "zed");
    let deadline = events_of(&db, "TimerScheduled").await;
    assert_eq!(deadline.len(), 1);
    assert_eq!(deadline[0].data["payload"]["owner"], "zed");
}
