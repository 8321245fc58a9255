//! The lead routing process at its crash windows, forced through a store that acts before
//! chosen appends: the deadline's timer failing to be scheduled after the routing was
//! recorded, and an operator assigning the lead by hand between the process reading the
//! lead and assigning it.

use std::sync::Mutex;

use annals_commands::Handlers;
use annals_domain::routing::{
    ROUTING_ID, Routing, RoutingCommand, RoutingRule, RoutingRules, RuleMatch,
};
use annals_projections::lead_routing::LeadRouting;
use annals_store::{AppendOutcome, AppendRequest, EventStore, StoreError};
use futures::future::BoxFuture;

use super::*;

on_both_backends!(
    a_deadline_that_failed_to_be_set_is_set_when_the_qualification_is_acted_on_again,
    the_router_never_assigns_over_an_assignment_made_by_hand_meanwhile,
);

type BeforeAppend =
    Box<dyn Fn(&AppendRequest) -> BoxFuture<'static, Result<(), StoreError>> + Send + Sync>;

/// The store, with something done before each append (which may fail it).
struct Intercepting {
    inner: Arc<dyn EventStore>,
    before: BeforeAppend,
}

impl std::fmt::Debug for Intercepting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Intercepting")
    }
}

#[async_trait]
impl EventStore for Intercepting {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        (self.before)(&request).await?;
        self.inner.append(request).await
    }
    async fn read_stream(
        &self,
        stream: &annals_store::StreamName,
        from_version: u64,
        direction: annals_store::Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner
            .read_stream(stream, from_version, direction, limit)
            .await
    }
    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
        filter: &LogFilter,
    ) -> Result<annals_store::LogPage, StoreError> {
        self.inner.read_all(from_position, limit, filter).await
    }
    async fn head(&self) -> Result<u64, StoreError> {
        self.inner.head().await
    }
    async fn wait_for_events(&self, after: u64, timeout: Duration) -> Result<u64, StoreError> {
        self.inner.wait_for_events(after, timeout).await
    }
    async fn save_snapshot(&self, snapshot: &annals_store::Snapshot) -> Result<(), StoreError> {
        self.inner.save_snapshot(snapshot).await
    }
    async fn load_snapshot(
        &self,
        stream: &annals_store::StreamName,
    ) -> Result<Option<annals_store::Snapshot>, StoreError> {
        self.inner.load_snapshot(stream).await
    }
    async fn find_idempotency(
        &self,
        key: &str,
    ) -> Result<Option<annals_store::IdempotencyRecord>, StoreError> {
        self.inner.find_idempotency(key).await
    }
    async fn purge_idempotency(
        &self,
        recorded_before: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64, StoreError> {
        self.inner.purge_idempotency(recorded_before).await
    }
    async fn verify(&self) -> Result<annals_store::AuditReport, StoreError> {
        self.inner.verify().await
    }
    async fn anchor(&self) -> Result<annals_store::Anchor, StoreError> {
        self.inner.anchor().await
    }
    async fn find_anchor(&self, hash: &str) -> Result<Option<u64>, StoreError> {
        self.inner.find_anchor(hash).await
    }
}

/// The routing process's runner over `store`, with handlers of its own.
fn router(db: &Fixture, store: Arc<dyn EventStore>) -> ConsumerRunner {
    let handlers = Handlers::new(store.clone(), HandlerConfig::default());
    ConsumerRunner::new(
        store.clone(),
        read_database(db),
        Consumer::Process(Arc::new(LeadRouting::new(
            store,
            &handlers,
            chrono::Duration::hours(24),
        ))),
    )
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

/// The routing is recorded, then scheduling its deadline fails (the store is down): the
/// process acts on the qualification again, and then the lead has its owner and its
/// deadline, each once. (Assigning before scheduling lost the deadline for good: acting
/// again found the lead assigned and did nothing.)
async fn a_deadline_that_failed_to_be_set_is_set_when_the_qualification_is_acted_on_again(
    db: Arc<Fixture>,
) {
    let lead = routed_lead(&db).await;
    let down = Arc::new(AtomicBool::new(true));
    let store: Arc<dyn EventStore> = Arc::new(Intercepting {
        inner: db.store(),
        before: {
            let down = down.clone();
            Box::new(move |request: &AppendRequest| {
                let fails =
                    request.stream.as_str().starts_with("timer-") && down.load(Ordering::SeqCst);
                Box::pin(async move {
                    if fails {
                        Err(StoreError::Closed)
                    } else {
                        Ok(())
                    }
                })
            })
        },
    });
    let runner = router(&db, store);
    assert!(
        runner.run_once().await.is_err(),
        "the timer's append failed"
    );
    assert_eq!(events_of(&db, "LeadRouted").await.len(), 1);
    assert!(events_of(&db, "TimerScheduled").await.is_empty());
    assert!(
        runner.parked().await.unwrap().is_empty(),
        "an outage parks nothing"
    );

    down.store(false, Ordering::SeqCst);
    runner.catch_up().await.unwrap();
    assert_eq!(owner(&db, lead).await.as_deref(), Some("ada"));
    assert_eq!(events_of(&db, "LeadRouted").await.len(), 1, "routed once");
    assert_eq!(
        events_of(&db, "TimerScheduled").await.len(),
        1,
        "its deadline, once"
    );
    assert_eq!(
        events_of(&db, "LeadAssigned").await.len(),
        1,
        "assigned once"
    );
}

/// An operator assigns the lead to zed by hand just as the process records its routing
/// to ada: the process's assignment (at the version it read the lead at) is refused, it
/// acts again, finds the lead assigned by hand, and leaves it with zed.
async fn the_router_never_assigns_over_an_assignment_made_by_hand_meanwhile(db: Arc<Fixture>) {
    let lead = routed_lead(&db).await;
    let armed = Arc::new(AtomicBool::new(true));
    let done: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let store: Arc<dyn EventStore> = Arc::new(Intercepting {
        inner: db.store(),
        before: {
            let (armed, inner, done) = (armed.clone(), db.store(), done.clone());
            Box::new(move |request: &AppendRequest| {
                let now =
                    request.stream.as_str() == "routing" && armed.swap(false, Ordering::SeqCst);
                let (inner, done) = (inner.clone(), done.clone());
                Box::pin(async move {
                    if now {
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
                        *done.lock().unwrap() = Some("zed".into());
                    }
                    Ok(())
                })
            })
        },
    });
    let runner = router(&db, store);
    assert!(matches!(
        runner.run_once().await,
        Err(ProjectionError::Command(
            annals_commands::CommandError::VersionMismatch { .. }
        ))
    ));
    assert_eq!(done.lock().unwrap().as_deref(), Some("zed"));
    runner.catch_up().await.unwrap();
    assert_eq!(
        owner(&db, lead).await.as_deref(),
        Some("zed"),
        "left as assigned by hand"
    );
    let assigned = events_of(&db, "LeadAssigned").await;
    assert_eq!(assigned.len(), 1, "only the operator's");
    assert!(runner.parked().await.unwrap().is_empty());
}
