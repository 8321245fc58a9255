//! Durable timers: a timer fires once, at or after its time (on a clock the test moves),
//! never once cancelled, once with two schedulers racing, and one due while no scheduler
//! ran fires when one starts.

use annals_commands::Handlers;
use annals_consumers::read_models::due_timers::{self, DueTimers};
use annals_consumers::timers::{Clock, ManualClock, TimerScheduler, fired_for, schedule};
use annals_domain::timer::{Timer, TimerCommand};
use chrono::{DateTime, Utc};
use serde_json::json;

use super::*;

on_both_backends!(
    a_timer_fires_once_at_its_time_and_hands_back_its_payload,
    a_cancelled_timer_never_fires_even_when_the_scheduler_saw_it_due,
    two_schedulers_racing_fire_each_timer_once,
    a_timer_due_while_no_scheduler_ran_fires_when_one_starts,
);

fn due_board(db: &Fixture) -> ConsumerRunner {
    ConsumerRunner::new(
        db.store(),
        read_database(db),
        Consumer::ReadModel(Arc::new(DueTimers)),
    )
}

fn scheduler(db: &Fixture, clock: Arc<dyn Clock>) -> TimerScheduler {
    let handlers = Handlers::new(db.store(), HandlerConfig::default());
    TimerScheduler::new(read_database(db), &handlers, clock)
}

fn timers(db: &Fixture) -> CommandHandler<Timer> {
    CommandHandler::new(db.store(), HandlerConfig::default())
}

/// Schedules a timer for the test's process, due at `due_at`.
async fn scheduled(db: &Fixture, key: &str, due_at: DateTime<Utc>) -> Uuid {
    schedule(
        &timers(db),
        "test_process",
        key,
        due_at,
        json!({"key": key}),
        &context(),
    )
    .await
    .unwrap()
}

async fn fired(db: &Fixture) -> Vec<RecordedEvent> {
    db.store()
        .read_all(1, 100_000, &LogFilter::event_types(["TimerFired"]))
        .await
        .unwrap()
        .events
}

async fn a_timer_fires_once_at_its_time_and_hands_back_its_payload(db: Arc<Fixture>) {
    let start = Utc::now();
    let clock = Arc::new(ManualClock::at(start));
    let id = scheduled(&db, "a", start + chrono::Duration::hours(24)).await;
    // Scheduling the same step again is the same timer, scheduled once.
    assert_eq!(
        scheduled(&db, "a", start + chrono::Duration::hours(24)).await,
        id
    );
    let board = due_board(&db);
    board.catch_up().await.unwrap();
    let due = due_timers::due(&read_database(&db), i64::MAX, None, 10)
        .await
        .unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].timer_id, id.to_string());

    let scheduler = scheduler(&db, clock.clone());
    assert_eq!(
        scheduler.fire_due().await.unwrap(),
        0,
        "not before its time"
    );
    clock.advance(chrono::Duration::hours(24) - chrono::Duration::seconds(1));
    assert_eq!(scheduler.fire_due().await.unwrap(), 0, "not a second early");
    clock.advance(chrono::Duration::seconds(1));
    assert_eq!(scheduler.fire_due().await.unwrap(), 1, "at its time");
    // The read model has not caught up yet: the scheduler finds it fired, fires nothing.
    assert_eq!(scheduler.fire_due().await.unwrap(), 0);
    board.catch_up().await.unwrap();
    assert!(
        due_timers::due(&read_database(&db), i64::MAX, None, 10)
            .await
            .unwrap()
            .is_empty()
    );

    let events = fired(&db).await;
    assert_eq!(events.len(), 1, "fired once");
    assert_eq!(
        fired_for("test_process", &events[0]).unwrap(),
        Some(json!({"key": "a"}))
    );
    assert_eq!(fired_for("another_process", &events[0]).unwrap(), None);
}

async fn a_cancelled_timer_never_fires_even_when_the_scheduler_saw_it_due(db: Arc<Fixture>) {
    let start = Utc::now();
    let clock = Arc::new(ManualClock::at(start));
    let id = scheduled(&db, "b", start + chrono::Duration::minutes(5)).await;
    let board = due_board(&db);
    board.catch_up().await.unwrap();
    // Cancelled after the read model listed it as waiting, before the scheduler looks:
    // the scheduler still sees it due, and the timer's own stream refuses to fire it.
    timers(&db)
        .execute(id, TimerCommand::Cancel {}, &context())
        .await
        .unwrap();
    clock.advance(chrono::Duration::minutes(10));
    let scheduler = scheduler(&db, clock.clone());
    assert_eq!(scheduler.fire_due().await.unwrap(), 0);
    board.catch_up().await.unwrap();
    // Its row is gone: a scheduler would otherwise find it due, and try it, for ever.
    assert!(
        due_timers::due(&read_database(&db), i64::MAX, None, 10)
            .await
            .unwrap()
            .is_empty(),
        "a cancelled timer waits no more"
    );
    assert_eq!(scheduler.fire_due().await.unwrap(), 0);
    assert!(fired(&db).await.is_empty(), "a cancelled timer never fires");
}

async fn two_schedulers_racing_fire_each_timer_once(db: Arc<Fixture>) {
    let start = Utc::now();
    let clock = Arc::new(ManualClock::at(start));
    for n in 0..20 {
        scheduled(&db, &format!("t{n}"), start + chrono::Duration::seconds(n)).await;
    }
    due_board(&db).catch_up().await.unwrap();
    clock.advance(chrono::Duration::minutes(1));
    // Two servers' schedulers (handlers of their own, empty caches) at the same time, each
    // reading pages of 3: one call goes through every due timer, though the read model
    // has not seen any fire.
    let (one, two) = (
        scheduler(&db, clock.clone()).with_batch_size(3),
        scheduler(&db, clock.clone()).with_batch_size(3),
    );
    let (a, b) = tokio::join!(one.fire_due(), two.fire_due());
    assert_eq!(a.unwrap() + b.unwrap(), 20, "each fired by one of them");
    let events = fired(&db).await;
    assert_eq!(events.len(), 20, "every timer fired once");
    let mut streams: Vec<&str> = events.iter().map(|e| e.stream.as_str()).collect();
    streams.sort_unstable();
    streams.dedup();
    assert_eq!(streams.len(), 20);
}

/// Timers fell due while no scheduler ran (every server down): the first scheduler to
/// start, on the real clock, fires them without being told.
async fn a_timer_due_while_no_scheduler_ran_fires_when_one_starts(db: Arc<Fixture>) {
    let past = Utc::now() - chrono::Duration::hours(1);
    for n in 0..3 {
        scheduled(&db, &format!("late{n}"), past).await;
    }
    let board = Arc::new(due_board(&db));
    board.catch_up().await.unwrap();
    let scheduler = Arc::new(scheduler(
        &db,
        Arc::new(annals_consumers::timers::SystemClock),
    ));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = {
        let scheduler = scheduler.clone();
        let woken = board.applied_changes();
        tokio::spawn(async move { scheduler.run_until_stopped(stopped, woken).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fired(&db).await.len() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "never fired");
        db.store()
            .wait_for_events(db.store().head().await.unwrap(), Duration::from_millis(200))
            .await
            .unwrap();
    }
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("the scheduler stops when told")
        .unwrap();
    assert_eq!(fired(&db).await.len(), 3, "each once");
}
