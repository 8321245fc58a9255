//! The write path's bounds and error isolation: timeouts on a stalled lock holder, the
//! isolation level pinned against the database's default, a writer task that survives a
//! panic, one refused append among many, the queue's byte bound, and the wrong answers of
//! filters naming a value twice and retries whose claim has moved.

use std::sync::Arc;
use std::time::{Duration, Instant};

use annals_store::{
    AppendRequest, Claim, ExpectedVersion, IdempotencyKey, InvalidInput, LogFilter, NewEvent,
    StoreConfig, StoreError,
};
use serde_json::json;

use crate::database::{self, Backend, Fixture, append, event, until};

on_both_backends!(
    a_writer_stalled_inside_its_transaction_blocks_writers_only_briefly,
    a_write_attempt_without_an_answer_is_abandoned_at_the_commit_timeout,
    the_database_default_isolation_changes_nothing,
    a_writer_task_that_panics_is_restarted,
    one_append_the_database_refuses_fails_alone_in_few_attempts,
    a_nul_in_a_request_hash_is_refused_as_input,
    the_writers_queue_is_bounded_by_bytes,
    a_filter_naming_a_value_twice_reads_each_event_once,
    a_retry_after_its_claim_moved_gets_its_first_outcome,
    appends_to_streams_the_writer_remembers_need_no_reads_and_keep_the_chains_whole,
    an_append_counts_its_claims_and_its_key_against_the_queue_bound,
    a_batch_takes_at_most_512_appends,
);

/// Settings with every write-path bound small, so a test sees them act within seconds.
fn quick() -> StoreConfig {
    StoreConfig {
        lock_timeout: Duration::from_secs(1),
        idle_in_transaction_timeout: Duration::from_secs(1),
        statement_timeout: Duration::from_secs(5),
        commit_timeout: Duration::from_secs(8),
        ..database::config()
    }
}

async fn a_writer_stalled_inside_its_transaction_blocks_writers_only_briefly(db: Arc<Fixture>) {
    // Another store (another process) takes the writers' lock and stalls inside its
    // transaction, as a frozen process would.
    let stalled = db.open_with(quick()).await;
    let held = stalled
        .hold_append(append(
            "lead-held",
            ExpectedVersion::Any,
            vec![event("A", 0)],
        ))
        .await
        .unwrap();
    let started = Instant::now();
    match db.backend() {
        Backend::Postgres => {
            // The server ends the idle session, which releases the lock: this store's
            // append goes through.
            let store = db.store();
            let outcome = tokio::time::timeout(
                Duration::from_secs(15),
                store.append(append("lead-1", ExpectedVersion::Any, vec![event("A", 1)])),
            )
            .await
            .expect("writers resume within seconds of a stalled lock holder");
            assert_eq!(outcome.unwrap().positions, vec![1]);
            assert!(
                held.commit().await.is_err(),
                "the stalled session was cut off"
            );
        }
        Backend::Sqlite => {
            // No server can end the holder; the other writers' wait is bounded instead,
            // in this process (the writer turn) and in another (the busy timeout).
            let same = stalled.dyn_store();
            let other = db.open_with(quick()).await.dyn_store();
            for store in [same.clone(), other] {
                let refused = tokio::time::timeout(
                    Duration::from_secs(15),
                    store.append(append("lead-1", ExpectedVersion::Any, vec![event("A", 1)])),
                )
                .await
                .expect("a writer's wait for the lock is bounded");
                assert!(
                    matches!(refused, Err(StoreError::Unavailable(_))),
                    "{refused:?}"
                );
            }
            held.commit().await.unwrap();
            let outcome = same
                .append(append("lead-1", ExpectedVersion::Any, vec![event("A", 1)]))
                .await
                .unwrap();
            assert_eq!(outcome.positions, vec![2]);
        }
    }
    assert!(started.elapsed() < Duration::from_secs(15));
}

async fn a_write_attempt_without_an_answer_is_abandoned_at_the_commit_timeout(db: Arc<Fixture>) {
    // The server keeps the writer waiting (no lock timeout, as a half-open socket would
    // never answer); the writer's own bound ends the attempt.
    let patient = StoreConfig {
        lock_timeout: Duration::from_secs(60),
        commit_timeout: Duration::from_secs(1),
        ..database::config()
    };
    let store = db.open_with(patient).await;
    // The writer remembers lead-1's head from this append.
    store
        .dyn_store()
        .append(append("lead-1", ExpectedVersion::Any, vec![event("A", 0)]))
        .await
        .unwrap();
    let holder = match db.backend() {
        // This process's writer turn is what the writer waits for on SQLite.
        Backend::Sqlite => store.clone(),
        Backend::Postgres => db.concrete(),
    };
    let held = holder
        .hold_append(append(
            "lead-held",
            ExpectedVersion::Any,
            vec![event("A", 0)],
        ))
        .await
        .unwrap();
    let abandoned = tokio::time::timeout(
        Duration::from_secs(15),
        store
            .dyn_store()
            .append(append("lead-1", ExpectedVersion::Any, vec![event("A", 1)])),
    )
    .await
    .expect("the commit timeout bounds the attempt");
    assert!(
        matches!(abandoned, Err(StoreError::Unavailable(_))),
        "{abandoned:?}"
    );
    held.commit().await.unwrap();
    // The writer dropped its connection with the attempt, and takes a new one. It also
    // forgot what it remembered, since the abandoned attempt's effect is unknown: the
    // next append reads the facts (the held append's position among them) and commits at
    // its first attempt.
    let probe = store.probe();
    let (attempts, from_memory) = (probe.attempts(), probe.batches_from_memory());
    let outcome = store
        .dyn_store()
        .append(append("lead-1", ExpectedVersion::Any, vec![event("A", 1)]))
        .await
        .unwrap();
    assert_eq!(outcome.positions, vec![3]);
    assert_eq!(
        (
            probe.attempts() - attempts,
            probe.batches_from_memory() - from_memory
        ),
        (1, 0),
        "after an abandoned attempt the writer reads the facts, in one attempt"
    );
}

async fn the_database_default_isolation_changes_nothing(db: Arc<Fixture>) {
    if let Some(name) = db.database_name() {
        db.execute(&format!(
            "ALTER DATABASE {name} SET default_transaction_isolation = 'repeatable read'"
        ))
        .await;
    }
    // New stores, whose sessions start under the database's new default.
    let first = db.open_with(database::config()).await;
    let second = db.open_with(database::config()).await;
    // A client's retry reaches the second store while the first still commits the
    // original: the retry waits for the writers' lock, then must see the original.
    let request = append("lead-x", ExpectedVersion::NoStream, vec![event("A", 0)]);
    let held = first.hold_append(request.clone()).await.unwrap();
    let retry = {
        let store = second.dyn_store();
        let request = request.clone();
        tokio::spawn(async move { store.append(request).await })
    };
    if db.backend() == Backend::Postgres {
        let deadline = Instant::now() + Duration::from_secs(10);
        while db
            .text_rows(
                "SELECT count(*)::text FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
            )
            .await
            != vec![vec![Some("1".to_owned())]]
        {
            assert!(
                Instant::now() < deadline,
                "the retry never waited for the lock"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let original = held.commit().await.unwrap();
    assert_eq!(retry.await.unwrap().unwrap(), original);
    // Concurrent appends from both stores all commit, without gaps.
    let stores = [first.dyn_store(), second.dyn_store()];
    let mut tasks = Vec::new();
    for i in 0..32i64 {
        let store = stores[(i % 2) as usize].clone();
        tasks.push(tokio::spawn(async move {
            store
                .append(append(
                    &format!("lead-{}", i % 4),
                    ExpectedVersion::Any,
                    vec![event("A", i)],
                ))
                .await
        }));
    }
    for task in tasks {
        task.await.unwrap().expect("every append commits");
    }
    assert_eq!(stores[0].head().await.unwrap(), 33);
}

async fn a_writer_task_that_panics_is_restarted(db: Arc<Fixture>) {
    let store = db.concrete();
    store.probe().panic_next_batch();
    let crashed = tokio::time::timeout(
        Duration::from_secs(15),
        store
            .dyn_store()
            .append(append("lead-1", ExpectedVersion::Any, vec![event("A", 1)])),
    )
    .await
    .expect("an append in flight when the writer panics is answered");
    assert!(
        matches!(crashed, Err(StoreError::Unavailable(_))),
        "{crashed:?}"
    );
    for i in 0..3 {
        let next = tokio::time::timeout(
            Duration::from_secs(15),
            store
                .dyn_store()
                .append(append("lead-2", ExpectedVersion::Any, vec![event("A", i)])),
        )
        .await
        .expect("the writer is back");
        next.expect("appends after the panic succeed");
    }
}

async fn one_append_the_database_refuses_fails_alone_in_few_attempts(db: Arc<Fixture>) {
    // A refusal only the database knows about, for one append alone.
    match db.backend() {
        Backend::Sqlite => {
            db.execute(
                "CREATE TRIGGER poison BEFORE INSERT ON events WHEN NEW.event_type = 'Poison' \
                 BEGIN SELECT RAISE(ABORT, 'poisoned'); END",
            )
            .await;
        }
        Backend::Postgres => {
            db.execute(
                "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN RAISE EXCEPTION 'poisoned'; END $$",
            )
            .await;
            db.execute(
                "CREATE TRIGGER poison BEFORE INSERT ON events FOR EACH ROW \
                 WHEN (NEW.event_type = 'Poison') EXECUTE FUNCTION poison()",
            )
            .await;
        }
    }
    let store = db.concrete();
    let probe = store.probe();
    const N: usize = 64;
    const BAD: usize = 37;
    probe.pause();
    let before = probe.attempts();
    let mut tasks = Vec::new();
    for i in 0..N {
        let store = store.dyn_store();
        let kind = if i == BAD { "Poison" } else { "A" };
        let request = append(
            &format!("lead-{i}"),
            ExpectedVersion::NoStream,
            vec![event(kind, i as i64)],
        );
        tasks.push(tokio::spawn(async move { store.append(request).await }));
    }
    // Every append waits in the queue, so they all go into one batch.
    until(probe, "the whole batch to queue", |p| {
        p.queued_appends() == N
    })
    .await;
    probe.resume();
    for (i, task) in tasks.into_iter().enumerate() {
        let result = task.await.unwrap();
        if i == BAD {
            assert!(matches!(result, Err(StoreError::Database(_))), "{result:?}");
        } else {
            result.expect("the other appends of the batch commit");
        }
    }
    let attempts = probe.attempts() - before;
    // The batch, then two halves per level down to the bad append: 1 + 2 log2(64) = 13.
    assert!(
        attempts <= 16,
        "{attempts} write attempts for one bad append among {N}"
    );
    assert_eq!(store.dyn_store().head().await.unwrap(), (N - 1) as u64);
}

async fn a_nul_in_a_request_hash_is_refused_as_input(db: Arc<Fixture>) {
    let store = db.store();
    let request = append("lead-1", ExpectedVersion::Any, vec![event("A", 1)]).with_idempotency(
        IdempotencyKey {
            key: "key-1".into(),
            request_hash: "abc\0def".into(),
            payload: json!({}),
        },
    );
    let refused = store.append(request).await;
    assert!(
        matches!(
            refused,
            Err(StoreError::InvalidInput(InvalidInput::IdempotencyKey))
        ),
        "{refused:?}"
    );
    assert_eq!(store.head().await.unwrap(), 0);
}

fn sized(name: &str, bytes: usize) -> AppendRequest {
    append(
        name,
        ExpectedVersion::Any,
        vec![NewEvent::new("Big", json!({ "text": "x".repeat(bytes) }))],
    )
}

async fn the_writers_queue_is_bounded_by_bytes(db: Arc<Fixture>) {
    const BOUND: usize = 10_000;
    let store = db
        .open_with(StoreConfig {
            max_queued_bytes: BOUND,
            ..database::config()
        })
        .await;
    let probe = store.probe();
    probe.pause();
    let spawn = |name: &str, bytes: usize| {
        let writer = store.dyn_store();
        let request = sized(name, bytes);
        tokio::spawn(async move { writer.append(request).await })
    };
    let first = spawn("lead-1", 4_000);
    let second = spawn("lead-2", 4_000);
    until(probe, "two appends to queue", |p| p.queued_appends() == 2).await;
    let third = spawn("lead-3", 4_000);
    until(probe, "the third caller to wait for room", |p| {
        p.callers_waiting_for_room() == 1
    })
    .await;
    assert_eq!(probe.queued_appends(), 2, "the third append is not queued");
    assert!(probe.queued_bytes() <= BOUND, "{}", probe.queued_bytes());
    probe.resume();
    for task in [first, second, third] {
        task.await
            .unwrap()
            .expect("every append commits in the end");
    }
    // An append larger than the whole bound still goes, alone.
    store
        .dyn_store()
        .append(sized("lead-4", 3 * BOUND))
        .await
        .expect("a large append is not refused");
    assert_eq!(probe.queued_bytes(), 0);
}

async fn a_filter_naming_a_value_twice_reads_each_event_once(db: Arc<Fixture>) {
    let store = db.store();
    for (name, kind) in [("lead-1", "LeadCaptured"), ("deal-1", "DealOpened")] {
        store
            .append(append(name, ExpectedVersion::Any, vec![event(kind, 0)]))
            .await
            .unwrap();
    }
    let positions = |filter: LogFilter| {
        let store = store.clone();
        async move {
            let page = store.read_all(1, 100, &filter).await.unwrap();
            page.events.iter().map(|e| e.position).collect::<Vec<_>>()
        }
    };
    assert_eq!(
        positions(LogFilter::event_types(["LeadCaptured", "LeadCaptured"])).await,
        vec![1]
    );
    assert_eq!(
        positions(LogFilter::categories(["deal", "lead", "deal"])).await,
        vec![1, 2]
    );
    let both = LogFilter {
        event_types: vec!["DealOpened".into(), "DealOpened".into()],
        categories: vec!["deal".into(), "deal".into()],
    };
    assert_eq!(positions(both).await, vec![2]);
}

async fn a_retry_after_its_claim_moved_gets_its_first_outcome(db: Arc<Fixture>) {
    let store = db.store();
    let key = "lead-email:ab";
    let take = append(
        "lead-1",
        ExpectedVersion::Any,
        vec![event("LeadCaptured", 1)],
    )
    .with_claims(vec![Claim::Take(key.into())]);
    let release = append("lead-1", ExpectedVersion::Any, vec![event("LeadErased", 1)])
        .with_claims(vec![Claim::Release(key.into())]);
    let took = store.append(take.clone()).await.unwrap();
    let released = store.append(release.clone()).await.unwrap();
    store
        .append(
            append(
                "lead-2",
                ExpectedVersion::Any,
                vec![event("LeadCaptured", 2)],
            )
            .with_claims(vec![Claim::Take(key.into())]),
        )
        .await
        .unwrap();
    // Both retries are the same appends, already stored: their first outcomes.
    assert_eq!(store.append(take).await.unwrap(), took);
    assert_eq!(store.append(release).await.unwrap(), released);
    assert_eq!(store.head().await.unwrap(), 3);
    // A new append of lead-1 is still refused the key.
    let refused = store
        .append(
            append(
                "lead-1",
                ExpectedVersion::Any,
                vec![event("LeadCaptured", 3)],
            )
            .with_claims(vec![Claim::Take(key.into())]),
        )
        .await;
    assert!(
        matches!(refused, Err(StoreError::ClaimHeld { .. })),
        "{refused:?}"
    );
}

async fn appends_to_streams_the_writer_remembers_need_no_reads_and_keep_the_chains_whole(
    db: Arc<Fixture>,
) {
    // The writer remembers the heads it committed: the next append to one of those
    // streams is planned from memory, written in one attempt, and links into both chains
    // exactly as one planned from the database would.
    let store = db.concrete();
    let probe = store.probe();
    let dyn_store = store.dyn_store();
    let put = |stream: &'static str, expected: ExpectedVersion, n: i64| {
        let store = dyn_store.clone();
        async move {
            store
                .append(append(stream, expected, vec![event("A", n), event("B", n)]))
                .await
                .unwrap()
        }
    };
    put("lead-a", ExpectedVersion::NoStream, 1).await;
    let (attempts, from_memory) = (probe.attempts(), probe.batches_from_memory());
    put("lead-a", ExpectedVersion::Exact(2), 2).await;
    // A stream the writer never wrote is read; then each of the two is remembered.
    put("lead-b", ExpectedVersion::NoStream, 3).await;
    put("lead-a", ExpectedVersion::Exact(4), 4).await;
    let outcome = put("lead-b", ExpectedVersion::Exact(2), 5).await;
    assert_eq!(
        (
            probe.attempts() - attempts,
            probe.batches_from_memory() - from_memory
        ),
        (4, 3),
        "four appends, one attempt each, three of them from memory"
    );
    assert_eq!((outcome.version, outcome.last_position()), (4, 10));
    let report = dyn_store.verify().await.unwrap();
    assert_eq!(report.first_broken_link, None, "{report:?}");
    assert_eq!((report.streams, report.events), (2, 10));
    assert_eq!(report.head.position, 10);
}

async fn an_append_counts_its_claims_and_its_key_against_the_queue_bound(db: Arc<Fixture>) {
    // What an append holds of the queue's bound is its bytes: with the writer paused, the
    // same append on a stream name of the same length, plus a claim, plus an idempotency
    // key, holds exactly as much more as those add.
    let store = db.concrete();
    let probe = store.probe();
    probe.pause();
    let queue = |request: AppendRequest| {
        let writer = store.dyn_store();
        tokio::spawn(async move { writer.append(request).await })
    };
    let plain = |name: &str| append(name, ExpectedVersion::Any, vec![event("Scored", 7)]);
    let first = queue(plain("lead-1"));
    until(probe, "the plain append to queue", |p| {
        p.queued_appends() == 1
    })
    .await;
    let one = probe.queued_bytes();
    assert!(one > "lead-1".len(), "{one}");
    let second = queue(plain("lead-2").with_claims(vec![Claim::Take("k".repeat(10))]));
    until(probe, "the claiming append to queue", |p| {
        p.queued_appends() == 2
    })
    .await;
    assert_eq!(
        probe.queued_bytes(),
        2 * one + 10,
        "a claim adds its key's bytes"
    );
    let third = queue(plain("lead-3").with_idempotency(IdempotencyKey {
        key: "key-123".into(),
        request_hash: "hash5".into(),
        payload: json!({ "a": 1 }),
    }));
    until(probe, "the keyed append to queue", |p| {
        p.queued_appends() == 3
    })
    .await;
    assert_eq!(
        probe.queued_bytes(),
        3 * one + 10 + 7 + 5 + r#"{"a":1}"#.len(),
        "a key adds its own, its request hash's and its payload's bytes"
    );
    probe.resume();
    for task in [first, second, third] {
        task.await.unwrap().expect("each append commits");
    }
    assert_eq!(probe.queued_bytes(), 0);
}

async fn a_batch_takes_at_most_512_appends(db: Arc<Fixture>) {
    // 513 one-event appends queued while the writer waits go in two transactions: 512,
    // the most appends a batch takes, then the one left.
    let store = db.concrete();
    let probe = store.probe();
    probe.pause();
    let tasks: Vec<_> = (0..513)
        .map(|i| {
            let writer = store.dyn_store();
            let request = append(
                &format!("lead-{i}"),
                ExpectedVersion::NoStream,
                vec![event("A", i)],
            );
            tokio::spawn(async move { writer.append(request).await })
        })
        .collect();
    until(probe, "513 appends to queue", |p| p.queued_appends() == 513).await;
    let attempts = probe.attempts();
    probe.resume();
    for task in tasks {
        task.await.unwrap().expect("each append commits");
    }
    assert_eq!(
        probe.attempts() - attempts,
        2,
        "transactions for 513 appends"
    );
}
