//! Leases on the one runtime, both backends: a runner paused past its lease's life is
//! taken over by another, and whatever it does when it resumes is refused by the fence
//! in the transaction that would move its checkpoint (a read model's batch commits
//! nothing; a process acts at most once more and its checkpoint's move is refused). The
//! new holder is itself held back meanwhile, so that no checkpoint moved under the old
//! one: only the lease's fence can refuse it.

use annals_engine::Outbound;

use super::processes::{Recording, captured_leads};
use super::*;

on_both_backends!(
    a_read_model_paused_past_its_lease_is_taken_over_and_its_batch_commits_nothing,
    a_process_paused_past_its_lease_acts_once_more_and_its_checkpoint_move_is_refused,
);

/// Short, so that the test waits little for an expiry.
const LIFE: Duration = Duration::from_millis(1_200);

/// The lease's holder and epoch, as the database has them.
async fn lease_row(db: &Fixture, consumer: &str) -> Vec<Vec<Option<String>>> {
    db.text_rows(&format!(
        "SELECT holder, CAST(epoch AS TEXT) FROM leases WHERE name = 'projection.{consumer}'"
    ))
    .await
}

fn epoch(row: &[Vec<Option<String>>]) -> u64 {
    row[0][1].as_deref().unwrap().parse().unwrap()
}

/// Waits (10 s at most) until `runner` has an error that says `what`.
async fn error_saying(runner: &ConsumerRunner, what: &str) -> String {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(error) = runner.status().await.unwrap().last_error
            && error.contains(what)
        {
            return error;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "no error saying {what:?} within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_read_model_paused_past_its_lease_is_taken_over_and_its_batch_commits_nothing(
    db: Arc<Fixture>,
) {
    history(&db).await;
    let (old_gate, new_gate) = (
        Gate::at(PausePoint::BatchRead),
        Gate::at(PausePoint::LiveStep),
    );
    for gate in [&old_gate, &new_gate] {
        gate.armed.store(false, Ordering::SeqCst);
    }
    let old = Arc::new(
        runner(&db, Arc::new(LeadBoard))
            .with_lease_life(LIFE)
            .with_pause_hook(old_gate.hook()),
    );
    // Another process's runner: another store on the same database.
    let new = Arc::new(
        ConsumerRunner::new(
            db.open_again().await,
            read_database(&db),
            Consumer::ReadModel(Arc::new(LeadBoard)),
        )
        .with_lease_life(LIFE)
        .with_pause_hook(new_gate.hook()),
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let spawn = |runner: &Arc<ConsumerRunner>| {
        let (runner, stopped) = (runner.clone(), stopped.clone());
        tokio::spawn(async move { runner.run_until_stopped(stopped).await })
    };
    let hang = Duration::from_secs(10);
    let mut tasks = vec![spawn(&old)];
    let head = db.store().head().await.unwrap();
    assert!(old.wait_for(head, hang).await, "the first runner applies");
    tasks.push(spawn(&new));
    let taken = lease_row(&db, "lead_board").await;
    assert_eq!(epoch(&taken), 1);

    // The holder reads its next batch and stalls before its transaction, past its
    // lease's life.
    old_gate.arm();
    history(&db).await;
    let head = db.store().head().await.unwrap();
    old_gate.reached().await;
    let before = (old.checkpoint().await.unwrap(), db.text_rows(BOARD).await);
    assert_eq!(
        new.applied(),
        0,
        "the other runner stands by while the lease is live"
    );
    // The other takes the lease over once it expired, and is held before its batch.
    new_gate.arm();
    new_gate.reached().await;
    let taken_over = lease_row(&db, "lead_board").await;
    assert!(epoch(&taken_over) > epoch(&taken), "{taken_over:?}");

    // The stalled one resumes: its batch, read under the old epoch, commits nothing,
    // though the checkpoint is still where it read it.
    old_gate.resume();
    let error = error_saying(&old, "lease").await;
    assert!(error.contains("no longer this process's"), "{error}");
    assert_eq!(
        (old.checkpoint().await.unwrap(), db.text_rows(BOARD).await),
        before,
        "the stalled runner committed its batch after the take-over"
    );
    new_gate.resume();
    assert!(new.wait_for(head, hang).await, "the new holder applies");
    stop.send(true).unwrap();
    for task in tasks {
        tokio::time::timeout(hang, task).await.unwrap().unwrap();
    }
    assert_eq!(old.checkpoint().await.unwrap(), head);
    let report = new.verify().await.unwrap();
    assert!(report.equal, "no event applied twice or lost: {report:?}");
}

async fn a_process_paused_past_its_lease_acts_once_more_and_its_checkpoint_move_is_refused(
    db: Arc<Fixture>,
) {
    let outbound = Arc::new(Recording::default());
    let first = captured_leads(&db, 1).await;
    let (old_gate, new_gate) = (Gate::at(PausePoint::Acted), Gate::at(PausePoint::LiveStep));
    for gate in [&old_gate, &new_gate] {
        gate.armed.store(false, Ordering::SeqCst);
    }
    let consumer = |gate: &Arc<Gate>| {
        ConsumerRunner::new(
            db.store(),
            read_database(&db),
            Consumer::Outbound(outbound.clone()),
        )
        .with_lease_life(LIFE)
        .with_pause_hook(gate.hook())
    };
    let (old, new) = (Arc::new(consumer(&old_gate)), Arc::new(consumer(&new_gate)));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let spawn = |runner: &Arc<ConsumerRunner>| {
        let (runner, stopped) = (runner.clone(), stopped.clone());
        tokio::spawn(async move { runner.run_until_stopped(stopped).await })
    };
    let hang = Duration::from_secs(10);
    let mut tasks = vec![spawn(&old)];
    assert!(old.wait_for(first[0], hang).await);
    tasks.push(spawn(&new));
    outbound.delivered.lock().unwrap().clear();

    // The holder delivers the first of three leads and stalls before moving its
    // checkpoint past it, past its lease's life.
    old_gate.arm();
    let at = captured_leads(&db, 3).await;
    old_gate.reached().await;
    let before = old.checkpoint().await.unwrap();
    new_gate.arm();
    new_gate.reached().await;
    // It resumes: its checkpoint's move is refused, and it delivers nothing more.
    old_gate.resume();
    error_saying(&old, "lease").await;
    assert_eq!(old.checkpoint().await.unwrap(), before);
    let once_more: Vec<u64> = outbound
        .delivered
        .lock()
        .unwrap()
        .iter()
        .map(|d| d.1)
        .collect();
    assert_eq!(once_more, vec![at[0]], "it acted at most once more");
    // The new holder delivers the three again from the checkpoint: at least once.
    new_gate.resume();
    let head = db.store().head().await.unwrap();
    assert!(new.wait_for(head, hang).await);
    stop.send(true).unwrap();
    for task in tasks {
        tokio::time::timeout(hang, task).await.unwrap().unwrap();
    }
    let delivered: Vec<u64> = outbound
        .delivered
        .lock()
        .unwrap()
        .iter()
        .map(|d| d.1)
        .collect();
    assert_eq!(delivered, vec![at[0], at[0], at[1], at[2]]);
    assert_eq!(outbound.name(), "recording");
}
