//! Processes and outbound consumers on the one runtime: the lead conversion process's
//! effect exactly once (acting again after a crash between acting and moving the
//! checkpoint opens nothing twice), an outbound consumer's deliveries at least once with
//! the same id, a refusal parked and resumed by an operator's retry or skip, an outage
//! retried and never parked.

use std::sync::Mutex;

use annals_commands::{CommandError, Handlers};
use annals_consumers::processes::action_error;
use annals_domain::DomainError;
use annals_engine::{ActionError, ConsumerKind, Outbound, Process};
use annals_store::Direction;

use super::*;

on_both_backends!(
    a_conversion_opens_its_account_and_deal_exactly_once,
    a_conversion_into_an_existing_account_opens_only_the_deal,
    the_conversion_checkpoint_reaches_the_head_past_events_it_ignores,
    a_process_checkpoint_kept_before_the_one_runtime_is_where_it_goes_on,
    a_process_killed_after_acting_acts_again_with_the_same_effect,
    an_outbound_consumer_killed_after_delivering_delivers_again_with_the_same_id,
    a_refused_event_parks_and_halts_a_process_until_an_operator_retries_or_skips,
    a_process_outage_is_retried_and_never_parked,
    a_straggling_runner_never_moves_a_process_checkpoint_back,
    the_running_conversion_process_opens_deals_and_stops_when_told,
);

/// A lead captured, qualified and converted (into a new account, or an existing one);
/// the lead's, the account's and the deal's ids.
async fn converted(db: &Fixture, new_account: bool, account_id: Uuid) -> (Uuid, Uuid, Uuid) {
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
    let deal = Uuid::now_v7();
    let convert = LeadCommand::Convert {
        deal_name: Name::parse("Acme engines").unwrap(),
        amount: Money::parse("EUR", 129_900).unwrap(),
        account: if new_account {
            ConversionAccount::New(account_id)
        } else {
            ConversionAccount::Existing(account_id)
        },
        deal: ConversionDeal::New(deal),
    };
    leads.execute(lead, convert, &context()).await.unwrap();
    (lead, account_id, deal)
}

async fn count(db: &Fixture, event_type: &str) -> usize {
    db.store()
        .read_all(1, 100_000, &LogFilter::event_types([event_type]))
        .await
        .unwrap()
        .events
        .len()
}

async fn a_conversion_opens_its_account_and_deal_exactly_once(db: Arc<Fixture>) {
    use annals_domain::account::Account;
    use annals_domain::deal::Deal;
    let (_, account_id, deal_id) = converted(&db, true, Uuid::now_v7()).await;
    let process = conversion(&db);
    assert_eq!(process.kind(), ConsumerKind::Process);
    assert_eq!(process.catch_up().await.unwrap(), 1);
    let account = CommandHandler::<Account>::new(db.store(), HandlerConfig::default())
        .load(account_id)
        .await
        .unwrap();
    assert_eq!(account.state.name.unwrap().as_str(), "Acme");
    let deal = CommandHandler::<Deal>::new(db.store(), HandlerConfig::default())
        .load(deal_id)
        .await
        .unwrap();
    assert_eq!(deal.state.account_id, Some(account_id));
    assert_eq!(deal.state.amount.unwrap().amount_minor, 129_900);
    let head = db.store().head().await.unwrap();
    assert_eq!(process.catch_up().await.unwrap(), 0);

    // A crash that lost the checkpoint, or a replay: the same conversion again opens
    // nothing, from a new runner whose handlers' caches are empty.
    db.execute("DELETE FROM projection_checkpoints WHERE name = 'lead_conversion'")
        .await;
    let again = {
        let store = db.open_again().await;
        let handlers = Handlers::new(store.clone(), HandlerConfig::default());
        ConsumerRunner::new(
            store,
            read_database(&db),
            Consumer::Process(Arc::new(LeadConversion::new(&handlers))),
        )
    };
    assert_eq!(again.catch_up().await.unwrap(), 1);
    assert_eq!(
        db.store().head().await.unwrap(),
        head,
        "nothing opened twice"
    );

    // The deal's events say what caused them.
    let events = db
        .store()
        .read_stream(
            &CommandHandler::<Deal>::stream(deal_id).unwrap(),
            1,
            Direction::Forwards,
            10,
        )
        .await
        .unwrap();
    let conversions = db
        .store()
        .read_all(1, 100, &LogFilter::event_types(["LeadConverted"]))
        .await
        .unwrap()
        .events;
    assert_eq!(
        events[0].metadata.causation_id.as_deref(),
        Some(conversions[0].event_id.to_string().as_str())
    );
    assert_eq!(
        events[0].metadata.actor.as_deref(),
        Some("process:lead_conversion")
    );
}

async fn a_conversion_into_an_existing_account_opens_only_the_deal(db: Arc<Fixture>) {
    use annals_domain::account::{Account, AccountCommand};
    use annals_domain::deal::Deal;
    let accounts = CommandHandler::<Account>::new(db.store(), HandlerConfig::default());
    let account_id = Uuid::now_v7();
    let open = AccountCommand::Open {
        account_id,
        name: Name::parse("Initech").unwrap(),
        domain: None,
        industry: None,
        employees: Some(40),
        tier: Tier::Key,
    };
    accounts
        .execute(account_id, open, &context())
        .await
        .unwrap();
    let (_, _, deal_id) = converted(&db, false, account_id).await;
    conversion(&db).catch_up().await.unwrap();
    let account = accounts.load(account_id).await.unwrap();
    assert_eq!(
        (account.version, account.state.name.unwrap().as_str()),
        (1, "Initech")
    );
    let deal = CommandHandler::<Deal>::new(db.store(), HandlerConfig::default())
        .load(deal_id)
        .await
        .unwrap();
    assert_eq!(deal.state.account_id, Some(account_id));
}

async fn the_conversion_checkpoint_reaches_the_head_past_events_it_ignores(db: Arc<Fixture>) {
    converted(&db, true, Uuid::now_v7()).await;
    // After the conversion, events the process does not act on: another lead's.
    let leads = CommandHandler::<Lead>::new(db.store(), HandlerConfig::default());
    let other = Uuid::now_v7();
    leads
        .execute(other, capture(other, 1), &context())
        .await
        .unwrap();
    let process = conversion(&db);
    assert_eq!(process.run_once().await.unwrap(), Outcome::Applied(1));
    // Then it has read its own account and deal: caught up, at the log's head.
    process.catch_up().await.unwrap();
    assert_eq!(
        process.checkpoint().await.unwrap(),
        db.store().head().await.unwrap()
    );
    let status = process.status().await.unwrap();
    assert_eq!(
        (status.lag, status.status, status.parked),
        (0, "running", 0)
    );
}

/// A database that ran the conversion process before the one runtime kept its checkpoint
/// in `process_checkpoints`: the runtime goes on from it, acting on nothing before it.
async fn a_process_checkpoint_kept_before_the_one_runtime_is_where_it_goes_on(db: Arc<Fixture>) {
    converted(&db, true, Uuid::now_v7()).await;
    let head = db.store().head().await.unwrap();
    db.execute(&format!(
        "INSERT INTO process_checkpoints (name, position) VALUES ('lead_conversion', {head})"
    ))
    .await;
    let process = conversion(&db);
    process.register().await.unwrap();
    assert_eq!(process.checkpoint().await.unwrap(), head);
    assert_eq!(process.catch_up().await.unwrap(), 0);
    assert_eq!(
        count(&db, "DealOpened").await,
        0,
        "acted on nothing before it"
    );
    // A later conversion is acted on.
    let (_, _, deal) = converted(&db, true, Uuid::now_v7()).await;
    assert_eq!(process.catch_up().await.unwrap(), 1);
    position_of(&db, format!("deal-{deal}"), 1).await;
}

/// Killed (its task dropped, as a kill -9 drops its connections) after acting on a
/// conversion and before moving its checkpoint past it: the next runner, with empty
/// caches, acts on it again, and the idempotency keys make that open nothing twice.
async fn a_process_killed_after_acting_acts_again_with_the_same_effect(db: Arc<Fixture>) {
    converted(&db, true, Uuid::now_v7()).await;
    converted(&db, true, Uuid::now_v7()).await;
    let gate = Gate::at(PausePoint::Acted);
    let first = Arc::new(conversion(&db).with_pause_hook(gate.hook()));
    let running = {
        let first = first.clone();
        tokio::spawn(async move { first.catch_up().await })
    };
    gate.reached().await;
    running.abort();
    assert!(running.await.unwrap_err().is_cancelled());
    assert_eq!(
        (
            count(&db, "AccountOpened").await,
            count(&db, "DealOpened").await
        ),
        (1, 1),
        "the first conversion was acted on"
    );
    assert_eq!(
        first.checkpoint().await.unwrap(),
        0,
        "and the checkpoint not moved"
    );

    let store = db.open_again().await;
    let handlers = Handlers::new(store.clone(), HandlerConfig::default());
    let next = ConsumerRunner::new(
        store,
        read_database(&db),
        Consumer::Process(Arc::new(LeadConversion::new(&handlers))),
    );
    assert_eq!(
        next.catch_up().await.unwrap(),
        2,
        "both conversions acted on"
    );
    assert_eq!(
        (
            count(&db, "AccountOpened").await,
            count(&db, "DealOpened").await
        ),
        (2, 2),
        "each conversion opened its account and deal once"
    );
    assert_eq!(
        next.checkpoint().await.unwrap(),
        db.store().head().await.unwrap()
    );
}

/// An outbound consumer that records what it delivered: each event's id and position.
#[derive(Debug, Default)]
pub(super) struct Recording {
    pub(super) delivered: Mutex<Vec<(Uuid, u64)>>,
}

#[async_trait]
impl Outbound for Recording {
    fn name(&self) -> &'static str {
        "recording"
    }

    fn filter(&self) -> LogFilter {
        LogFilter::event_types(["LeadCaptured"])
    }

    async fn deliver(&self, event: &RecordedEvent) -> Result<(), ActionError> {
        self.delivered
            .lock()
            .unwrap()
            .push((event.event_id, event.position));
        Ok(())
    }
}

async fn an_outbound_consumer_killed_after_delivering_delivers_again_with_the_same_id(
    db: Arc<Fixture>,
) {
    let leads = CommandHandler::<Lead>::new(db.store(), HandlerConfig::default());
    for n in 0..3 {
        let id = Uuid::now_v7();
        leads.execute(id, capture(id, n), &context()).await.unwrap();
    }
    let captured = db
        .store()
        .read_all(1, 100, &LogFilter::event_types(["LeadCaptured"]))
        .await
        .unwrap()
        .events;
    let outbound = Arc::new(Recording::default());
    let gate = Gate::at(PausePoint::Acted);
    let first = Arc::new(
        ConsumerRunner::new(
            db.store(),
            read_database(&db),
            Consumer::Outbound(outbound.clone()),
        )
        .with_pause_hook(gate.hook()),
    );
    assert_eq!(first.kind(), ConsumerKind::Outbound);
    let running = {
        let first = first.clone();
        tokio::spawn(async move { first.catch_up().await })
    };
    gate.reached().await;
    running.abort();
    assert!(running.await.unwrap_err().is_cancelled());

    let next = ConsumerRunner::new(
        db.store(),
        read_database(&db),
        Consumer::Outbound(outbound.clone()),
    );
    next.catch_up().await.unwrap();
    let delivered = outbound.delivered.lock().unwrap().clone();
    let first_event = (captured[0].event_id, captured[0].position);
    let mut expected = vec![first_event, first_event];
    expected.extend(captured[1..].iter().map(|e| (e.event_id, e.position)));
    assert_eq!(
        delivered, expected,
        "the event delivered before the kill is delivered again with the same id, then \
         the others once each, in log order"
    );
}

/// A process that refuses the events at some positions (as the business refuses a
/// command) and records the positions it acted on.
#[derive(Debug, Default)]
struct Refusing {
    refused: Mutex<Vec<u64>>,
    acted: Mutex<Vec<u64>>,
    /// Tries of the store failing to come (an outage) before it answers.
    outages: Mutex<u32>,
}

#[async_trait]
impl Process for Refusing {
    fn name(&self) -> &'static str {
        "refusing"
    }

    fn filter(&self) -> LogFilter {
        LogFilter::event_types(["LeadCaptured"])
    }

    async fn handle(&self, event: &RecordedEvent) -> Result<(), ActionError> {
        self.act(event).map_err(action_error)
    }
}

impl Refusing {
    fn act(&self, event: &RecordedEvent) -> Result<(), CommandError> {
        {
            let mut outages = self.outages.lock().unwrap();
            if *outages > 0 {
                *outages -= 1;
                return Err(CommandError::Store(StoreError::Closed));
            }
        }
        if self.refused.lock().unwrap().contains(&event.position) {
            return Err(CommandError::Domain(DomainError::LeadClosed {
                status: "disqualified",
            }));
        }
        self.acted.lock().unwrap().push(event.position);
        Ok(())
    }
}

pub(super) async fn captured_leads(db: &Fixture, n: usize) -> Vec<u64> {
    let leads = CommandHandler::<Lead>::new(db.store(), HandlerConfig::default());
    let mut positions = Vec::new();
    for i in 0..n {
        let id = Uuid::now_v7();
        let outcome = leads.execute(id, capture(id, i), &context()).await.unwrap();
        positions.push(outcome.position);
    }
    positions
}

async fn a_refused_event_parks_and_halts_a_process_until_an_operator_retries_or_skips(
    db: Arc<Fixture>,
) {
    let at = captured_leads(&db, 4).await;
    let process = Arc::new(Refusing::default());
    process.refused.lock().unwrap().extend([at[1], at[3]]);
    let runner = ConsumerRunner::new(
        db.store(),
        read_database(&db),
        Consumer::Process(process.clone()),
    )
    .with_failure_policy(FailurePolicy::Halt, 2);
    assert!(matches!(
        runner.run_once().await,
        Err(ConsumerError::Action(ActionError::Refused(refusal)))
            if matches!(refusal.downcast_ref(), Some(CommandError::Domain(_)))
    ));
    assert_eq!(runner.run_once().await.unwrap(), Outcome::Halted);
    assert_eq!(*process.acted.lock().unwrap(), [at[0]]);
    let parked = runner.parked().await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!((parked[0].position, parked[0].attempts), (at[1], 2));
    assert_eq!(
        runner.checkpoint().await.unwrap(),
        at[1] - 1,
        "halted before it"
    );
    let status = runner.status().await.unwrap();
    assert_eq!((status.status, status.parked), ("halted", 1));
    assert_eq!(runner.run_once().await.unwrap(), Outcome::Halted);

    // Still refused: it stays parked, one attempt more.
    assert!(matches!(
        runner.retry_parked_event(at[1]).await,
        Err(ConsumerError::StillFailing { .. })
    ));
    assert_eq!(runner.parked().await.unwrap()[0].attempts, 3);
    // The business now accepts it: the retry acts on it, and the process goes on.
    process.refused.lock().unwrap().retain(|p| *p != at[1]);
    runner.retry_parked_event(at[1]).await.unwrap();
    assert!(matches!(
        runner.retry_parked_event(at[1]).await,
        Err(ConsumerError::NotParked { .. })
    ));
    assert_eq!(runner.checkpoint().await.unwrap(), at[1]);
    // It goes on, to the next refusal: refused twice, parked, halted.
    assert!(runner.run_once().await.is_err());
    assert_eq!(runner.run_once().await.unwrap(), Outcome::Halted);
    assert_eq!(*process.acted.lock().unwrap(), [at[0], at[1], at[2]]);
    // The next refusal halts it again; a skip leaves that event out for good.
    assert_eq!(runner.parked().await.unwrap()[0].position, at[3]);
    runner.skip_parked_event(at[3], "operator").await.unwrap();
    runner.catch_up().await.unwrap();
    assert_eq!(*process.acted.lock().unwrap(), [at[0], at[1], at[2]]);
    assert_eq!(
        runner.checkpoint().await.unwrap(),
        db.store().head().await.unwrap()
    );
    assert!(runner.parked().await.unwrap().is_empty());
}

async fn a_process_outage_is_retried_and_never_parked(db: Arc<Fixture>) {
    let at = captured_leads(&db, 2).await;
    let process = Arc::new(Refusing::default());
    *process.outages.lock().unwrap() = 5;
    let runner = ConsumerRunner::new(
        db.store(),
        read_database(&db),
        Consumer::Process(process.clone()),
    )
    .with_failure_policy(FailurePolicy::Halt, 2);
    for _ in 0..5 {
        assert!(matches!(
            runner.run_once().await,
            Err(ConsumerError::Action(ActionError::NotNow(outage)))
                if matches!(outage.downcast_ref(), Some(CommandError::Store(_)))
        ));
    }
    assert!(
        runner.parked().await.unwrap().is_empty(),
        "an outage parks nothing"
    );
    runner.catch_up().await.unwrap();
    assert_eq!(*process.acted.lock().unwrap(), at);
}

async fn the_running_conversion_process_opens_deals_and_stops_when_told(db: Arc<Fixture>) {
    let process = Arc::new(conversion(&db));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = {
        let process = process.clone();
        tokio::spawn(async move { process.run_until_stopped(stopped).await })
    };
    // Two conversions, the second once the runner has acted on the first and gone back
    // to waiting for events.
    for _ in 0..2 {
        let (_, _, deal) = converted(&db, true, Uuid::now_v7()).await;
        let deals =
            CommandHandler::<annals_domain::deal::Deal>::new(db.store(), HandlerConfig::default());
        let opened = async {
            loop {
                let head = db.store().head().await.unwrap();
                if deals.exists(deal).await.unwrap() {
                    return;
                }
                db.store()
                    .wait_for_events(head, Duration::from_secs(1))
                    .await
                    .unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(10), opened)
            .await
            .expect("the running process opened the deal within 10 s");
    }
    assert!(!running.is_finished(), "it runs until it is told to stop");
    stop.send(true).unwrap();
    // Below the 5 s it waits for events at a time: only the stop ends it in time.
    tokio::time::timeout(Duration::from_secs(4), running)
        .await
        .expect("it stopped within 4 s of being told")
        .unwrap();
}

/// Two runners of one outbound consumer (a lease lost without noticing): the first reads
/// its batch and pauses; the second delivers everything and moves the checkpoint to the
/// head; the first, resumed, delivers its batch again (at least once) but finds the
/// checkpoint moved and leaves it where the second put it, so nothing is delivered a
/// third time.
async fn a_straggling_runner_never_moves_a_process_checkpoint_back(db: Arc<Fixture>) {
    let outbound = Arc::new(Recording::default());
    // A checkpoint row already there: the runners update it (rather than make it).
    let first = captured_leads(&db, 1).await;
    ConsumerRunner::new(
        db.store(),
        read_database(&db),
        Consumer::Outbound(outbound.clone()),
    )
    .catch_up()
    .await
    .unwrap();
    outbound.delivered.lock().unwrap().clear();
    assert!(first[0] > 0);
    let at = captured_leads(&db, 3).await;
    let gate = Gate::at(PausePoint::BatchRead);
    let runner = |hook: Option<PauseHook>| {
        let runner = ConsumerRunner::new(
            db.store(),
            read_database(&db),
            Consumer::Outbound(outbound.clone()),
        );
        match hook {
            Some(hook) => runner.with_pause_hook(hook),
            None => runner,
        }
    };
    let straggler = Arc::new(runner(Some(gate.hook())));
    let stepping = {
        let straggler = straggler.clone();
        tokio::spawn(async move { straggler.run_once().await })
    };
    gate.reached().await;
    let other = runner(None);
    other.catch_up().await.unwrap();
    let head = db.store().head().await.unwrap();
    assert_eq!(other.checkpoint().await.unwrap(), head);
    gate.resume();
    assert!(matches!(
        stepping.await.unwrap(),
        Err(ConsumerError::CheckpointMoved(_))
    ));
    assert_eq!(other.checkpoint().await.unwrap(), head, "never moved back");
    other.catch_up().await.unwrap();
    let delivered: Vec<u64> = outbound
        .delivered
        .lock()
        .unwrap()
        .iter()
        .map(|(_, p)| *p)
        .collect();
    assert_eq!(
        delivered.iter().filter(|p| **p == at[0]).count(),
        2,
        "{delivered:?}"
    );
    for position in &at[1..] {
        assert_eq!(
            delivered.iter().filter(|p| *p == position).count(),
            1,
            "{delivered:?}"
        );
    }
}
