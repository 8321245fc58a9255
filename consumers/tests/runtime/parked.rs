//! Parked events and the operator's retry, raced against the live runner and against each
//! other with the interleaving forced (a projector paused inside its transaction), and
//! outages that must be retried rather than parked.

use std::sync::atomic::AtomicBool;

use tokio::sync::Notify;

use super::*;

on_both_backends!(
    a_retry_racing_a_live_batch_loses_no_event,
    two_retries_of_one_parked_event_apply_it_once,
    a_skip_policy_retry_refolds_the_rows_it_touches_like_a_rebuild,
    an_outage_is_retried_and_never_parked,
    an_outage_at_an_event_is_retried_and_never_parked,
    the_running_projection_backs_off_doubling_through_an_outage,
    a_retry_waits_for_a_rebuild_that_holds_its_claim,
    a_row_the_database_refuses_parks_its_event,
    attempts_are_counted_per_event,
    a_projector_that_cannot_refold_keeps_a_retried_event_parked,
    a_projector_whose_rows_span_streams_refolds_from_the_whole_log,
    a_halted_retry_meets_an_outage_then_applies_the_event_where_it_stands,
    a_retry_after_a_crash_between_parking_and_halting_leaves_out_skipped_events,
    a_retry_refolds_a_stream_read_in_pages_leaving_out_what_is_still_parked,
    a_rebuild_leaves_a_parked_event_out_as_the_live_runner_does,
);

/// The lead board, paused once inside its transaction: it says when it got there
/// (`reached`) and waits for `release`, before or after writing its rows.
struct Paused {
    after_writing: bool,
    armed: AtomicBool,
    reached: Arc<Notify>,
    release: Arc<Notify>,
}

impl std::fmt::Debug for Paused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Paused")
    }
}

impl Paused {
    fn new(after_writing: bool) -> Arc<Self> {
        Arc::new(Paused {
            after_writing,
            armed: AtomicBool::new(true),
            reached: Arc::new(Notify::new()),
            release: Arc::new(Notify::new()),
        })
    }

    async fn pause(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.reached.notify_one();
            self.release.notified().await;
        }
    }
}

#[async_trait]
impl Projector for Paused {
    lead_board_name_filter_and_tables!();

    async fn apply(&self, tx: &mut ReadTx, events: &[RecordedEvent]) -> Result<(), Failure> {
        if !self.after_writing {
            self.pause().await;
        }
        LeadBoard.apply(tx, events).await?;
        if self.after_writing {
            self.pause().await;
        }
        Ok(())
    }

    fn rows_follow_streams(&self) -> bool {
        LeadBoard.rows_follow_streams()
    }

    async fn refold(
        &self,
        tx: &mut ReadTx,
        event: &RecordedEvent,
        history: &[RecordedEvent],
    ) -> Result<(), Failure> {
        if !self.after_writing {
            self.pause().await;
        }
        LeadBoard.refold(tx, event, history).await?;
        if self.after_writing {
            self.pause().await;
        }
        Ok(())
    }
}

/// Waits until `task` has finished or is blocked on a lock another transaction holds.
/// On PostgreSQL that is seen in `pg_locks`; on SQLite every writer of the process waits
/// its turn behind the store's write gate, so there is nothing to observe: a short grace
/// lets the task run until it waits there (the assertions hold whichever happened).
async fn finished_or_blocked<T>(db: &Fixture, task: &tokio::task::JoinHandle<T>) {
    match db.backend() {
        Backend::Sqlite => tokio::time::sleep(Duration::from_millis(300)).await,
        Backend::Postgres => {
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let waiting = db
                    .text_rows(
                        "SELECT CAST(COUNT(*) AS TEXT) FROM pg_locks l \
                           JOIN pg_stat_activity a ON a.pid = l.pid \
                          WHERE NOT l.granted AND a.datname = current_database()",
                    )
                    .await;
                if task.is_finished() || waiting[0][0].as_deref() != Some("0") {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < until,
                    "the task neither finished nor waited on a lock"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

fn skipping(db: &Fixture, projector: Arc<dyn Projector>) -> ConsumerRunner {
    runner(db, projector).with_failure_policy(FailurePolicy::Skip, 1)
}

/// One lead, captured, with a signal the board parked (skip policy), and the board
/// caught up after it. Returns the lead and the parked signal's position.
async fn a_lead_with_a_parked_signal(db: &Fixture) -> (Uuid, u64) {
    let leads = CommandHandler::<Lead>::new(db.store(), HandlerConfig::default());
    let id = Uuid::now_v7();
    leads.execute(id, capture(id, 1), &context()).await.unwrap();
    let signal = leads
        .execute(id, signal(SignalKind::DemoRequest), &context())
        .await
        .unwrap();
    let board = skipping(db, Arc::new(Failing::first_of_type("SignalRecorded", 1)));
    board.catch_up().await.unwrap();
    let parked = board.parked().await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].position, signal.position);
    (id, signal.position)
}

/// The live board equals a rebuild from position 0 (which applies every event).
async fn assert_board_equals_a_rebuild(db: &Fixture, what: &str) {
    let rows = db.text_rows(BOARD).await;
    rebuild_in_place(db).await;
    assert_eq!(db.text_rows(BOARD).await, rows, "{what}");
}

async fn a_retry_racing_a_live_batch_loses_no_event(db: Arc<Fixture>) {
    let (id, _) = a_lead_with_a_parked_signal(&db).await;
    let leads = CommandHandler::<Lead>::new(db.store(), HandlerConfig::default());
    leads
        .execute(id, signal(SignalKind::PricingPageView), &context())
        .await
        .unwrap();
    // The live runner applies the new signal and stops before its commit.
    let paused = Paused::new(true);
    let live = Arc::new(skipping(&db, paused.clone()));
    let batch = tokio::spawn({
        let live = live.clone();
        async move { live.run_once().await }
    });
    paused.reached.notified().await;
    // The operator retries the parked signal meanwhile.
    let retrier = Arc::new(skipping(&db, Arc::new(LeadBoard)));
    let retry = tokio::spawn({
        let retrier = retrier.clone();
        async move { retrier.retry_parked().await }
    });
    finished_or_blocked(&db, &retry).await;
    paused.release.notify_one();
    batch.await.unwrap().unwrap();
    assert_eq!(retry.await.unwrap().unwrap(), 0, "the retry applied it");
    retrier.catch_up().await.unwrap();
    assert!(retrier.parked().await.unwrap().is_empty());
    assert_board_equals_a_rebuild(&db, "both signals applied, once each").await;
}

async fn two_retries_of_one_parked_event_apply_it_once(db: Arc<Fixture>) {
    a_lead_with_a_parked_signal(&db).await;
    // The first retry stops inside its transaction, before it reads the row.
    let paused = Paused::new(false);
    let first = Arc::new(skipping(&db, paused.clone()));
    let first_retry = tokio::spawn({
        let first = first.clone();
        async move { first.retry_parked().await }
    });
    paused.reached.notified().await;
    let second = Arc::new(skipping(&db, Arc::new(LeadBoard)));
    let second_retry = tokio::spawn({
        let second = second.clone();
        async move { second.retry_parked().await }
    });
    finished_or_blocked(&db, &second_retry).await;
    paused.release.notify_one();
    assert_eq!(first_retry.await.unwrap().unwrap(), 0);
    assert_eq!(second_retry.await.unwrap().unwrap(), 0);
    assert!(second.parked().await.unwrap().is_empty());
    assert_board_equals_a_rebuild(&db, "the signal applied once").await;
}

async fn a_skip_policy_retry_refolds_the_rows_it_touches_like_a_rebuild(db: Arc<Fixture>) {
    // An assignment parked, then a later event on the same lead: applying the old
    // assignment on top of today's row would give a row no rebuild gives.
    let leads = CommandHandler::<Lead>::new(db.store(), HandlerConfig::default());
    let id = Uuid::now_v7();
    leads.execute(id, capture(id, 1), &context()).await.unwrap();
    leads
        .execute(id, assign_to_bob(), &context())
        .await
        .unwrap();
    leads
        .execute(
            id,
            LeadCommand::Disqualify {
                reason: Reason::parse("spam").unwrap(),
            },
            &context(),
        )
        .await
        .unwrap();
    let board = skipping(&db, Arc::new(Failing::first_of_type("LeadAssigned", 1)));
    board.catch_up().await.unwrap();
    assert_eq!(board.parked().await.unwrap().len(), 1);

    let retrier = skipping(&db, Arc::new(LeadBoard));
    assert_eq!(retrier.retry_parked().await.unwrap(), 0);
    assert!(retrier.parked().await.unwrap().is_empty());
    let report = retrier.verify().await.unwrap();
    assert!(report.equal, "{:?}", report.differences);
    assert_board_equals_a_rebuild(&db, "the retried row as a rebuild folds it").await;
}

async fn a_retry_waits_for_a_rebuild_that_holds_its_claim(db: Arc<Fixture>) {
    // A rebuild claimed and filled past the parked signal (leaving it out, as the live
    // generation does): a retry now would re-fold the live rows only, and the swap would
    // then bring in a generation without the signal. It is refused until the rebuild ends.
    let (_, position) = a_lead_with_a_parked_signal(&db).await;
    let rebuilder = skipping(&db, Arc::new(LeadBoard));
    let claim = rebuilder.claim_rebuild().await.unwrap();
    let retrier = skipping(&db, Arc::new(LeadBoard));
    let refused = retrier.retry_parked_event(position).await;
    assert!(
        matches!(refused, Err(ConsumerError::Busy(_))),
        "a retry during a rebuild: {refused:?}"
    );
    assert_eq!(retrier.parked().await.unwrap().len(), 1, "still parked");
    rebuilder.finish_rebuild(claim).await.unwrap();
    retrier.retry_parked_event(position).await.unwrap();
    assert!(retrier.parked().await.unwrap().is_empty());
    assert_board_equals_a_rebuild(&db, "the signal in the swapped-in generation").await;
}

/// A database error as PostgreSQL reports one, with its SQLSTATE.
#[derive(Debug)]
struct Sqlstate(&'static str);

impl std::fmt::Display for Sqlstate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "injected database error {}", self.0)
    }
}

impl std::error::Error for Sqlstate {}

impl sqlx::error::DatabaseError for Sqlstate {
    fn message(&self) -> &str {
        "injected"
    }

    fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
        Some(self.0.into())
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> sqlx::error::ErrorKind {
        sqlx::error::ErrorKind::Other
    }
}

/// The lead board behind a database that fails its first `times` batches with an outage
/// (a deadlock, a lock timeout, a serialization failure, a statement timeout), as a
/// failure of the batch or, `at_event`, of its first event.
#[derive(Debug)]
struct Outage {
    left: AtomicUsize,
    at_event: bool,
}

#[async_trait]
impl Projector for Outage {
    lead_board_name_filter_and_tables!();

    async fn apply(&self, tx: &mut ReadTx, events: &[RecordedEvent]) -> Result<(), Failure> {
        const CODES: [&str; 4] = ["40P01", "55P03", "40001", "57014"];
        if let Ok(left) = self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        {
            let code = CODES[left % CODES.len()];
            return Err(Failure {
                position: events.first().filter(|_| self.at_event).map(|e| e.position),
                error: ConsumerError::Database(StoreError::from(sqlx::Error::Database(Box::new(
                    Sqlstate(code),
                )))),
            });
        }
        LeadBoard.apply(tx, events).await
    }
}

async fn an_outage_is_retried_and_never_parked(db: Arc<Fixture>) {
    outage_retried_and_never_parked(&db, false).await;
}

/// The outage comes back as a failure of one event (as a projector that writes an
/// event's rows one statement at a time would report it): still an outage, never parked,
/// however many times it fails in a row.
async fn an_outage_at_an_event_is_retried_and_never_parked(db: Arc<Fixture>) {
    outage_retried_and_never_parked(&db, true).await;
}

async fn outage_retried_and_never_parked(db: &Fixture, at_event: bool) {
    history(db).await;
    let board = runner(
        db,
        Arc::new(Outage {
            left: AtomicUsize::new(40),
            at_event,
        }),
    )
    .with_failure_policy(FailurePolicy::Halt, 3);
    for attempt in 0..8 {
        let step = board.run_once().await;
        assert!(
            matches!(
                step,
                Err(ConsumerError::Database(StoreError::Unavailable(_)))
            ),
            "attempt {attempt}: {step:?}"
        );
        assert!(
            board.parked().await.unwrap().is_empty(),
            "attempt {attempt}"
        );
        assert_ne!(board.status().await.unwrap().status, "halted");
    }
    // The outage ends: the projection goes on where it was.
    let steady = runner(db, Arc::new(LeadBoard));
    steady.catch_up().await.unwrap();
    assert!(steady.parked().await.unwrap().is_empty());
    assert_eq!(
        steady.checkpoint().await.unwrap(),
        db.store().head().await.unwrap()
    );
    assert_board_equals_a_rebuild(db, "nothing lost to the outage").await;
}

/// The lead board, whose rows for one assignment the database refuses (a row missing
/// its required columns): the event's own failure, found by applying the batch's events
/// one by one, and parked like a projector's refusal.
#[derive(Debug)]
struct Refused;

#[async_trait]
impl Projector for Refused {
    lead_board_name_filter_and_tables!();

    async fn apply(&self, tx: &mut ReadTx, events: &[RecordedEvent]) -> Result<(), Failure> {
        LeadBoard.apply(tx, events).await?;
        if events.iter().any(|e| e.event_type == "LeadAssigned") {
            let generation = tx.generation();
            tx.execute(
                "INSERT INTO lead_board (generation, lead_id) VALUES ($1, 'refused')",
                &[generation.into()],
            )
            .await
            .map_err(Failure::unplaced)?;
        }
        Ok(())
    }
}

async fn a_row_the_database_refuses_parks_its_event(db: Arc<Fixture>) {
    history(&db).await;
    let assigned = position_of_type(&db, "LeadAssigned").await;
    let board = runner(&db, Arc::new(Refused)).with_failure_policy(FailurePolicy::Halt, 2);
    let first = board.run_once().await;
    assert!(
        matches!(&first, Err(ConsumerError::Database(error)) if error.is_refusal()),
        "{first:?}"
    );
    assert_eq!(board.run_once().await.unwrap(), Outcome::Halted);
    let parked = board.parked().await.unwrap();
    assert_eq!(
        parked.iter().map(|p| p.position).collect::<Vec<_>>(),
        [assigned],
        "the assignment is parked"
    );
    assert_eq!(board.checkpoint().await.unwrap(), assigned - 1);
    assert_eq!(board.status().await.unwrap().status, "halted");
}

/// The position of the first event of `event_type` in the log.
async fn position_of_type(db: &Fixture, event_type: &str) -> u64 {
    db.store()
        .read_all(1, 1_000, &LogFilter::all())
        .await
        .unwrap()
        .events
        .iter()
        .find(|e| e.event_type == event_type)
        .unwrap()
        .position
}

/// One event fails once, then works, and the next failure is a later event's: that
/// event has failed once, not twice, and is not parked for its predecessor's failure.
async fn attempts_are_counted_per_event(db: Arc<Fixture>) {
    history(&db).await;
    let board = runner(
        &db,
        Arc::new(Failing::first_of_each(&["SignalRecorded", "LeadAssigned"])),
    )
    .with_failure_policy(FailurePolicy::Halt, 2);
    assert!(board.run_once().await.is_err(), "the first signal fails");
    assert!(
        board.run_once().await.is_err(),
        "the signal works, the assignment fails"
    );
    assert!(
        board.parked().await.unwrap().is_empty(),
        "the assignment failed once"
    );
    let head = db.store().head().await.unwrap();
    assert_eq!(
        board.run_once().await.unwrap(),
        Outcome::Applied(usize::try_from(head).unwrap())
    );
    assert!(board.parked().await.unwrap().is_empty());
    assert_board_equals_a_rebuild(&db, "every event applied").await;
}

/// The lead board as a projector of its own (not a row model) that fails the first
/// assignment it is given; `NoRefold` and `WholeLog` wrap it, and `refolded` keeps the
/// history `WholeLog` was given to re-fold from.
#[derive(Debug)]
struct Tally {
    failed: AtomicBool,
    refolded: std::sync::Mutex<Option<Vec<u64>>>,
}

impl Tally {
    fn new() -> Self {
        Tally {
            failed: AtomicBool::new(false),
            refolded: std::sync::Mutex::new(None),
        }
    }

    async fn apply(&self, tx: &mut ReadTx, events: &[RecordedEvent]) -> Result<(), Failure> {
        for event in events {
            if event.event_type == "LeadAssigned" && !self.failed.swap(true, Ordering::SeqCst) {
                return Err(Failure {
                    position: Some(event.position),
                    error: ConsumerError::Apply {
                        position: event.position,
                        event_type: event.event_type.clone(),
                        reason: "injected failure".into(),
                    },
                });
            }
        }
        LeadBoard.apply(tx, events).await
    }
}

/// `Tally` keeping the trait's own `refold` and `rows_follow_streams`.
#[derive(Debug)]
struct NoRefold(Tally);

#[async_trait]
impl Projector for NoRefold {
    lead_board_name_filter_and_tables!();

    async fn apply(&self, tx: &mut ReadTx, events: &[RecordedEvent]) -> Result<(), Failure> {
        self.0.apply(tx, events).await
    }
}

/// `Tally` re-folding with the lead board's fold, recording the history it is given;
/// the trait's own `rows_follow_streams`.
#[derive(Debug)]
struct WholeLog(Tally);

#[async_trait]
impl Projector for WholeLog {
    lead_board_name_filter_and_tables!();

    async fn apply(&self, tx: &mut ReadTx, events: &[RecordedEvent]) -> Result<(), Failure> {
        self.0.apply(tx, events).await
    }

    async fn refold(
        &self,
        tx: &mut ReadTx,
        event: &RecordedEvent,
        history: &[RecordedEvent],
    ) -> Result<(), Failure> {
        *self.0.refolded.lock().unwrap() = Some(history.iter().map(|e| e.position).collect());
        LeadBoard.refold(tx, event, history).await
    }
}

/// A projector that says nothing of re-folding cannot apply an event behind its
/// checkpoint: the retry fails and the event stays parked, rather than the dead letter
/// going with nothing applied.
async fn a_projector_that_cannot_refold_keeps_a_retried_event_parked(db: Arc<Fixture>) {
    history(&db).await;
    let assigned = position_of_type(&db, "LeadAssigned").await;
    let board = skipping(&db, Arc::new(NoRefold(Tally::new())));
    board.catch_up().await.unwrap();
    assert_eq!(board.parked().await.unwrap().len(), 1);
    let retried = board.retry_parked_event(assigned).await;
    assert!(
        matches!(&retried, Err(ConsumerError::StillFailing { position, reason })
            if *position == assigned && reason.contains("cannot re-fold")),
        "{retried:?}"
    );
    let parked = board.parked().await.unwrap();
    assert_eq!(
        (parked.len(), parked[0].position, parked[0].attempts),
        (1, assigned, 2)
    );
}

/// A projector whose rows are not said to follow streams is given the whole log up to
/// its checkpoint to re-fold from (less the events left out), not one stream's events.
async fn a_projector_whose_rows_span_streams_refolds_from_the_whole_log(db: Arc<Fixture>) {
    history(&db).await;
    let assigned = position_of_type(&db, "LeadAssigned").await;
    let projector = Arc::new(WholeLog(Tally::new()));
    // Pages of two events: the log is read in several.
    let board = skipping(&db, projector.clone()).with_rebuild_batch_size(2);
    board.catch_up().await.unwrap();
    let head = db.store().head().await.unwrap();
    board.retry_parked_event(assigned).await.unwrap();
    let history = projector.0.refolded.lock().unwrap().take().unwrap();
    assert_eq!(
        history,
        (1..=head).collect::<Vec<_>>(),
        "every event to the checkpoint"
    );
    assert!(board.parked().await.unwrap().is_empty());
    assert_board_equals_a_rebuild(&db, "the assignment re-folded in its place").await;
}

/// A halted projection's retry: an outage first (returned as it is, no attempt counted,
/// the event still parked), then the event applied after the events before it, which
/// are not applied again, with the checkpoint (and what this runner saw applied) at it.
async fn a_halted_retry_meets_an_outage_then_applies_the_event_where_it_stands(db: Arc<Fixture>) {
    let leads = CommandHandler::<Lead>::new(db.store(), HandlerConfig::default());
    let id = Uuid::now_v7();
    leads.execute(id, capture(id, 1), &context()).await.unwrap();
    // Two signals just before it: applied twice, each would count twice.
    for kind in [SignalKind::DemoRequest, SignalKind::PricingPageView] {
        leads.execute(id, signal(kind), &context()).await.unwrap();
    }
    let assigned = leads
        .execute(id, assign_to_bob(), &context())
        .await
        .unwrap()
        .position;
    let board = runner(&db, Arc::new(Failing::first_of_type("LeadAssigned", 1)))
        .with_failure_policy(FailurePolicy::Halt, 1);
    board.catch_up().await.unwrap();
    assert_eq!(board.checkpoint().await.unwrap(), assigned - 1);
    let parked = board.parked().await.unwrap();
    let event = &db
        .store()
        .read_all(assigned, 1, &LogFilter::all())
        .await
        .unwrap()
        .events[0];
    assert_eq!(
        (parked[0].event_id.clone(), parked[0].event_type.as_str()),
        (Some(event.event_id.to_string()), "LeadAssigned"),
        "the dead letter names the event that failed"
    );

    let outage = runner(
        &db,
        Arc::new(Outage {
            left: AtomicUsize::new(1),
            at_event: false,
        }),
    );
    let met = outage.retry_parked_event(assigned).await;
    assert!(
        matches!(
            met,
            Err(ConsumerError::Database(StoreError::Unavailable(_)))
        ),
        "{met:?}"
    );
    let parked = board.parked().await.unwrap();
    assert_eq!(
        (parked.len(), parked[0].attempts),
        (1, 1),
        "an outage is no attempt"
    );

    let retrier = runner(&db, Arc::new(LeadBoard));
    retrier.retry_parked_event(assigned).await.unwrap();
    assert!(retrier.parked().await.unwrap().is_empty());
    assert_eq!(retrier.checkpoint().await.unwrap(), assigned);
    assert_eq!(retrier.applied(), assigned);
    assert_board_equals_a_rebuild(&db, "every event applied once, in order").await;
}

/// A halted projection parks an event and dies before it applies the events of its
/// batch before it (killed at that point), so the checkpoint stands well before the
/// parked event, with a skipped event between. The retry applies the events between,
/// leaving out the skipped one, reading the log a page of one event at a time.
async fn a_retry_after_a_crash_between_parking_and_halting_leaves_out_skipped_events(
    db: Arc<Fixture>,
) {
    let leads = CommandHandler::<Lead>::new(db.store(), HandlerConfig::default());
    let id = Uuid::now_v7();
    leads.execute(id, capture(id, 1), &context()).await.unwrap();
    let poison = append_poison(&db).await;
    leads
        .execute(id, signal(SignalKind::DemoRequest), &context())
        .await
        .unwrap();
    let assigned = leads
        .execute(id, assign_to_bob(), &context())
        .await
        .unwrap()
        .position;
    // The poison halts the board before it; an operator skips it.
    let board = runner(&db, Arc::new(LeadBoard)).with_failure_policy(FailurePolicy::Halt, 1);
    assert_eq!(board.run_once().await.unwrap(), Outcome::Halted);
    board.skip_parked_event(poison, "ops").await.unwrap();
    let before = board.checkpoint().await.unwrap();
    assert_eq!(before, poison - 1);

    // The next batch fails at the assignment, which is parked; the runner is killed as
    // it reads the events before it to apply them.
    let gate = Gate::at(PausePoint::BatchRead);
    gate.armed.store(false, Ordering::SeqCst);
    let failed = AtomicBool::new(false);
    let arm = gate.clone();
    let failing = Failing {
        fails_at: Box::new(move |event| {
            let fails = event.event_type == "LeadAssigned" && !failed.swap(true, Ordering::SeqCst);
            if fails {
                arm.arm();
            }
            fails
        }),
    };
    let dying = Arc::new(
        runner(&db, Arc::new(failing))
            .with_failure_policy(FailurePolicy::Halt, 1)
            .with_pause_hook(gate.hook()),
    );
    let stepping = {
        let dying = dying.clone();
        tokio::spawn(async move { dying.run_once().await })
    };
    gate.reached().await;
    stepping.abort();
    assert!(stepping.await.unwrap_err().is_cancelled());
    assert_eq!(board.parked().await.unwrap()[0].position, assigned);
    assert_eq!(
        board.checkpoint().await.unwrap(),
        before,
        "nothing after it applied"
    );

    let retrier = runner(&db, Arc::new(LeadBoard))
        .with_failure_policy(FailurePolicy::Halt, 1)
        .with_rebuild_batch_size(1);
    retrier.retry_parked_event(assigned).await.unwrap();
    assert!(retrier.parked().await.unwrap().is_empty());
    assert_eq!(retrier.checkpoint().await.unwrap(), assigned);
    assert_eq!(board.run_once().await.unwrap(), Outcome::CaughtUp);
    assert_board_equals_a_rebuild(&db, "the signal and the assignment, not the poison").await;
}

/// Two signals of one lead parked (skip policy), the lead's stream read two events a
/// page: the retry of the first re-folds the row from every page, leaving out the
/// second, which is still parked (verify, which leaves it out too, finds the board equal).
async fn a_retry_refolds_a_stream_read_in_pages_leaving_out_what_is_still_parked(db: Arc<Fixture>) {
    let leads = CommandHandler::<Lead>::new(db.store(), HandlerConfig::default());
    let id = Uuid::now_v7();
    leads.execute(id, capture(id, 1), &context()).await.unwrap();
    let mut signals = Vec::new();
    for kind in [
        SignalKind::PricingPageView,
        SignalKind::DemoRequest,
        SignalKind::PricingPageView,
        SignalKind::EmailOpen,
        SignalKind::DemoRequest,
        SignalKind::EmailOpen,
    ] {
        let outcome = leads.execute(id, signal(kind), &context()).await.unwrap();
        signals.push(outcome.position);
    }
    let (first, second) = (signals[1], signals[4]);
    let board = skipping(
        &db,
        Arc::new(Failing {
            fails_at: Box::new(move |event| event.position == first || event.position == second),
        }),
    );
    board.catch_up().await.unwrap();
    assert_eq!(board.parked().await.unwrap().len(), 2);

    let retrier = skipping(&db, Arc::new(LeadBoard)).with_rebuild_batch_size(2);
    retrier.retry_parked_event(first).await.unwrap();
    let parked = retrier.parked().await.unwrap();
    assert_eq!(
        parked.iter().map(|p| p.position).collect::<Vec<_>>(),
        [second]
    );
    let report = retrier.verify().await.unwrap();
    assert!(report.equal, "{:?}", report.differences);
}

/// The lead board behind a database that is down for good: every try of a batch is
/// reported with its time, and fails with a deadlock.
#[derive(Debug)]
struct Down {
    tries: tokio::sync::mpsc::UnboundedSender<tokio::time::Instant>,
}

#[async_trait]
impl Projector for Down {
    lead_board_name_filter_and_tables!();

    async fn apply(&self, _: &mut ReadTx, _: &[RecordedEvent]) -> Result<(), Failure> {
        let _ = self.tries.send(tokio::time::Instant::now());
        Err(Failure::unplaced(ConsumerError::Database(
            StoreError::from(sqlx::Error::Database(Box::new(Sqlstate("40P01")))),
        )))
    }
}

async fn the_running_projection_backs_off_doubling_through_an_outage(db: Arc<Fixture>) {
    history(&db).await;
    let (tries, mut tried) = tokio::sync::mpsc::unbounded_channel();
    let board = Arc::new(runner(&db, Arc::new(Down { tries })));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = {
        let board = board.clone();
        tokio::spawn(async move { board.run_until_stopped(stopped).await })
    };
    let mut at = Vec::new();
    for _ in 0..5 {
        let next = tokio::time::timeout(Duration::from_secs(20), tried.recv()).await;
        at.push(next.expect("the runner tries again").unwrap());
    }
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the runner stops when asked")
        .unwrap();
    // A sleep never ends early, so each wait is at least its backoff.
    let waits: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    for (wait, backoff) in waits.iter().zip([100, 200, 400, 800]) {
        assert!(
            *wait >= Duration::from_millis(backoff),
            "waits between tries {waits:?}, each at least [100, 200, 400, 800] ms"
        );
    }
    assert!(board.parked().await.unwrap().is_empty());
}

/// A halted board parks an assignment (its projector refuses it three times, then is
/// "fixed": it takes it). A rebuild then stops where the live runner halts, before the
/// parked event, leaving it out as the live one does: the rebuilt board is the live one's
/// rows, halted at the same position. A skip then lets the board go on without it, and a
/// verify finds the live board equal to one rebuilt from the log; on a second board, a
/// retry after the rebuild applies it once. (The rebuild applied the parked event: the
/// live runner then stopped for good before a position it had passed, and after a skip
/// its rows held the skipped event, which a verify leaves out.)
async fn a_rebuild_leaves_a_parked_event_out_as_the_live_runner_does(db: Arc<Fixture>) {
    history(&db).await;
    for resolve in ["skip", "retry"] {
        let board = runner(&db, Arc::new(Failing::first_of_type("LeadAssigned", 3)))
            .with_failure_policy(FailurePolicy::Halt, 3);
        if resolve == "retry" {
            // A second history's assignment parks on the same board, run anew.
            board.rebuild().await.unwrap();
            history(&db).await;
        }
        let mut halted = false;
        for _ in 0..20 {
            if let Ok(Outcome::Halted) = board.run_once().await {
                halted = true;
                break;
            }
        }
        assert!(halted, "{resolve}: the board halted");
        let parked = board.parked().await.unwrap();
        assert_eq!(parked.len(), 1, "{resolve}");
        let position = parked[0].position;
        assert_eq!(board.checkpoint().await.unwrap(), position - 1);
        let halted_rows = db.text_rows(BOARD).await;

        board.rebuild().await.unwrap();
        assert_eq!(
            db.text_rows(BOARD).await,
            halted_rows,
            "{resolve}: the rebuilt board is the halted one"
        );
        assert_eq!(board.checkpoint().await.unwrap(), position - 1, "{resolve}");
        assert_eq!(
            board.run_once().await.unwrap(),
            Outcome::Halted,
            "{resolve}"
        );

        match resolve {
            "skip" => {
                board.skip_parked_event(position, "olga").await.unwrap();
            }
            _ => board.retry_parked_event(position).await.unwrap(),
        }
        board.catch_up().await.unwrap();
        assert_eq!(
            board.checkpoint().await.unwrap(),
            db.store().head().await.unwrap(),
            "{resolve}: it goes on"
        );
        let report = board.verify().await.unwrap();
        assert!(report.equal, "{resolve}: {:?}", report.differences);
        let owners: Vec<Option<String>> = db
            .text_rows(BOARD)
            .await
            .into_iter()
            .map(|row| row[7].clone())
            .collect();
        let bobs = owners
            .iter()
            .filter(|o| o.as_deref() == Some("bob"))
            .count();
        let expected = if resolve == "skip" { 0 } else { 1 };
        assert_eq!(
            bobs, expected,
            "{resolve}: the assignment applied {expected} times"
        );
    }
}
