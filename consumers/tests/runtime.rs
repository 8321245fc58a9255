//! The projector runtime on both backends: exactly once across failures and restarts,
//! a rebuild from position 0 equal to the live rows, read-your-writes, racing runners.

// A test that cannot go on should stop loudly; `unwrap` says so shortest.
#![allow(clippy::unwrap_used)]

#[macro_use]
#[path = "../../tests/support/database.rs"]
mod database;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use annals_commands::{CommandContext, CommandHandler, HandlerConfig};
use annals_consumers::processes::lead_conversion::LeadConversion;
use annals_consumers::read_models::lead_board::LeadBoard;
use annals_domain::lead::{ConversionAccount, ConversionDeal, Lead, LeadCommand};
use annals_domain::values::*;
use annals_engine::{
    Consumer, ConsumerError, ConsumerRunner, DifferenceKind, Failure, FailurePolicy, Outcome,
    PauseHook, PausePoint, Projector, ReadDatabase, ReadTx,
};
use annals_store::{LogFilter, RecordedEvent, StoreError};
use async_trait::async_trait;
use database::{Backend, Fixture, run};
use tokio::sync::Notify;
use uuid::Uuid;

/// The lead board's name, filter and tables, in the `Projector` impl of a test
/// projector that stands in for it.
macro_rules! lead_board_name_filter_and_tables {
    () => {
        fn name(&self) -> &'static str {
            "lead_board"
        }

        fn filter(&self) -> LogFilter {
            LeadBoard.filter()
        }

        fn tables(&self) -> &'static [annals_engine::Table] {
            LeadBoard.tables()
        }
    };
}

#[path = "runtime/intercepting.rs"]
mod intercepting;
#[path = "runtime/leases.rs"]
mod leases;
#[path = "runtime/parked.rs"]
mod parked;
#[path = "runtime/processes.rs"]
mod processes;
#[path = "runtime/routing.rs"]
mod routing;
#[path = "runtime/sagas.rs"]
mod sagas;
#[path = "runtime/timers.rs"]
mod timers;

on_both_backends!(
    the_funnel_pipeline_and_account_view_follow_a_revenue_history,
    a_rebuild_of_every_read_model_leaves_the_conversion_process_where_it_was,
    a_poisoned_event_is_parked_and_halts_its_projection,
    a_skipping_projection_parks_a_failing_event_goes_on_and_retries_it,
    verify_finds_the_live_board_equal_and_catches_an_edited_row,
    a_rebuild_claim_left_by_a_dead_process_is_taken_over_once_stale,
    readers_see_the_old_board_until_the_rebuilt_one_is_swapped_in,
    lead_board_shows_every_lead_as_its_events_left_it,
    a_failed_batch_is_rolled_back_and_applied_once_later,
    a_runner_dropped_mid_way_is_continued_by_a_new_one_without_duplicates,
    wait_for_returns_once_applied_and_times_out_cleanly,
    the_status_says_catching_up_while_more_than_a_batch_is_left,
    two_runners_on_one_projection_never_double_apply,
    a_straggler_whose_batch_another_runner_applied_rolls_it_back,
    a_verify_that_read_the_live_generation_before_a_rebuild_swapped_leaves_the_live_rows,
    a_claim_taken_over_gets_a_new_generation_and_its_old_holder_drops_nothing,
    wait_for_answers_only_from_the_generation_that_is_live,
    commands_and_the_live_runner_go_on_while_verify_compares,
    verify_reads_a_large_board_in_bounded_pages,
    verify_names_each_difference_by_key_kind_and_column,
    a_rebuild_drops_the_generation_it_replaced,
    a_rebuild_renews_its_claim_after_every_batch,
    a_long_comparison_renews_its_claim,
    a_verify_whose_live_board_moved_on_after_its_fill_catches_up_and_compares,
    two_processes_creating_one_read_models_tables_at_once_both_succeed,
    a_read_model_whose_table_lacks_a_declared_column_is_refused_at_registration,
    a_read_model_whose_table_was_dropped_is_made_again_from_position_0,
    registering_a_read_model_that_is_all_made_waits_for_no_writer,
);

fn read_database(db: &Fixture) -> ReadDatabase {
    match db {
        Fixture::Sqlite { store, .. } => ReadDatabase::new(Arc::new(store.clone())),
        Fixture::Postgres { store, .. } => ReadDatabase::new(Arc::new(store.clone())),
    }
}

fn runner(db: &Fixture, projector: Arc<dyn Projector>) -> ConsumerRunner {
    ConsumerRunner::new(
        db.store(),
        read_database(db),
        Consumer::ReadModel(projector),
    )
}

/// The lead conversion process's runner, with handlers of its own.
fn conversion(db: &Fixture) -> ConsumerRunner {
    let handlers = annals_commands::Handlers::new(db.store(), HandlerConfig::default());
    ConsumerRunner::new(
        db.store(),
        read_database(db),
        Consumer::Process(Arc::new(LeadConversion::new(&handlers))),
    )
}

/// The live lead board, as a reader sees it.
const BOARD: &str = "SELECT lead_id, email, name, company, source, status, \
                            CAST(score AS TEXT), owner, captured_at, qualified_at, \
                            converted_deal_id, CAST(updated_position AS TEXT) \
                       FROM lead_board \
                      WHERE generation = (SELECT live_generation FROM projections \
                                           WHERE name = 'lead_board') \
                      ORDER BY lead_id";

fn context() -> CommandContext {
    CommandContext {
        actor: "test".into(),
        ..CommandContext::default()
    }
}

fn capture(id: Uuid, n: usize) -> LeadCommand {
    LeadCommand::Capture {
        lead_id: id,
        email: Email::parse(&format!("{}@example.com", id.simple())).unwrap(),
        name: PersonName::parse("Ada").unwrap(),
        company: n.is_multiple_of(2).then(|| Label::parse("Acme").unwrap()),
        source: Source::ALL[n % Source::ALL.len()],
    }
}

/// An assignment of the lead to bob.
fn assign_to_bob() -> LeadCommand {
    LeadCommand::Assign {
        owner: Owner::parse("bob").unwrap(),
    }
}

fn signal(kind: SignalKind) -> LeadCommand {
    LeadCommand::RecordSignal {
        kind,
        occurred_at: None,
    }
}

/// A small history: three leads, signals, an owner, a qualification, a disqualification.
async fn history(db: &Fixture) -> Vec<Uuid> {
    let leads = CommandHandler::<Lead>::new(db.store(), HandlerConfig::default());
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    for (n, id) in ids.iter().enumerate() {
        leads
            .execute(*id, capture(*id, n), &context())
            .await
            .unwrap();
    }
    for _ in 0..2 {
        leads
            .execute(ids[0], signal(SignalKind::DemoRequest), &context())
            .await
            .unwrap();
    }
    leads
        .execute(ids[1], signal(SignalKind::PricingPageView), &context())
        .await
        .unwrap();
    leads
        .execute(ids[1], assign_to_bob(), &context())
        .await
        .unwrap();
    leads
        .execute(
            ids[2],
            LeadCommand::Disqualify {
                reason: Reason::parse("spam").unwrap(),
            },
            &context(),
        )
        .await
        .unwrap();
    ids
}

async fn lead_board_shows_every_lead_as_its_events_left_it(db: Arc<Fixture>) {
    let ids = history(&db).await;
    let board = runner(&db, Arc::new(LeadBoard));
    assert_eq!(board.catch_up().await.unwrap(), 9);
    assert_eq!(
        board.checkpoint().await.unwrap(),
        db.store().head().await.unwrap()
    );
    let rows = db.text_rows(BOARD).await;
    assert_eq!(rows.len(), 3);
    let row = |id: Uuid| {
        rows.iter()
            .find(|r| r[0].as_deref() == Some(&id.to_string()))
            .unwrap()
    };
    let first = row(ids[0]);
    assert_eq!(first[5].as_deref(), Some("qualified"));
    assert_eq!(first[6].as_deref(), Some("50"));
    assert!(first[9].is_some(), "qualified_at");
    assert_eq!(first[3].as_deref(), Some("Acme"));
    let second = row(ids[1]);
    assert_eq!(
        (
            second[5].as_deref(),
            second[6].as_deref(),
            second[7].as_deref()
        ),
        (Some("working"), Some("10"), Some("bob"))
    );
    assert_eq!(second[3], None, "no company");
    assert_eq!(row(ids[2])[5].as_deref(), Some("disqualified"));
    // Events of other categories are skipped, and the checkpoint still moves past them.
    db.store()
        .append(annals_store::AppendRequest::new(
            annals_store::StreamName::parse("deal-x").unwrap(),
            annals_store::ExpectedVersion::Any,
            vec![annals_store::NewEvent::new(
                "DealWon",
                serde_json::json!({}),
            )],
        ))
        .await
        .unwrap();
    assert_eq!(board.run_once().await.unwrap(), Outcome::Applied(0));
    assert_eq!(board.checkpoint().await.unwrap(), 10);
    assert_eq!(board.run_once().await.unwrap(), Outcome::CaughtUp);
    assert_eq!(db.text_rows(BOARD).await, rows);
}

/// The lead board, failing at the events `fails_at` picks (it sees every event the
/// board is given, in order).
struct Failing {
    fails_at: Box<dyn Fn(&RecordedEvent) -> bool + Send + Sync>,
}

impl std::fmt::Debug for Failing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Failing")
    }
}

impl Failing {
    /// Fails once, at the n-th event given.
    fn at_nth(n: usize) -> Self {
        let seen = AtomicUsize::new(0);
        Failing {
            fails_at: Box::new(move |_| seen.fetch_add(1, Ordering::SeqCst) + 1 == n),
        }
    }

    /// Fails the first event it is given of each of `event_types`, then works.
    fn first_of_each(event_types: &'static [&'static str]) -> Self {
        let failed: Vec<AtomicBool> = event_types.iter().map(|_| AtomicBool::new(false)).collect();
        Failing {
            fails_at: Box::new(move |event| {
                event_types
                    .iter()
                    .zip(&failed)
                    .any(|(t, f)| event.event_type == *t && !f.swap(true, Ordering::SeqCst))
            }),
        }
    }

    /// Fails the first `times` events of one type it is given, then works.
    fn first_of_type(event_type: &'static str, times: usize) -> Self {
        let left = AtomicUsize::new(times);
        Failing {
            fails_at: Box::new(move |event| {
                event.event_type == event_type
                    && left
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
            }),
        }
    }
}

#[async_trait]
impl Projector for Failing {
    lead_board_name_filter_and_tables!();

    async fn apply(&self, tx: &mut ReadTx, events: &[RecordedEvent]) -> Result<(), Failure> {
        for event in events {
            if (self.fails_at)(event) {
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

    fn rows_follow_streams(&self) -> bool {
        LeadBoard.rows_follow_streams()
    }

    async fn refold(
        &self,
        tx: &mut ReadTx,
        event: &RecordedEvent,
        history: &[RecordedEvent],
    ) -> Result<(), Failure> {
        LeadBoard.refold(tx, event, history).await
    }
}

async fn a_failed_batch_is_rolled_back_and_applied_once_later(db: Arc<Fixture>) {
    history(&db).await;
    let flaky = runner(&db, Arc::new(Failing::at_nth(6))).with_batch_size(4);
    assert_eq!(flaky.run_once().await.unwrap(), Outcome::Applied(4));
    // The second batch fails at its second event: none of it stays.
    assert!(matches!(
        flaky.run_once().await,
        Err(ConsumerError::Apply { .. })
    ));
    assert_eq!(flaky.checkpoint().await.unwrap(), 4);
    let scores = db
        .text_rows("SELECT CAST(SUM(score) AS TEXT) FROM lead_board")
        .await;
    assert_eq!(
        scores[0][0].as_deref(),
        Some("25"),
        "only the first batch is applied"
    );
    flaky.catch_up().await.unwrap();

    // The same rows as a projection that never failed.
    let rows = db.text_rows(BOARD).await;
    rebuild_in_place(&db).await;
    assert_eq!(db.text_rows(BOARD).await, rows);
}

/// Rebuilds the lead board from position 0 (a new generation, then the swap).
async fn rebuild_in_place(db: &Fixture) {
    runner(db, Arc::new(LeadBoard)).rebuild().await.unwrap();
}

async fn a_runner_dropped_mid_way_is_continued_by_a_new_one_without_duplicates(db: Arc<Fixture>) {
    history(&db).await;
    {
        let first = runner(&db, Arc::new(LeadBoard)).with_batch_size(3);
        first.run_once().await.unwrap();
        first.run_once().await.unwrap();
        // Dropped here, as a crashed process would be, between two batches.
    }
    let second = runner(&db, Arc::new(LeadBoard)).with_batch_size(3);
    assert_eq!(second.checkpoint().await.unwrap(), 6);
    second.catch_up().await.unwrap();
    let rows = db.text_rows(BOARD).await;
    rebuild_in_place(&db).await;
    assert_eq!(
        db.text_rows(BOARD).await,
        rows,
        "nothing lost, nothing applied twice"
    );
}

async fn wait_for_returns_once_applied_and_times_out_cleanly(db: Arc<Fixture>) {
    let board = Arc::new(runner(&db, Arc::new(LeadBoard)));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = {
        let board = board.clone();
        tokio::spawn(async move { board.run_until_stopped(stopped).await })
    };
    let leads = CommandHandler::<Lead>::new(db.store(), HandlerConfig::default());
    let id = Uuid::now_v7();
    let outcome = leads.execute(id, capture(id, 1), &context()).await.unwrap();
    assert!(
        board
            .wait_for(outcome.position, Duration::from_secs(20))
            .await,
        "the running projection applies a new event"
    );
    let rows = db.text_rows(BOARD).await;
    assert_eq!(rows.len(), 1, "what wait_for promised is in the read model");
    assert_eq!(
        board.applied(),
        outcome.position,
        "applied says how far the live board is"
    );
    assert!(
        !board
            .wait_for(outcome.position + 100, Duration::from_millis(200))
            .await,
        "a position not in the log times out"
    );
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the runner stops when asked")
        .unwrap();
}

/// Status, read before each batch of three: "catching_up" while more than a batch is
/// left to apply, then "running".
async fn the_status_says_catching_up_while_more_than_a_batch_is_left(db: Arc<Fixture>) {
    history(&db).await;
    assert_eq!(db.store().head().await.unwrap(), 9);
    let board = runner(&db, Arc::new(LeadBoard)).with_batch_size(3);
    let mut seen = Vec::new();
    loop {
        let status = board.status().await.unwrap();
        seen.push((status.lag, status.status));
        if board.run_once().await.unwrap() == Outcome::CaughtUp {
            break;
        }
    }
    assert_eq!(
        seen,
        [
            (9, "catching_up"),
            (6, "catching_up"),
            (3, "running"),
            (0, "running")
        ]
    );
}

async fn two_runners_on_one_projection_never_double_apply(db: Arc<Fixture>) {
    history(&db).await;
    let a = Arc::new(runner(&db, Arc::new(LeadBoard)).with_batch_size(2));
    let b = Arc::new(runner(&db, Arc::new(LeadBoard)).with_batch_size(2));
    // How many events each runner's committed batches applied.
    let step = |r: Arc<ConsumerRunner>| async move {
        let mut applied = 0;
        for _ in 0..20 {
            match r.run_once().await {
                Ok(Outcome::Applied(n)) => applied += n,
                Ok(_) => {}
                Err(ConsumerError::CheckpointMoved(_)) => {}
                // SQLite: the other runner held the write lock past the busy timeout.
                Err(ConsumerError::Database(StoreError::Unavailable(_))) => {}
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        applied
    };
    let (ra, rb) = tokio::join!(tokio::spawn(step(a.clone())), tokio::spawn(step(b)));
    // Whatever the two left undone (a run of lost races), one of them finishes alone.
    let rest = a.catch_up().await.unwrap();
    assert_eq!(
        ra.unwrap() + rb.unwrap() + rest,
        9,
        "each of the 9 events applied by exactly one committed batch"
    );
    let rows = db.text_rows(BOARD).await;
    rebuild_in_place(&db).await;
    assert_eq!(db.text_rows(BOARD).await, rows, "no event applied twice");
}

/// A runner reads its batch and stops before the transaction that applies it; another
/// runner applies that batch meanwhile; the first goes on, a straggler: its whole batch
/// rolls back, every time.
async fn a_straggler_whose_batch_another_runner_applied_rolls_it_back(db: Arc<Fixture>) {
    history(&db).await;
    let board = runner(&db, Arc::new(LeadBoard)).with_batch_size(4);
    // A checkpoint row exists (4): the straggler's batch would move it, not insert it.
    assert_eq!(board.run_once().await.unwrap(), Outcome::Applied(4));
    let gate = Gate::at(PausePoint::BatchRead);
    let straggler = Arc::new(
        runner(&db, Arc::new(LeadBoard))
            .with_batch_size(4)
            .with_pause_hook(gate.hook()),
    );
    let stepping = {
        let straggler = straggler.clone();
        tokio::spawn(async move { straggler.run_once().await })
    };
    gate.reached().await;
    // The straggler holds events 5 to 8, read after checkpoint 4: the other runner
    // applies them (and the rest) first.
    assert_eq!(board.catch_up().await.unwrap(), 5);
    let rows = db.text_rows(BOARD).await;
    gate.resume();
    let late = stepping.await.unwrap();
    assert!(
        matches!(late, Err(ConsumerError::CheckpointMoved(_))),
        "the straggler's batch: {late:?}"
    );
    assert_eq!(board.checkpoint().await.unwrap(), 9);
    assert_eq!(
        straggler.applied(),
        0,
        "the straggler never saw its batch commit"
    );
    assert_eq!(
        db.text_rows(BOARD).await,
        rows,
        "the straggler wrote nothing"
    );
    rebuild_in_place(&db).await;
    assert_eq!(db.text_rows(BOARD).await, rows, "every event applied once");
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    fn commands() -> impl Strategy<Value = Vec<(usize, u8, usize)>> {
        // (lead index, command kind, parameter)
        proptest::collection::vec((0usize..4, 0u8..6, 0usize..7), 1..40)
    }

    async fn live_equals_rebuild(db: Arc<Fixture>, plan: Vec<(usize, u8, usize)>) {
        let leads = CommandHandler::<Lead>::new(db.store(), HandlerConfig::default());
        let live = runner(&db, Arc::new(LeadBoard)).with_batch_size(3);
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
        for (lead, kind, n) in plan {
            let id = ids[lead];
            let command = match kind {
                0 => capture(id, lead),
                1 | 2 => signal(SignalKind::ALL[n % SignalKind::ALL.len()]),
                3 => LeadCommand::Assign {
                    owner: Owner::parse(["ann", "bob", "cy"][n % 3]).unwrap(),
                },
                4 => LeadCommand::Disqualify {
                    reason: Reason::parse("r").unwrap(),
                },
                _ => LeadCommand::Convert {
                    deal_name: Name::parse("d").unwrap(),
                    amount: Money::parse("EUR", 1).unwrap(),
                    account: ConversionAccount::New(Uuid::now_v7()),
                    deal: ConversionDeal::New(Uuid::now_v7()),
                },
            };
            // Refusals are part of the game; only accepted commands reach the log.
            let _ = leads.execute(id, command, &context()).await;
            if n % 2 == 0 {
                live.run_once().await.unwrap();
            }
        }
        live.catch_up().await.unwrap();
        let rows = db.text_rows(BOARD).await;
        rebuild_in_place(&db).await;
        assert_eq!(db.text_rows(BOARD).await, rows);
    }

    fn check(backend: Backend, plan: Vec<(usize, u8, usize)>) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run(backend, move |db| live_equals_rebuild(db, plan)));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

        #[test]
        fn sqlite_live_read_model_equals_a_rebuild_from_zero(plan in commands()) {
            check(Backend::Sqlite, plan);
        }

        #[test]
        fn postgres_live_read_model_equals_a_rebuild_from_zero(plan in commands()) {
            check(Backend::Postgres, plan);
        }
    }
}

async fn verify_finds_the_live_board_equal_and_catches_an_edited_row(db: Arc<Fixture>) {
    history(&db).await;
    let board = runner(&db, Arc::new(LeadBoard)).with_batch_size(4);
    board.catch_up().await.unwrap();
    let report = board.verify().await.unwrap();
    assert!(report.equal, "{report:?}");
    assert_eq!(report.position, 9);
    let status = board.status().await.unwrap();
    assert_eq!(
        (status.checkpoint, status.head, status.lag, status.status),
        (9, 9, 0, "running")
    );

    // New events the live runner has not applied yet: verify compares at one position.
    history(&db).await;
    let report = board.verify().await.unwrap();
    assert!(report.equal, "{report:?}");
    assert_eq!(report.position, 18);

    db.execute(
        "UPDATE lead_board SET score = 999 WHERE status = 'qualified' \
            AND generation = (SELECT live_generation FROM projections WHERE name = 'lead_board')",
    )
    .await;
    let report = board.verify().await.unwrap();
    assert!(!report.equal);
    assert_eq!(report.differences.len(), 2, "{report:?}");
    let first = &report.differences[0];
    assert_eq!(first.table, "lead_board");
    assert_eq!(
        (
            first.kind,
            first.column.as_deref(),
            first.live.as_deref(),
            first.rebuilt.as_deref()
        ),
        (
            DifferenceKind::Changed,
            Some("score"),
            Some("999"),
            Some("50")
        )
    );
    // Verify changes nothing: the live board keeps its (edited) rows and no scratch rows
    // are left behind.
    let generations = db
        .text_rows("SELECT DISTINCT CAST(generation AS TEXT) FROM lead_board")
        .await;
    assert_eq!(generations.len(), 1);
    // A rebuild repairs it.
    board.rebuild().await.unwrap();
    assert!(board.verify().await.unwrap().equal);
}

async fn a_rebuild_claim_left_by_a_dead_process_is_taken_over_once_stale(db: Arc<Fixture>) {
    history(&db).await;
    let board = runner(&db, Arc::new(LeadBoard));
    board.catch_up().await.unwrap();
    let claim = |seconds_ago: i64| {
        let seen = chrono::Utc::now().timestamp_micros() - seconds_ago * 1_000_000;
        format!(
            "UPDATE projections SET rebuilding = 99, rebuild_seen_micros = {seen} \
              WHERE name = 'lead_board'"
        )
    };
    // A claim renewed a moment ago belongs to a rebuild that is running.
    db.execute(&claim(1)).await;
    assert_eq!(board.status().await.unwrap().status, "rebuilding");
    assert!(matches!(board.verify().await, Err(ConsumerError::Busy(_))));
    // One not renewed for a minute was left by a process that died mid-way.
    db.execute(&claim(60)).await;
    assert_eq!(board.status().await.unwrap().status, "running");
    assert!(board.verify().await.unwrap().equal);
    board.rebuild().await.unwrap();
    assert!(board.verify().await.unwrap().equal);
    let rebuilding = db
        .text_rows("SELECT CAST(rebuilding AS TEXT) FROM projections WHERE name = 'lead_board'")
        .await;
    assert_eq!(rebuilding, vec![vec![None]]);
}

/// A rebuild in batches of 4 over 45 events, paused after each batch it commits: at every
/// pause its generation beside the live one is half-built, and the production queries
/// still answer from the old live board, wholly. After the swap they answer the same
/// from the new one.
async fn readers_see_the_old_board_until_the_rebuilt_one_is_swapped_in(db: Arc<Fixture>) {
    use annals_consumers::queries::{self, LeadFilter, Snapshot};
    for _ in 0..5 {
        history(&db).await;
    }
    let head = db.store().head().await.unwrap();
    assert_eq!(head, 45);
    let board = Arc::new(runner(&db, Arc::new(LeadBoard)));
    board.catch_up().await.unwrap();
    let old_generation = board.live_generation().await.unwrap();
    let read = read_database(&db);
    // What a reader asks: every lead, one lead, the funnel, and the position answered at.
    let answers = || async {
        let mut snapshot = Snapshot::begin(&read).await.unwrap();
        let position = snapshot.position(&["lead_board"]).await.unwrap();
        let leads = snapshot
            .leads(&LeadFilter::default(), 500, None)
            .await
            .unwrap();
        let funnel = snapshot.funnel(None, None, None).await.unwrap();
        snapshot.finish().await.unwrap();
        let one = queries::lead(&read, &leads.items[0].lead_id).await.unwrap();
        (position, leads, funnel, one)
    };
    let before = answers().await;
    assert_eq!((before.0, before.1.items.len()), (head, 15));
    assert_eq!(before.2.overall.captured, 15);

    let gate = Gate::at(PausePoint::FillBatch);
    let rebuilder = Arc::new(
        runner(&db, Arc::new(LeadBoard))
            .with_rebuild_batch_size(4)
            .with_pause_hook(gate.hook()),
    );
    let mut rebuilding = {
        let rebuilder = rebuilder.clone();
        tokio::spawn(async move { rebuilder.rebuild().await })
    };
    // The rebuild's generation: how far it has applied the log, and its rows.
    const REBUILT: &str = "SELECT CAST(c.position AS TEXT), \
                                  (SELECT CAST(COUNT(*) AS TEXT) FROM lead_board l \
                                    WHERE l.generation = p.rebuilding) \
                             FROM projections p JOIN projection_checkpoints c \
                               ON c.name = p.name AND c.generation = p.rebuilding \
                            WHERE p.name = 'lead_board'";
    let (mut reads, mut half_built) = (0, 0);
    let finished = loop {
        tokio::select! {
            () = gate.reached() => {}
            finished = &mut rebuilding => break finished.unwrap(),
        }
        // Paused between two batches: nothing moves until it is resumed.
        let rebuilt = db.text_rows(REBUILT).await;
        let reached: u64 = rebuilt[0][0].as_deref().unwrap().parse().unwrap();
        let rows: usize = rebuilt[0][1].as_deref().unwrap().parse().unwrap();
        assert!(
            reached > 0 && rows > 0,
            "a batch was committed: {rebuilt:?}"
        );
        assert_eq!(
            answers().await,
            before,
            "a reader saw a half-built board (the rebuild at position {reached}, {rows} rows)"
        );
        reads += 1;
        if reached < head {
            half_built += 1;
        }
        gate.arm();
        gate.resume();
    };
    finished.unwrap();
    // 45 events in batches of 4: a pause after each of 12 batches, 11 of them before
    // the rebuild had the whole log.
    assert_eq!((reads, half_built), (12, 11));
    assert_ne!(board.live_generation().await.unwrap(), old_generation);
    assert_eq!(
        answers().await,
        before,
        "the swapped-in board answers alike"
    );
    // The live runner goes on in the new generation, exactly once.
    history(&db).await;
    board.catch_up().await.unwrap();
    assert_eq!(db.text_rows(BOARD).await.len(), 18);
    assert!(board.verify().await.unwrap().equal);
}

/// Appends, behind the command layer's back, a lead event no projector can read.
async fn append_poison(db: &Fixture) -> u64 {
    let outcome = db
        .store()
        .append(annals_store::AppendRequest::new(
            annals_store::StreamName::parse("lead-poison").unwrap(),
            annals_store::ExpectedVersion::Any,
            vec![
                annals_store::NewEvent::new("LeadCaptured", serde_json::json!({"not": "a lead"}))
                    .with_schema_version(2),
            ],
        ))
        .await
        .unwrap();
    outcome.last_position()
}

/// Whether `time` (as dead letters record it) is a time between `from` and now.
fn recorded_since(time: Option<&str>, from: chrono::DateTime<chrono::Utc>) -> bool {
    let Some(Ok(time)) = time.map(chrono::DateTime::parse_from_rfc3339) else {
        return false;
    };
    from <= time && time <= chrono::Utc::now()
}

async fn a_poisoned_event_is_parked_and_halts_its_projection(db: Arc<Fixture>) {
    let started = chrono::Utc::now();
    history(&db).await;
    let poison = append_poison(&db).await;
    history(&db).await;
    let board = runner(&db, Arc::new(LeadBoard))
        .with_batch_size(4)
        .with_failure_policy(FailurePolicy::Halt, 3);
    // Two batches apply; the third holds the poison and fails, three times in all.
    board.run_once().await.unwrap();
    board.run_once().await.unwrap();
    assert!(matches!(
        board.run_once().await,
        Err(ConsumerError::Apply { .. })
    ));
    assert!(board.run_once().await.is_err());
    assert_eq!(board.run_once().await.unwrap(), Outcome::Halted);
    assert_eq!(board.run_once().await.unwrap(), Outcome::Halted);
    let parked = board.parked().await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(
        (parked[0].position, parked[0].event_type.as_str()),
        (poison, "LeadCaptured")
    );
    assert_eq!(parked[0].attempts, 3);
    assert!(
        recorded_since(parked[0].parked_at.as_deref(), started),
        "parked at {:?}",
        parked[0].parked_at
    );
    assert_eq!(
        board.checkpoint().await.unwrap(),
        poison - 1,
        "it applied every event before the poison, and stopped there"
    );
    let status = board.status().await.unwrap();
    assert_eq!(status.status, "halted");
    assert!(
        status
            .last_error
            .unwrap()
            .contains(&format!("position {poison}"))
    );

    // The rest of the system keeps serving: commands append, other readers read.
    let leads = CommandHandler::<Lead>::new(db.store(), HandlerConfig::default());
    let id = Uuid::now_v7();
    leads.execute(id, capture(id, 7), &context()).await.unwrap();
    assert_eq!(db.text_rows(BOARD).await.len(), 3);

    // An operator's retry: the event is still poisoned, so it stays parked, with the
    // new error, and the projection stays halted.
    assert!(matches!(
        board.retry_parked_event(poison).await,
        Err(ConsumerError::StillFailing { position, .. }) if position == poison
    ));
    let parked = board.parked().await.unwrap();
    assert_eq!((parked.len(), parked[0].attempts), (1, 4));
    assert_eq!(board.run_once().await.unwrap(), Outcome::Halted);
    assert_eq!(board.checkpoint().await.unwrap(), poison - 1);

    // Skipped, it is no longer parked (its record stays) and the projection goes on.
    let skipped = board.skip_parked_event(poison, "ops").await.unwrap();
    assert_eq!(skipped.skipped_by.as_deref(), Some("ops"));
    assert!(recorded_since(skipped.skipped_at.as_deref(), started));
    assert!(skipped.parked_at <= skipped.skipped_at);
    assert!(board.parked().await.unwrap().is_empty());
    assert!(matches!(
        board.skip_parked_event(poison, "ops").await,
        Err(ConsumerError::NotParked { .. })
    ));
    board.catch_up().await.unwrap();
    assert_eq!(board.status().await.unwrap().status, "running");
    assert_eq!(
        board.checkpoint().await.unwrap(),
        db.store().head().await.unwrap()
    );
    assert_eq!(db.text_rows(BOARD).await.len(), 7, "every readable lead");
}

async fn a_skipping_projection_parks_a_failing_event_goes_on_and_retries_it(db: Arc<Fixture>) {
    history(&db).await;
    let poison = append_poison(&db).await;
    history(&db).await;
    let board = runner(&db, Arc::new(Failing::first_of_type("LeadAssigned", 1)))
        .with_failure_policy(FailurePolicy::Skip, 1);
    board.catch_up().await.unwrap();
    let parked: Vec<u64> = board
        .parked()
        .await
        .unwrap()
        .iter()
        .map(|p| p.position)
        .collect();
    assert_eq!(
        parked.len(),
        2,
        "the poison and the first assignment: {parked:?}"
    );
    assert!(parked.contains(&poison));
    assert_eq!(
        board.checkpoint().await.unwrap(),
        db.store().head().await.unwrap()
    );
    assert_eq!(board.status().await.unwrap().status, "running");
    let rows = db.text_rows(BOARD).await;
    assert_eq!(rows.len(), 6, "every readable lead is there");
    assert_eq!(
        rows.iter().filter(|r| r[7].is_some()).count(),
        1,
        "one owner missing"
    );

    // The retry applies the assignment, which works now; the poison stays parked.
    assert_eq!(board.retry_parked().await.unwrap(), 1);
    let parked = board.parked().await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].position, poison);
    assert_eq!(
        db.text_rows(BOARD)
            .await
            .iter()
            .filter(|r| r[7].is_some())
            .count(),
        2
    );
    // Verify skips the parked poison too, and finds the board equal to a rebuild.
    assert!(board.verify().await.unwrap().equal);
}

/// Leads from two sources; three qualified, two of them converted (one into a new
/// account, one into the same account); one deal won, one lost; a deal opened directly
/// and advanced. The account, the leads and the converted leads' deals.
async fn revenue_history(db: &Fixture) -> (Uuid, Vec<Uuid>, Vec<Uuid>) {
    use annals_domain::account::{Account, AccountCommand};
    use annals_domain::deal::{Deal, DealCommand};
    let leads = CommandHandler::<Lead>::new(db.store(), HandlerConfig::default());
    let deals = CommandHandler::<Deal>::new(db.store(), HandlerConfig::default());
    let accounts = CommandHandler::<Account>::new(db.store(), HandlerConfig::default());
    let ids: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    let account = Uuid::now_v7();
    let mut deal_ids = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        let source = if n < 3 { Source::Web } else { Source::Partner };
        let command = LeadCommand::Capture {
            lead_id: *id,
            email: Email::parse(&format!("{}@example.com", id.simple())).unwrap(),
            name: PersonName::parse("Ada").unwrap(),
            company: Some(Label::parse("Acme").unwrap()),
            source,
        };
        leads.execute(*id, command, &context()).await.unwrap();
        if n < 3 {
            for _ in 0..2 {
                leads
                    .execute(*id, signal(SignalKind::DemoRequest), &context())
                    .await
                    .unwrap();
            }
        }
        if n < 2 {
            let deal = Uuid::now_v7();
            deal_ids.push(deal);
            let convert = LeadCommand::Convert {
                deal_name: Name::parse("Engines").unwrap(),
                amount: Money::parse("EUR", 1_000 * (n as i64 + 1)).unwrap(),
                account: if n == 0 {
                    ConversionAccount::New(account)
                } else {
                    ConversionAccount::Existing(account)
                },
                deal: ConversionDeal::New(deal),
            };
            leads.execute(*id, convert, &context()).await.unwrap();
            conversion(db).catch_up().await.unwrap();
        }
    }
    deals
        .execute(deal_ids[0], DealCommand::Win, &context())
        .await
        .unwrap();
    deals
        .execute(
            deal_ids[1],
            DealCommand::Lose {
                reason: Reason::parse("price").unwrap(),
            },
            &context(),
        )
        .await
        .unwrap();
    // A deal opened directly, for another account, with an owner.
    let other = Uuid::now_v7();
    accounts
        .execute(
            other,
            AccountCommand::Open {
                account_id: other,
                name: Name::parse("Initech").unwrap(),
                domain: None,
                industry: None,
                employees: Some(12),
                tier: Tier::Key,
            },
            &context(),
        )
        .await
        .unwrap();
    let direct = Uuid::now_v7();
    deals
        .execute(
            direct,
            DealCommand::Open {
                deal_id: direct,
                account_id: other,
                account_exists: true,
                name: Name::parse("Staplers").unwrap(),
                amount: Money::parse("USD", 500).unwrap(),
                owner: Some(Owner::parse("bob").unwrap()),
                expected_close: None,
            },
            &context(),
        )
        .await
        .unwrap();
    deals
        .execute(
            direct,
            DealCommand::Advance { stage: Stage::Demo },
            &context(),
        )
        .await
        .unwrap();
    (account, ids, deal_ids)
}

/// The log read through a clock the test sets: every event reads as recorded at midnight
/// UTC, `position` days after 2026-01-01, so every time a read model keeps is known.
#[derive(Debug)]
struct DayPerPosition(Arc<dyn annals_store::EventStore>);

fn day(position: u64) -> chrono::DateTime<chrono::Utc> {
    let start = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap();
    start.to_utc() + chrono::Duration::days(i64::try_from(position).unwrap())
}

/// `day(position)` as the read models and the funnel's bounds write times.
fn day_text(position: u64) -> String {
    day(position).to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

impl DayPerPosition {
    fn clocked(mut event: RecordedEvent) -> RecordedEvent {
        event.recorded_at = day(event.position);
        event
    }
}

#[async_trait]
impl annals_store::StoreLayer for DayPerPosition {
    fn inner(&self) -> &dyn annals_store::EventStore {
        self.0.as_ref()
    }

    async fn read_stream(
        &self,
        stream: &annals_store::StreamName,
        from_version: u64,
        direction: annals_store::Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, annals_store::StoreError> {
        let events = self
            .0
            .read_stream(stream, from_version, direction, limit)
            .await?;
        Ok(events.into_iter().map(Self::clocked).collect())
    }

    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
        filter: &LogFilter,
    ) -> Result<annals_store::LogPage, annals_store::StoreError> {
        let mut page = self.0.read_all(from_position, limit, filter).await?;
        page.events = page.events.into_iter().map(Self::clocked).collect();
        Ok(page)
    }
}

/// The position of a stream's event at `version`.
async fn position_of(db: &Fixture, stream: String, version: u64) -> u64 {
    let stream = annals_store::StreamName::parse(stream).unwrap();
    let events = db
        .store()
        .read_stream(&stream, version, annals_store::Direction::Forwards, 1)
        .await
        .unwrap();
    let event = events
        .first()
        .unwrap_or_else(|| panic!("{stream} has no event"));
    assert_eq!(event.version, version, "{stream}");
    event.position
}

async fn the_funnel_pipeline_and_account_view_follow_a_revenue_history(db: Arc<Fixture>) {
    use annals_consumers::queries;
    use annals_consumers::read_models::account_360::Account360;
    use annals_consumers::read_models::deal_board::DealBoard;
    let (account, leads, deals) = revenue_history(&db).await;
    // The account view also reads the account's orders and MRR (none here).
    let projectors: [Arc<dyn Projector>; 5] = [
        Arc::new(LeadBoard),
        Arc::new(DealBoard),
        Arc::new(Account360),
        Arc::new(annals_consumers::read_models::order_board::OrderBoard),
        Arc::new(annals_consumers::read_models::subscription_board::SubscriptionBoard),
    ];
    // The read models see the log through the test's clock: an event at position p was
    // recorded on day p.
    let clocked: Arc<dyn annals_store::EventStore> = Arc::new(DayPerPosition(db.store()));
    for projector in &projectors {
        ConsumerRunner::new(
            clocked.clone(),
            read_database(&db),
            Consumer::ReadModel(projector.clone()),
        )
        .with_batch_size(3)
        .catch_up()
        .await
        .unwrap();
    }
    let read = read_database(&db);

    let funnel = queries::funnel(&read, None, None, None).await.unwrap();
    let all = &funnel.overall;
    assert_eq!(
        (all.captured, all.qualified, all.converted, all.deal_won),
        (4, 3, 2, 1)
    );
    assert_eq!(
        (all.qualification_rate, all.conversion_rate, all.win_rate),
        (Some(0.75), Some(2.0 / 3.0), Some(0.5))
    );
    let sources: Vec<&str> = funnel.by_source.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(sources, vec!["partner", "web"]);
    let web = &funnel.by_source[1].1;
    assert_eq!(
        (web.captured, web.qualified, web.converted, web.deal_won),
        (3, 3, 2, 1)
    );
    assert_eq!(
        (web.qualification_rate, web.conversion_rate, web.win_rate),
        (Some(1.0), Some(2.0 / 3.0), Some(0.5))
    );
    let partner = queries::funnel(&read, None, None, Some("partner"))
        .await
        .unwrap();
    assert_eq!(
        (partner.overall.captured, partner.overall.qualified),
        (1, 0)
    );
    assert_eq!(
        (
            partner.overall.qualification_rate,
            partner.overall.conversion_rate
        ),
        (Some(0.0), None)
    );
    // Windows around the day the last lead was captured: `from` takes it in, `to`
    // leaves it out; the deal won after it counts only after.
    let last_capture = day_text(position_of(&db, format!("lead-{}", leads[3]), 1).await);
    let before = queries::funnel(&read, None, Some(&last_capture), None)
        .await
        .unwrap()
        .overall;
    assert_eq!(
        (
            before.captured,
            before.qualified,
            before.converted,
            before.deal_won
        ),
        (3, 3, 2, 0)
    );
    let since = queries::funnel(&read, Some(&last_capture), None, None)
        .await
        .unwrap()
        .overall;
    assert_eq!(
        (
            since.captured,
            since.qualified,
            since.converted,
            since.deal_won
        ),
        (1, 0, 0, 1)
    );
    let future = queries::funnel(&read, Some("2999-01-01T00:00:00Z"), None, None)
        .await
        .unwrap();
    assert_eq!(
        future.overall.captured, 0,
        "a window excludes what happened outside it"
    );

    let pipeline = queries::pipeline(&read, None).await.unwrap();
    assert_eq!(pipeline.stages.len(), 1);
    let open = &pipeline.stages[0];
    assert_eq!(
        (
            open.stage.as_str(),
            open.currency.as_str(),
            open.count,
            open.amount_minor
        ),
        ("demo", "USD", 1, 500)
    );
    assert_eq!(pipeline.by_owner[0].owner.as_deref(), Some("bob"));
    assert_eq!(
        (pipeline.won, pipeline.lost, pipeline.win_rate),
        (1, 1, Some(0.5))
    );
    // Each converted lead's deal: opened (version 1) on one day, won or lost (version
    // 2) on another; the average of the two spans, in days.
    let mut days = 0;
    for deal in &deals {
        let opened = position_of(&db, format!("deal-{deal}"), 1).await;
        let closed = position_of(&db, format!("deal-{deal}"), 2).await;
        days += closed - opened;
    }
    assert_eq!(
        pipeline.average_days_to_close,
        Some(days as f64 / 2.0),
        "{days} days over two deals"
    );
    let bob = queries::pipeline(&read, Some("bob")).await.unwrap();
    assert_eq!(
        (bob.won, bob.lost, bob.win_rate, bob.average_days_to_close),
        (0, 0, None, None),
        "bob's one deal is open"
    );
    let nobody = queries::pipeline(&read, Some("nobody")).await.unwrap();
    assert!(nobody.stages.is_empty() && nobody.win_rate.is_none());

    let view = queries::account_360(&read, &account.to_string())
        .await
        .unwrap()
        .expect("the converted account");
    assert_eq!(
        (view.name.as_str(), view.tier.as_str()),
        ("Acme", "standard")
    );
    assert_eq!(view.deals.len(), 2);
    assert_eq!(view.won, vec![("EUR".to_owned(), 1_000)]);
    let mut converted = view.converted_leads.clone();
    converted.sort();
    let mut expected: Vec<String> = leads[..2].iter().map(Uuid::to_string).collect();
    expected.sort();
    assert_eq!(converted, expected);
    assert_eq!(queries::account_360(&read, "nope").await.unwrap(), None);

    for projector in projectors {
        let report = ConsumerRunner::new(
            clocked.clone(),
            read_database(&db),
            Consumer::ReadModel(projector),
        )
        .verify()
        .await
        .unwrap();
        assert!(report.equal, "{report:?}");
    }
}

/// Rebuilds replay read models only: once the conversion process has followed the log
/// (opening its accounts and deals), rebuilding every read model leaves the process's
/// checkpoint where it was and appends nothing, and the process has nothing left to do.
async fn a_rebuild_of_every_read_model_leaves_the_conversion_process_where_it_was(
    db: Arc<Fixture>,
) {
    use annals_consumers::read_models::account_360::Account360;
    use annals_consumers::read_models::deal_board::DealBoard;
    let (account, _, deals) = revenue_history(&db).await;
    let store = db.store();
    let process = conversion(&db);
    assert_eq!(
        process.catch_up().await.unwrap(),
        0,
        "both conversions handled"
    );
    let head = store.head().await.unwrap();
    let followed = process.checkpoint().await.unwrap();
    assert_eq!(followed, head, "the process has followed the whole log");
    // What the process sent is in the log: the new account, and each conversion's deal.
    position_of(&db, format!("account-{account}"), 1).await;
    for deal in &deals {
        position_of(&db, format!("deal-{deal}"), 1).await;
    }

    let projectors: [Arc<dyn Projector>; 3] = [
        Arc::new(LeadBoard),
        Arc::new(DealBoard),
        Arc::new(Account360),
    ];
    for projector in projectors {
        let board = runner(&db, projector);
        board.catch_up().await.unwrap();
        board.rebuild().await.unwrap();
        assert_eq!(board.checkpoint().await.unwrap(), head);
    }
    assert_eq!(
        process.checkpoint().await.unwrap(),
        followed,
        "a rebuild moved the process's checkpoint"
    );
    assert!(
        matches!(
            process.rebuild().await,
            Err(ConsumerError::NotAReadModel(_))
        ),
        "a process is never rebuilt: that would act again"
    );
    assert_eq!(
        store.head().await.unwrap(),
        head,
        "a rebuild appended events"
    );
    assert_eq!(
        process.catch_up().await.unwrap(),
        0,
        "after a rebuild the process handled conversions again"
    );
    assert_eq!(store.head().await.unwrap(), head);
}

/// Pauses a runner once at one point while armed: the test waits until the runner is
/// there, acts, then resumes it. A gate starts armed.
struct Gate {
    point: PausePoint,
    armed: AtomicBool,
    reached: Notify,
    resume: Notify,
}

impl Gate {
    fn at(point: PausePoint) -> Arc<Gate> {
        Arc::new(Gate {
            point,
            armed: AtomicBool::new(true),
            reached: Notify::new(),
            resume: Notify::new(),
        })
    }

    fn hook(self: &Arc<Self>) -> PauseHook {
        let gate = self.clone();
        Arc::new(move |at| {
            let gate = gate.clone();
            Box::pin(async move {
                if at == gate.point && gate.armed.swap(false, Ordering::SeqCst) {
                    gate.reached.notify_one();
                    gate.resume.notified().await;
                }
            })
        })
    }

    fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    async fn reached(&self) {
        tokio::time::timeout(Duration::from_secs(20), self.reached.notified())
            .await
            .expect("the runner reaches its pause point");
    }

    fn resume(&self) {
        self.resume.notify_one();
    }
}

async fn rebuilding(db: &Fixture) -> Option<String> {
    db.text_rows("SELECT CAST(rebuilding AS TEXT) FROM projections WHERE name = 'lead_board'")
        .await[0][0]
        .clone()
}

/// A verify reads the live generation, a rebuild swaps in another, the verify goes on:
/// it must not take the new live generation for a leftover and drop it.
async fn a_verify_that_read_the_live_generation_before_a_rebuild_swapped_leaves_the_live_rows(
    db: Arc<Fixture>,
) {
    history(&db).await;
    let board = runner(&db, Arc::new(LeadBoard));
    board.catch_up().await.unwrap();
    let before = db.text_rows(BOARD).await;
    let gate = Gate::at(PausePoint::Claim);
    let verifier = Arc::new(runner(&db, Arc::new(LeadBoard)).with_pause_hook(gate.hook()));
    let verifying = {
        let verifier = verifier.clone();
        tokio::spawn(async move { verifier.verify().await })
    };
    gate.reached().await;
    runner(&db, Arc::new(LeadBoard)).rebuild().await.unwrap();
    gate.resume();
    let report = verifying.await.unwrap().unwrap();
    assert_eq!(
        db.text_rows(BOARD).await,
        before,
        "the live rows are intact"
    );
    assert!(report.equal, "{report:?}");
    assert!(board.verify().await.unwrap().equal);
}

/// A verify's claim goes stale and a rebuild takes it over: the two never share a
/// generation, and the verify, finding its claim gone, drops nothing of the rebuild's.
async fn a_claim_taken_over_gets_a_new_generation_and_its_old_holder_drops_nothing(
    db: Arc<Fixture>,
) {
    history(&db).await;
    let board = runner(&db, Arc::new(LeadBoard));
    board.catch_up().await.unwrap();
    let before = db.text_rows(BOARD).await;
    let gate = Gate::at(PausePoint::Claimed);
    let verifier = Arc::new(runner(&db, Arc::new(LeadBoard)).with_pause_hook(gate.hook()));
    let verifying = {
        let verifier = verifier.clone();
        tokio::spawn(async move { verifier.verify().await })
    };
    gate.reached().await;
    let verify_generation = rebuilding(&db).await.unwrap();
    // The verifying process stops renewing its claim (as if it hung).
    let stale = chrono::Utc::now().timestamp_micros() - 60_000_000;
    db.execute(&format!(
        "UPDATE projections SET rebuild_seen_micros = {stale} WHERE name = 'lead_board'"
    ))
    .await;
    let rebuilder = runner(&db, Arc::new(LeadBoard));
    let claim = rebuilder.claim_rebuild().await.unwrap();
    let rebuild_generation = rebuilding(&db).await.unwrap();
    assert_ne!(
        verify_generation, rebuild_generation,
        "a takeover gets a generation of its own"
    );
    rebuilder.finish_rebuild(claim).await.unwrap();
    gate.resume();
    assert!(matches!(
        verifying.await.unwrap(),
        Err(ConsumerError::Busy(_))
    ));
    assert_eq!(
        db.text_rows(BOARD).await,
        before,
        "the live rows are intact"
    );
    assert!(board.verify().await.unwrap().equal);
    let generations = db
        .text_rows("SELECT DISTINCT CAST(generation AS TEXT) FROM lead_board")
        .await;
    assert_eq!(generations.len(), 1, "nothing left behind: {generations:?}");
}

/// The live runner reads which generation is live, a rebuild swaps, the runner applies
/// a new event: `wait_for` may say the event is applied only once the live board has it.
async fn wait_for_answers_only_from_the_generation_that_is_live(db: Arc<Fixture>) {
    history(&db).await;
    let gate = Gate::at(PausePoint::LiveStep);
    let board = Arc::new(runner(&db, Arc::new(LeadBoard)).with_pause_hook(gate.hook()));
    gate.armed.store(false, Ordering::SeqCst);
    board.catch_up().await.unwrap();
    gate.arm();
    let stepping = {
        let board = board.clone();
        tokio::spawn(async move { board.run_once().await })
    };
    gate.reached().await;
    runner(&db, Arc::new(LeadBoard)).rebuild().await.unwrap();
    let leads = CommandHandler::<Lead>::new(db.store(), HandlerConfig::default());
    let id = Uuid::now_v7();
    let position = leads
        .execute(id, capture(id, 1), &context())
        .await
        .unwrap()
        .position;
    gate.resume();
    let _ = stepping.await.unwrap();
    let on_board = || async {
        db.text_rows(BOARD)
            .await
            .iter()
            .any(|r| r[0].as_deref() == Some(&id.to_string()))
    };
    if board.wait_for(position, Duration::from_millis(100)).await {
        assert!(
            on_board().await,
            "wait_for answered from a board without the event"
        );
    }
    board.catch_up().await.unwrap();
    assert!(board.wait_for(position, Duration::from_secs(1)).await);
    assert!(on_board().await);
}

/// While a verify compares (paused after its first page), a command appends and the
/// live runner applies it; the verify then reports at the position it compared.
async fn commands_and_the_live_runner_go_on_while_verify_compares(db: Arc<Fixture>) {
    history(&db).await;
    let board = runner(&db, Arc::new(LeadBoard));
    board.catch_up().await.unwrap();
    let gate = Gate::at(PausePoint::ComparePage);
    let verifier = Arc::new(
        runner(&db, Arc::new(LeadBoard))
            .with_verify_page_size(2)
            .with_pause_hook(gate.hook()),
    );
    let verifying = {
        let verifier = verifier.clone();
        tokio::spawn(async move { verifier.verify().await })
    };
    gate.reached().await;
    let leads = CommandHandler::<Lead>::new(db.store(), HandlerConfig::default());
    let id = Uuid::now_v7();
    let appended = tokio::time::timeout(
        Duration::from_secs(5),
        leads.execute(id, capture(id, 1), &context()),
    )
    .await;
    let applied = match appended {
        Ok(_) => tokio::time::timeout(Duration::from_secs(5), board.run_once()).await,
        Err(_) => {
            gate.resume();
            panic!("a command waited for the verify's comparison");
        }
    };
    gate.resume();
    assert_eq!(
        applied
            .expect("the live runner waited for the verify's comparison")
            .unwrap(),
        Outcome::Applied(1)
    );
    let report = verifying.await.unwrap().unwrap();
    assert!(report.equal, "{report:?}");
    assert_eq!(report.position, 9, "compared where both generations stood");
    assert!(board.verify().await.unwrap().equal);
}

/// Verify of a board of 1,000 rows, 10 rows a page: it holds a page at a time.
async fn verify_reads_a_large_board_in_bounded_pages(db: Arc<Fixture>) {
    use futures::StreamExt;
    let leads = Arc::new(CommandHandler::<Lead>::new(
        db.store(),
        HandlerConfig::default(),
    ));
    let captures = (0..1_000).map(|n| {
        let leads = leads.clone();
        async move {
            let id = Uuid::now_v7();
            leads.execute(id, capture(id, n), &context()).await.unwrap();
        }
    });
    futures::stream::iter(captures)
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    let board = runner(&db, Arc::new(LeadBoard)).with_verify_page_size(10);
    board.catch_up().await.unwrap();
    let report = board.verify().await.unwrap();
    assert!(report.equal, "{report:?}");
    assert_eq!(report.position, 1_000);
    assert!(report.largest_page <= 20, "{report:?}");
    assert!(report.pages >= 100, "{report:?}");
}

/// A row missing from the live board, one it has that a rebuild lacks, and one with an
/// edited column: verify names each by key (and column), whatever its page size.
async fn verify_names_each_difference_by_key_kind_and_column(db: Arc<Fixture>) {
    let ids = history(&db).await;
    runner(&db, Arc::new(LeadBoard)).catch_up().await.unwrap();
    let live = "(SELECT live_generation FROM projections WHERE name = 'lead_board')";
    db.execute(&format!(
        "DELETE FROM lead_board WHERE lead_id = '{}' AND generation = {live}",
        ids[1]
    ))
    .await;
    db.execute(&format!(
        "UPDATE lead_board SET owner = 'eve' WHERE lead_id = '{}' AND generation = {live}",
        ids[0]
    ))
    .await;
    db.execute(
        "INSERT INTO lead_board (generation, lead_id, email, name, source, status, score, \
                                 captured_at, updated_position) \
         SELECT live_generation, 'not-a-lead', 'x@example.com', 'X', 'web', 'new', 0, \
                '2026-01-01T00:00:00.000000Z', 1 \
           FROM projections WHERE name = 'lead_board'",
    )
    .await;
    let mut expected = vec![
        (
            ids[0].to_string(),
            DifferenceKind::Changed,
            Some("owner"),
            Some("eve"),
            None,
        ),
        (
            ids[1].to_string(),
            DifferenceKind::Missing,
            None,
            None,
            None,
        ),
        (
            "not-a-lead".to_owned(),
            DifferenceKind::Extra,
            None,
            None,
            None,
        ),
    ];
    expected.sort();
    for page in [1, 2, 1_000] {
        let report = runner(&db, Arc::new(LeadBoard))
            .with_verify_page_size(page)
            .verify()
            .await
            .unwrap();
        assert!(!report.equal);
        let mut found: Vec<_> = report
            .differences
            .iter()
            .map(|d| {
                assert_eq!(d.table, "lead_board");
                (
                    d.key.clone(),
                    d.kind,
                    d.column.as_deref(),
                    d.live.as_deref(),
                    d.rebuilt.as_deref(),
                )
            })
            .collect();
        found.sort();
        assert_eq!(found, expected, "page size {page}");
        if page == 1_000 {
            assert_eq!(
                report.pages, 1,
                "a board smaller than a page is read in one"
            );
        }
    }
}

async fn a_rebuild_drops_the_generation_it_replaced(db: Arc<Fixture>) {
    history(&db).await;
    let board = runner(&db, Arc::new(LeadBoard));
    board.catch_up().await.unwrap();
    let generations = |table: &str| {
        format!(
            "SELECT DISTINCT CAST(generation AS TEXT) FROM {table} WHERE {}",
            if table == "lead_board" {
                "TRUE"
            } else {
                "name = 'lead_board'"
            }
        )
    };
    // Twice: the first replaces generation 1, the second one numbered otherwise.
    for _ in 0..2 {
        let old = board.live_generation().await.unwrap();
        board.rebuild().await.unwrap();
        let new = board.live_generation().await.unwrap();
        assert_ne!(old, new);
        for table in ["lead_board", "projection_checkpoints"] {
            assert_eq!(
                db.text_rows(&generations(table)).await,
                [[Some(new.to_string())]],
                "{table}: only the new generation is left"
            );
        }
    }
}

/// When the claimant of a rebuild or verify last renewed its claim.
async fn claim_seen(db: &Fixture) -> i64 {
    db.text_rows(
        "SELECT CAST(rebuild_seen_micros AS TEXT) FROM projections WHERE name = 'lead_board'",
    )
    .await[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap()
}

/// A rebuild in batches of two, paused after each of its first three: the claim was
/// renewed each time (so a long rebuild is never taken for a dead one's).
async fn a_rebuild_renews_its_claim_after_every_batch(db: Arc<Fixture>) {
    history(&db).await;
    let gate = Gate::at(PausePoint::FillBatch);
    let rebuilder = Arc::new(
        runner(&db, Arc::new(LeadBoard))
            .with_rebuild_batch_size(2)
            .with_pause_hook(gate.hook()),
    );
    let rebuilding = {
        let rebuilder = rebuilder.clone();
        tokio::spawn(async move { rebuilder.rebuild().await })
    };
    let mut seen = Vec::new();
    for batch in 0..3 {
        gate.reached().await;
        seen.push(claim_seen(&db).await);
        if batch < 2 {
            gate.arm();
        }
        gate.resume();
    }
    rebuilding.await.unwrap().unwrap();
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "renewed at {seen:?}");
}

/// A comparison whose page takes more than a third of a claim's life renews the claim
/// before the next page.
async fn a_long_comparison_renews_its_claim(db: Arc<Fixture>) {
    history(&db).await;
    runner(&db, Arc::new(LeadBoard)).catch_up().await.unwrap();
    let gate = Gate::at(PausePoint::ComparePage);
    let verifier = Arc::new(
        runner(&db, Arc::new(LeadBoard))
            .with_verify_page_size(1)
            .with_claim_stale(Duration::from_millis(600))
            .with_pause_hook(gate.hook()),
    );
    let verifying = {
        let verifier = verifier.clone();
        tokio::spawn(async move { verifier.verify().await })
    };
    gate.reached().await;
    let first_page = claim_seen(&db).await;
    // The first page takes half the claim's life.
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.arm();
    gate.resume();
    gate.reached().await;
    let second_page = claim_seen(&db).await;
    gate.resume();
    assert!(verifying.await.unwrap().unwrap().equal);
    assert!(
        second_page > first_page,
        "renewed after the first page: {first_page} then {second_page}"
    );
}

/// A verify fills its scratch generation to the head; before it compares, a command
/// appends and the live runner applies it. The verify brings the scratch generation to
/// the live one's position and compares there.
async fn a_verify_whose_live_board_moved_on_after_its_fill_catches_up_and_compares(
    db: Arc<Fixture>,
) {
    history(&db).await;
    let board = runner(&db, Arc::new(LeadBoard));
    board.catch_up().await.unwrap();
    let gate = Gate::at(PausePoint::Compare);
    let verifier = Arc::new(runner(&db, Arc::new(LeadBoard)).with_pause_hook(gate.hook()));
    let verifying = {
        let verifier = verifier.clone();
        tokio::spawn(async move { verifier.verify().await })
    };
    gate.reached().await;
    let leads = CommandHandler::<Lead>::new(db.store(), HandlerConfig::default());
    let id = Uuid::now_v7();
    let position = leads
        .execute(id, capture(id, 1), &context())
        .await
        .unwrap()
        .position;
    assert_eq!(board.run_once().await.unwrap(), Outcome::Applied(1));
    gate.resume();
    let report = tokio::time::timeout(Duration::from_secs(20), verifying)
        .await
        .expect("the verify catches up and compares")
        .unwrap()
        .unwrap();
    assert!(report.equal, "{report:?}");
    assert_eq!(
        report.position, position,
        "compared where the live board stood"
    );
}
/// Two servers starting at once on one PostgreSQL both create a read model's tables:
/// the second waits for the first's transaction, is refused when it commits, and
/// finds the tables made. Forced: the first holds its transaction open.
async fn two_processes_creating_one_read_models_tables_at_once_both_succeed(db: Arc<Fixture>) {
    let table = LeadBoard.tables()[0];
    db.execute(&format!("DROP TABLE IF EXISTS {}", table.name))
        .await;
    let first = read_database(&db);
    let mut creating = first.begin_write(0).await.unwrap();
    for statement in table.create_statements() {
        creating.execute(&statement, &[]).await.unwrap();
    }

    let other = runner(&db, Arc::new(LeadBoard));
    let second = tokio::spawn(async move { other.register().await });
    // On PostgreSQL the second waits for the first's catalog rows; on SQLite writers
    // take turns on the write lock, so it goes after the first's commit.
    if db.backend() == Backend::Postgres {
        // A wait on another transaction's lock names no database: find it by session.
        let waiting = "SELECT CAST(count(*) AS TEXT) FROM pg_locks \
                        WHERE NOT granted AND pid IN (SELECT pid FROM pg_stat_activity \
                                                       WHERE datname = current_database())";
        while db.text_rows(waiting).await[0][0].as_deref() == Some("0") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!second.is_finished());
    }
    creating.commit().await.unwrap();

    second.await.unwrap().unwrap();
    assert_eq!(
        db.described(table.name).await.1.len(),
        table.indexes.len() + 1
    );
}

/// A table made before a read model's columns changed is not silently used: registering
/// the model says which table and why, before any event is applied to it.
async fn a_read_model_whose_table_lacks_a_declared_column_is_refused_at_registration(
    db: Arc<Fixture>,
) {
    runner(&db, Arc::new(LeadBoard)).register().await.unwrap();
    // A column its indexes name: the check comes before any index is made.
    db.execute("DROP INDEX lead_board_owner").await;
    db.execute("ALTER TABLE lead_board DROP COLUMN owner").await;
    let error = runner(&db, Arc::new(LeadBoard))
        .register()
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ConsumerError::TableChanged { table, .. } if table == "lead_board"),
        "{error:?}"
    );
    assert!(error.to_string().contains("needs a new name"), "{error}");
}

/// A read model whose table an operator dropped is not left holding only what comes
/// after its checkpoint: the table is made again and the log applied from position 0.
async fn a_read_model_whose_table_was_dropped_is_made_again_from_position_0(db: Arc<Fixture>) {
    history(&db).await;
    let board = runner(&db, Arc::new(LeadBoard));
    board.catch_up().await.unwrap();
    let before = db.text_rows(BOARD).await;
    assert_eq!(before.len(), 3);

    db.execute("DROP TABLE lead_board").await;
    let again = runner(&db, Arc::new(LeadBoard));
    again.register().await.unwrap();
    assert_eq!(again.checkpoint().await.unwrap(), 0);
    again.catch_up().await.unwrap();
    assert_eq!(db.text_rows(BOARD).await, before);
}

/// A process that starts while another writes (a rebuild's batch, a verify's scratch
/// rows) does not queue behind it when every table and index is made: it reads the
/// catalog and writes nothing. Forced: the test holds the write lock (PostgreSQL: an
/// `EXCLUSIVE` lock on the board and `projections`, which lets readers through).
async fn registering_a_read_model_that_is_all_made_waits_for_no_writer(db: Arc<Fixture>) {
    runner(&db, Arc::new(LeadBoard)).register().await.unwrap();
    let mut writing = read_database(&db).begin_write(0).await.unwrap();
    if db.backend() == Backend::Postgres {
        writing
            .execute("LOCK TABLE lead_board, projections IN EXCLUSIVE MODE", &[])
            .await
            .unwrap();
    }

    let starting = runner(&db, Arc::new(LeadBoard));
    tokio::time::timeout(Duration::from_secs(10), starting.register())
        .await
        .expect("registration waited for the writer")
        .unwrap();
    writing.commit().await.unwrap();
}
