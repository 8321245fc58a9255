//! The event store's contract, proven against both backends: every case below runs once
//! on SQLite and once on PostgreSQL, each on a fresh database.

// A test that cannot go on should stop loudly; `unwrap` says so shortest.
#![allow(clippy::unwrap_used)]

#[macro_use]
#[path = "../../tests/support/database.rs"]
mod database;
#[path = "conformance/write_path.rs"]
mod write_path;

#[path = "conformance/audit.rs"]
mod audit;

#[path = "conformance/input_bounds.rs"]
mod input_bounds;

#[path = "conformance/personal.rs"]
mod personal;

#[path = "conformance/leases.rs"]
mod leases;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use annals_store::{
    AppendRequest, Claim, Direction, EventStore, ExpectedVersion, IdempotencyKey, InvalidInput,
    LogFilter, LogFollower, Metadata, NewEvent, Snapshot, StoreConfig, StoreError, StreamName,
};
use database::{Backend, Fixture, append, event, stream};
use serde_json::json;

on_both_backends!(
    appended_events_read_back_with_every_field,
    expected_version_is_checked,
    concurrent_appends_at_one_version_exactly_one_wins,
    concurrent_appends_from_two_stores_exactly_one_wins,
    one_failing_append_never_fails_another_in_the_same_commit,
    readers_never_skip_an_event_committed_late,
    appending_a_stored_event_again_is_a_no_op,
    a_writer_whose_memory_is_stale_reads_the_log_again,
    reusing_an_event_id_for_another_event_is_refused,
    verify_catches_a_row_edited_in_the_database,
    bad_input_gets_typed_errors_and_stores_nothing,
    read_stream_walks_forwards_and_backwards,
    read_all_filters_by_type_and_category,
    waiting_readers_wake_on_commit_from_their_own_store,
    waiting_readers_wake_on_commit_from_another_store,
    waiting_times_out_when_nothing_is_appended,
    snapshots_keep_the_latest,
    claims_are_taken_and_released_with_events,
    concurrent_claims_of_one_key_exactly_one_wins,
    acknowledged_appends_are_durable,
    every_commit_is_flushed_whatever_the_database_default,
    idempotency_keys_are_stored_with_their_append,
    concurrent_appends_with_one_idempotency_key_exactly_one_wins,
);

async fn appended_events_read_back_with_every_field(db: Arc<Fixture>) {
    let store = db.store();
    let metadata = Metadata {
        correlation_id: Some("corr-1".into()),
        causation_id: Some("cmd-1".into()),
        actor: Some("alice".into()),
        extra: serde_json::from_value(json!({"tenant": "acme", "command": "Capture"})).unwrap(),
    };
    let first = NewEvent::new(
        "LeadCaptured",
        json!({"email": "a@b.co", "nested": {"z": 1, "a": [1, 2]}}),
    )
    .with_metadata(metadata.clone())
    .with_schema_version(2);
    let second = event("SignalRecorded", 2);
    let outcome = store
        .append(append(
            "lead-1",
            ExpectedVersion::NoStream,
            vec![first.clone(), second.clone()],
        ))
        .await
        .unwrap();
    assert_eq!(outcome.version, 2);
    assert_eq!(outcome.positions, vec![1, 2]);
    assert_eq!(store.head().await.unwrap(), 2);

    let events = store
        .read_stream(&stream("lead-1"), 1, Direction::Forwards, 100)
        .await
        .unwrap();
    assert_eq!(events.len(), 2);
    let e = &events[0];
    assert_eq!(
        (e.position, e.stream.as_str(), e.version, e.event_id),
        (1, "lead-1", 1, first.event_id)
    );
    assert_eq!(e.event_type, "LeadCaptured");
    assert_eq!(e.schema_version, 2);
    assert_eq!(e.data, first.data);
    assert_eq!(e.metadata, metadata);
    assert!((chrono::Utc::now() - e.recorded_at).num_seconds().abs() < 60);
    assert_ne!(e.hash, [0; 32]);
    assert_eq!(events[1].event_id, second.event_id);
    assert_ne!(events[1].hash, e.hash);

    let page = store.read_all(0, 100, &LogFilter::all()).await.unwrap();
    assert_eq!(page.events, events);
    assert_eq!((page.head, page.next_position), (2, 3));
}

async fn expected_version_is_checked(db: Arc<Fixture>) {
    let store = db.store();
    store
        .append(append(
            "deal-1",
            ExpectedVersion::Exact(0),
            vec![event("A", 1)],
        ))
        .await
        .unwrap();
    let refused = [
        (ExpectedVersion::NoStream, 1),
        (ExpectedVersion::Exact(0), 1),
        (ExpectedVersion::Exact(2), 1),
    ];
    for (expected, actual) in refused {
        let error = store
            .append(append("deal-1", expected, vec![event("B", 1)]))
            .await
            .unwrap_err();
        match error {
            StoreError::WrongExpectedVersion {
                stream,
                expected: e,
                actual: a,
            } => assert_eq!((stream.as_str(), e, a), ("deal-1", expected, actual)),
            other => panic!("expected WrongExpectedVersion, got {other:?}"),
        }
    }
    let ok = store
        .append(append(
            "deal-1",
            ExpectedVersion::Exact(1),
            vec![event("B", 1)],
        ))
        .await
        .unwrap();
    assert_eq!(ok.version, 2);
    let ok = store
        .append(append("deal-1", ExpectedVersion::Any, vec![event("C", 1)]))
        .await
        .unwrap();
    assert_eq!(ok.version, 3);
    assert_eq!(
        store.head().await.unwrap(),
        3,
        "refused appends wrote nothing"
    );
}

async fn race(stores: Vec<Arc<dyn EventStore>>, name: &str, expected: u64, contenders: usize) {
    let mut tasks = Vec::new();
    for i in 0..contenders {
        let store = stores[i % stores.len()].clone();
        let request = append(
            name,
            ExpectedVersion::Exact(expected),
            vec![event("Raced", i as i64), event("Raced", i as i64)],
        );
        tasks.push(tokio::spawn(async move { store.append(request).await }));
    }
    let mut winners = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(outcome) => {
                winners += 1;
                assert_eq!(outcome.version, expected + 2);
            }
            Err(StoreError::WrongExpectedVersion { actual, .. }) => {
                assert!(actual > expected);
            }
            Err(other) => panic!("a losing append must get WrongExpectedVersion, got {other:?}"),
        }
    }
    assert_eq!(winners, 1, "exactly one of the racing appends wins");
}

async fn concurrent_appends_at_one_version_exactly_one_wins(db: Arc<Fixture>) {
    let store = db.store();
    for round in 0..5 {
        race(vec![store.clone()], "order-7", round * 2, 8).await;
    }
    let events = store
        .read_stream(&stream("order-7"), 1, Direction::Forwards, 1000)
        .await
        .unwrap();
    let versions: Vec<u64> = events.iter().map(|e| e.version).collect();
    assert_eq!(versions, (1..=10).collect::<Vec<_>>());
}

async fn concurrent_appends_from_two_stores_exactly_one_wins(db: Arc<Fixture>) {
    let stores = vec![db.store(), db.open_again().await];
    for round in 0..5 {
        race(stores.clone(), "account-9", round * 2, 6).await;
    }
    assert_eq!(db.store().head().await.unwrap(), 10);
}

async fn one_failing_append_never_fails_another_in_the_same_commit(db: Arc<Fixture>) {
    let store = db.store();
    store
        .append(append("lead-x", ExpectedVersion::Any, vec![event("A", 0)]))
        .await
        .unwrap();
    // Many appends at once, so that they share commits: every other one is doomed.
    let mut tasks = Vec::new();
    for i in 0..64 {
        let store = store.clone();
        let request = if i % 2 == 0 {
            append(
                &format!("lead-{i}"),
                ExpectedVersion::NoStream,
                vec![event("A", i)],
            )
        } else {
            append("lead-x", ExpectedVersion::NoStream, vec![event("A", i)])
        };
        tasks.push(tokio::spawn(
            async move { (i, store.append(request).await) },
        ));
    }
    let mut positions = Vec::new();
    for task in tasks {
        let (i, result) = task.await.unwrap();
        if i % 2 == 0 {
            positions.push(result.expect("a valid append succeeds").positions[0]);
        } else {
            assert!(matches!(
                result,
                Err(StoreError::WrongExpectedVersion { .. })
            ));
        }
    }
    positions.sort_unstable();
    assert_eq!(
        positions,
        (2..=33).collect::<Vec<_>>(),
        "positions have no gaps"
    );
    assert_eq!(store.head().await.unwrap(), 33);
}

async fn readers_never_skip_an_event_committed_late(db: Arc<Fixture>) {
    let store = db.store();
    // A writer that took its place in the log and is slow to commit...
    let held = db
        .hold_append(append(
            "lead-late",
            ExpectedVersion::Any,
            vec![event("Late", 1)],
        ))
        .await;
    // ...while another append arrives, and a reader follows the log.
    let attempts_before = db.concrete().probe().attempts();
    let quick = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .append(append(
                    "lead-quick",
                    ExpectedVersion::Any,
                    vec![event("Quick", 2)],
                ))
                .await
        })
    };
    let reader = {
        let mut follower = LogFollower::new(store.clone(), 1, LogFilter::all());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while seen.len() < 2 {
                let batch = follower.next_batch(Duration::from_secs(30)).await.unwrap();
                assert!(!batch.is_empty(), "the reader waited 30 s for events");
                seen.extend(batch);
            }
            // Nothing more arrives: each event was handed out once.
            let more = follower
                .next_batch(Duration::from_millis(300))
                .await
                .unwrap();
            assert!(more.is_empty(), "an event was handed out twice: {more:?}");
            seen
        })
    };
    // The quick append reached the writer, which began its transaction and waits for the
    // held one: nothing of it may commit until that one does.
    database::until(
        db.concrete().probe(),
        "the quick append's write attempt",
        |p| p.attempts() > attempts_before,
    )
    .await;
    assert!(
        !quick.is_finished(),
        "an append committed while an earlier writer held its place"
    );
    let page = store.read_all(1, 10, &LogFilter::all()).await.unwrap();
    assert!(page.events.is_empty(), "uncommitted events are visible");

    let late = held.commit().await.unwrap();
    let quick = quick.await.unwrap().unwrap();
    assert!(late.positions[0] < quick.positions[0]);

    let seen = reader.await.unwrap();
    let types: Vec<(&str, u64)> = seen
        .iter()
        .map(|e| (e.event_type.as_str(), e.position))
        .collect();
    assert_eq!(
        types,
        vec![("Late", late.positions[0]), ("Quick", quick.positions[0])]
    );
}

async fn appending_a_stored_event_again_is_a_no_op(db: Arc<Fixture>) {
    let store = db.store();
    let request = append(
        "deal-5",
        ExpectedVersion::NoStream,
        vec![event("DealOpened", 1), event("DealStageChanged", 2)],
    );
    let first = store.append(request.clone()).await.unwrap();
    store
        .append(append(
            "deal-6",
            ExpectedVersion::Any,
            vec![event("Other", 1)],
        ))
        .await
        .unwrap();
    // The retry's expected version no longer holds, yet it is recognised as the same append.
    let again = store.append(request.clone()).await.unwrap();
    assert_eq!(again, first);
    // Retries in one group commit, and a retry from another store.
    let other = db.open_again().await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = if i % 2 == 0 {
            store.clone()
        } else {
            other.clone()
        };
        let request = request.clone();
        tasks.push(tokio::spawn(async move { store.append(request).await }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), first);
    }
    let events = store
        .read_stream(&stream("deal-5"), 1, Direction::Forwards, 100)
        .await
        .unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(store.head().await.unwrap(), 3);

    // A first append and its retry in the same batch: stored once.
    let fresh = append("deal-8", ExpectedVersion::Any, vec![event("X", 1)]);
    let (a, b) = tokio::join!(store.append(fresh.clone()), store.append(fresh.clone()));
    let a = a.unwrap();
    assert_eq!(a, b.unwrap());
    assert_eq!(store.head().await.unwrap(), 4);
    // A retry with `Any` after the commit: only the stored ids can tell it is a retry.
    assert_eq!(store.append(fresh).await.unwrap(), a);
    assert_eq!(store.head().await.unwrap(), 4);
}

async fn a_writer_whose_memory_is_stale_reads_the_log_again(db: Arc<Fixture>) {
    // The writer remembers the heads it wrote; another store (process) appends behind
    // its back, to the same stream and to others.
    let ours = db.store();
    let theirs = db.open_again().await;
    for name in ["lead-a", "lead-b"] {
        ours.append(append(name, ExpectedVersion::Any, vec![event("E", 1)]))
            .await
            .unwrap();
    }
    theirs
        .append(append(
            "lead-a",
            ExpectedVersion::Exact(1),
            vec![event("E", 2)],
        ))
        .await
        .unwrap();
    let same_stream = ours
        .append(append("lead-a", ExpectedVersion::Any, vec![event("E", 3)]))
        .await
        .unwrap();
    assert_eq!(same_stream.version, 3);
    assert_eq!(same_stream.positions, vec![4]);
    theirs
        .append(append("deal-z", ExpectedVersion::Any, vec![event("E", 4)]))
        .await
        .unwrap();
    let other_stream = ours
        .append(append(
            "lead-b",
            ExpectedVersion::Exact(1),
            vec![event("E", 5)],
        ))
        .await
        .unwrap();
    assert_eq!((other_stream.version, other_stream.positions[0]), (2, 6));
    theirs
        .append(append("lead-b", ExpectedVersion::Any, vec![event("E", 6)]))
        .await
        .unwrap();
    // An expected version that only looks wrong from stale memory is checked for real.
    let checked = ours
        .append(append(
            "lead-b",
            ExpectedVersion::Exact(3),
            vec![event("E", 7)],
        ))
        .await
        .unwrap();
    assert_eq!(checked.version, 4);
    assert!(matches!(
        ours.append(append(
            "lead-b",
            ExpectedVersion::Exact(3),
            vec![event("E", 8)]
        ))
        .await,
        Err(StoreError::WrongExpectedVersion { actual: 4, .. })
    ));
    let report = ours.verify().await.unwrap();
    assert!(report.ok());
    assert_eq!(report.events, 8);
}

async fn reusing_an_event_id_for_another_event_is_refused(db: Arc<Fixture>) {
    let store = db.store();
    let original = event("DealOpened", 1);
    store
        .append(append(
            "deal-1",
            ExpectedVersion::Any,
            vec![original.clone()],
        ))
        .await
        .unwrap();
    let id = original.event_id;
    let cases = [
        // Same id, other stream.
        append("deal-2", ExpectedVersion::Any, vec![original.clone()]),
        // Same id and stream, other data.
        append(
            "deal-1",
            ExpectedVersion::Any,
            vec![event("DealOpened", 2).with_id(id)],
        ),
        // Same id and stream, other type.
        append(
            "deal-1",
            ExpectedVersion::Any,
            vec![event("DealWon", 1).with_id(id)],
        ),
        // The stored event plus a new one: not the same append.
        append(
            "deal-1",
            ExpectedVersion::Any,
            vec![original.clone(), event("DealWon", 1)],
        ),
    ];
    for request in cases {
        match store.append(request).await {
            Err(StoreError::EventIdReused { event_id }) => assert_eq!(event_id, id),
            other => panic!("expected EventIdReused, got {other:?}"),
        }
    }
    assert_eq!(store.head().await.unwrap(), 1);
}

async fn verify_catches_a_row_edited_in_the_database(db: Arc<Fixture>) {
    let store = db.store();
    for name in ["lead-a", "lead-b", "lead-c"] {
        store
            .append(append(
                name,
                ExpectedVersion::Any,
                vec![event("E", 1), event("E", 2), event("E", 3)],
            ))
            .await
            .unwrap();
    }
    let report = store.verify().await.unwrap();
    assert!(report.ok());
    assert_eq!((report.streams, report.events), (3, 9));

    let edited = db
        .execute("UPDATE events SET data = '{\"n\": 20}' WHERE stream = 'lead-b' AND version = 2")
        .await;
    assert_eq!(edited, 1);
    let report = store.verify().await.unwrap();
    let broken = report.first_broken_link.expect("the edit is caught");
    assert_eq!((broken.stream.as_str(), broken.version), ("lead-b", 2));
    assert_ne!(broken.expected, broken.found);
    assert_eq!((report.streams, report.events), (3, 9));

    // Putting the data back, byte for byte as stored, heals it; editing metadata is
    // caught as well.
    db.execute("UPDATE events SET data = '{\"n\":2}' WHERE stream = 'lead-b' AND version = 2")
        .await;
    assert!(store.verify().await.unwrap().ok());
    db.execute("UPDATE events SET metadata = '{\"actor\": \"mallory\"}' WHERE stream = 'lead-c' AND version = 1")
        .await;
    let broken = store.verify().await.unwrap().first_broken_link.unwrap();
    assert_eq!((broken.stream.as_str(), broken.version), ("lead-c", 1));
}

async fn bad_input_gets_typed_errors_and_stores_nothing(db: Arc<Fixture>) {
    let store = db.store();
    for (name, expected_reason) in [
        ("", "it is empty"),
        (&"x".repeat(201), "it is longer than 200 characters"),
        (
            "lead 1",
            "only A-Z, a-z, 0-9, '_', '.', ':' and '-' are allowed",
        ),
        (
            "lead/../1",
            "only A-Z, a-z, 0-9, '_', '.', ':' and '-' are allowed",
        ),
        (
            "lead-é",
            "only A-Z, a-z, 0-9, '_', '.', ':' and '-' are allowed",
        ),
    ] {
        match StreamName::parse(name) {
            Err(StoreError::InvalidInput(InvalidInput::StreamName { reason, .. })) => {
                assert_eq!(reason, expected_reason)
            }
            other => panic!("stream name {name:?}: {other:?}"),
        }
    }
    assert!(StreamName::parse("x".repeat(200)).is_ok());
    assert!(StreamName::parse("lead-0190f0e4_a.b:c").is_ok());
    assert!(matches!(
        ExpectedVersion::exact(-1),
        Err(StoreError::InvalidInput(
            InvalidInput::NegativeExpectedVersion(-1)
        ))
    ));
    assert_eq!(
        ExpectedVersion::exact(3).unwrap(),
        ExpectedVersion::Exact(3)
    );

    let dup = event("A", 1);
    let mut reserved = Metadata::default();
    reserved.extra.insert("actor".into(), json!("x"));
    type IsExpected = fn(&InvalidInput) -> bool;
    let cases: Vec<(AppendRequest, IsExpected)> = vec![
        (append("s-1", ExpectedVersion::Any, vec![]), |e| {
            matches!(e, InvalidInput::EmptyAppend)
        }),
        (
            append(
                "s-1",
                ExpectedVersion::Any,
                vec![NewEvent::new("A", json!([1]))],
            ),
            |e| matches!(e, InvalidInput::DataNotObject { .. }),
        ),
        (
            append(
                "s-1",
                ExpectedVersion::Any,
                vec![NewEvent::new("A", json!("text"))],
            ),
            |e| matches!(e, InvalidInput::DataNotObject { .. }),
        ),
        (
            append(
                "s-1",
                ExpectedVersion::Any,
                vec![NewEvent::new("A", json!({"a": "\u{0}"}))],
            ),
            |e| matches!(e, InvalidInput::NulCharacter { .. }),
        ),
        (
            append("s-1", ExpectedVersion::Any, vec![event("", 1)]),
            |e| matches!(e, InvalidInput::EventType { .. }),
        ),
        (
            append(
                "s-1",
                ExpectedVersion::Any,
                vec![event(&"T".repeat(201), 1)],
            ),
            |e| matches!(e, InvalidInput::EventType { .. }),
        ),
        (
            append("s-1", ExpectedVersion::Any, vec![dup.clone(), dup.clone()]),
            |e| matches!(e, InvalidInput::DuplicateEventId { .. }),
        ),
        (
            append(
                "s-1",
                ExpectedVersion::Any,
                vec![event("A", 1).with_metadata(reserved)],
            ),
            |e| matches!(e, InvalidInput::ReservedMetadataKey { .. }),
        ),
        (
            append("s-1", ExpectedVersion::Any, vec![event("A", 1)])
                .with_claims(vec![Claim::Take(String::new())]),
            |e| matches!(e, InvalidInput::ClaimKey { .. }),
        ),
        (
            append(
                "s-1",
                ExpectedVersion::Any,
                (0..=annals_store::MAX_EVENTS_PER_APPEND as i64)
                    .map(|i| event("A", i))
                    .collect(),
            ),
            |e| matches!(e, InvalidInput::TooManyEvents { .. }),
        ),
    ];
    for (request, is_expected) in cases {
        match store.append(request).await {
            Err(StoreError::InvalidInput(error)) => {
                assert!(is_expected(&error), "unexpected error {error:?}")
            }
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }
    let bad_snapshot = Snapshot {
        stream: "s-1".into(),
        version: 0,
        schema_version: 1,
        state: json!({}),
    };
    assert!(matches!(
        store.save_snapshot(&bad_snapshot).await,
        Err(StoreError::InvalidInput(
            InvalidInput::SnapshotVersion { .. }
        ))
    ));
    assert_eq!(store.head().await.unwrap(), 0, "nothing was stored");
    // The store still works after all of that.
    store
        .append(append(
            "s-1",
            ExpectedVersion::NoStream,
            vec![event("A", 1)],
        ))
        .await
        .unwrap();
}

async fn read_stream_walks_forwards_and_backwards(db: Arc<Fixture>) {
    let store = db.store();
    let events: Vec<NewEvent> = (1..=10).map(|i| event("E", i)).collect();
    store
        .append(append("lead-r", ExpectedVersion::Any, events))
        .await
        .unwrap();
    store
        .append(append(
            "lead-other",
            ExpectedVersion::Any,
            vec![event("E", 0)],
        ))
        .await
        .unwrap();
    let s = stream("lead-r");
    let versions = |events: Vec<annals_store::RecordedEvent>| -> Vec<u64> {
        events.iter().map(|e| e.version).collect()
    };
    let forwards = store
        .read_stream(&s, 4, Direction::Forwards, 3)
        .await
        .unwrap();
    assert_eq!(versions(forwards), vec![4, 5, 6]);
    let backwards = store
        .read_stream(&s, u64::MAX, Direction::Backwards, 3)
        .await
        .unwrap();
    assert_eq!(versions(backwards), vec![10, 9, 8]);
    let backwards = store
        .read_stream(&s, 2, Direction::Backwards, 10)
        .await
        .unwrap();
    assert_eq!(versions(backwards), vec![2, 1]);
    let past_end = store
        .read_stream(&s, 11, Direction::Forwards, 10)
        .await
        .unwrap();
    assert!(past_end.is_empty());
    let missing = store
        .read_stream(&stream("lead-none"), 1, Direction::Forwards, 10)
        .await
        .unwrap();
    assert!(missing.is_empty());
}

async fn read_all_filters_by_type_and_category(db: Arc<Fixture>) {
    let store = db.store();
    for (name, kind) in [
        ("lead-1", "LeadCaptured"),
        ("deal-1", "DealOpened"),
        ("lead-2", "LeadCaptured"),
        ("lead-1", "LeadAssigned"),
        ("deal-1", "DealWon"),
        ("account", "AccountOpened"),
    ] {
        store
            .append(append(name, ExpectedVersion::Any, vec![event(kind, 0)]))
            .await
            .unwrap();
    }
    let positions = |page: annals_store::LogPage| -> Vec<u64> {
        page.events.iter().map(|e| e.position).collect()
    };
    let leads = store
        .read_all(1, 100, &LogFilter::categories(["lead"]))
        .await
        .unwrap();
    assert_eq!(positions(leads), vec![1, 3, 4]);
    let captured = store
        .read_all(2, 100, &LogFilter::event_types(["LeadCaptured", "DealWon"]))
        .await
        .unwrap();
    assert_eq!((captured.next_position, captured.head), (7, 6));
    assert_eq!(positions(captured), vec![3, 5]);
    let both = LogFilter {
        event_types: vec!["LeadCaptured".into()],
        categories: vec!["lead".into(), "account".into()],
    };
    assert_eq!(
        positions(store.read_all(1, 100, &both).await.unwrap()),
        vec![1, 3]
    );
    // A stream without '-' is its own category.
    let accounts = store
        .read_all(1, 100, &LogFilter::categories(["account"]))
        .await
        .unwrap();
    assert_eq!(positions(accounts), vec![6]);
    // A full page continues after its last event; an empty match still moves the reader on.
    let page = store.read_all(1, 2, &LogFilter::all()).await.unwrap();
    assert_eq!(
        (positions(page.clone()), page.next_position),
        (vec![1, 2], 3)
    );
    let none = store
        .read_all(1, 10, &LogFilter::event_types(["Nothing"]))
        .await
        .unwrap();
    assert!(none.events.is_empty());
    assert_eq!(none.next_position, 7);
    let beyond = store.read_all(50, 10, &LogFilter::all()).await.unwrap();
    assert_eq!((beyond.events.len(), beyond.next_position), (0, 50));
}

/// Waits (at most 10 s) until `count` readers of a store wait for a wake-up: each has read
/// the head and found nothing new, so a later commit ends its wait only by waking it.
async fn until_parked(store: &database::Store, count: usize) {
    let parked = || match store {
        database::Store::Sqlite(store) => store.parked_readers(),
        database::Store::Postgres(store) => store.parked_readers(),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while parked() < count {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {count} readers waiting",
            parked()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A reader of `reader` waits for the log to pass its head, with a 30 s deadline; once it
/// waits, `writer` appends. Returns how long after the append the reader woke.
async fn wake_up_after_append(reader: &database::Store, writer: &Arc<dyn EventStore>) -> Duration {
    let store = reader.dyn_store();
    let head = store.head().await.unwrap();
    let waiter =
        tokio::spawn(async move { store.wait_for_events(head, Duration::from_secs(30)).await });
    until_parked(reader, 1).await;
    let appended = std::time::Instant::now();
    let outcome = writer
        .append(append("lead-w", ExpectedVersion::Any, vec![event("E", 1)]))
        .await
        .unwrap();
    let woke_at = waiter.await.unwrap().unwrap();
    assert_eq!(woke_at, outcome.last_position());
    appended.elapsed()
}

/// The deadline is 30 s and readers poll only every 60 s (see `database::config`): a reader
/// that returns within a few seconds of the append was woken by the commit, not by its
/// deadline (where `wait_for_events` reads the head once more and would find it too).
const WOKEN_WITHIN: Duration = Duration::from_secs(5);

async fn waiting_readers_wake_on_commit_from_their_own_store(db: Arc<Fixture>) {
    let store = db.concrete();
    let woke = wake_up_after_append(&store, &store.dyn_store()).await;
    assert!(woke < WOKEN_WITHIN, "woken {woke:?} after the append");
}

async fn waiting_readers_wake_on_commit_from_another_store(db: Arc<Fixture>) {
    // The writer is a second store on the same database, opened as another process would:
    // its own pools, writer task, head watch and (on PostgreSQL) listener connection,
    // nothing in memory shared with the reader's store.
    let writer = db.open_again().await;
    match db.backend() {
        Backend::Postgres => {
            // The commit's notification wakes the reader.
            let woke = wake_up_after_append(&db.concrete(), &writer).await;
            assert!(woke < WOKEN_WITHIN, "woken {woke:?} after the append");
        }
        Backend::Sqlite => {
            // SQLite has no notification between processes: a reader learns of another
            // process's commit by polling, so its poll interval bounds the wait.
            let reader = db
                .open_with(StoreConfig {
                    poll_interval: Duration::from_millis(100),
                    ..database::config()
                })
                .await;
            let woke = wake_up_after_append(&reader, &writer).await;
            assert!(woke < WOKEN_WITHIN, "woken {woke:?} after the append");
        }
    }
}

async fn waiting_times_out_when_nothing_is_appended(db: Arc<Fixture>) {
    let store = db.store();
    store
        .append(append("lead-t", ExpectedVersion::Any, vec![event("E", 1)]))
        .await
        .unwrap();
    let head = store
        .wait_for_events(1, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(head, 1);
    // Already beyond: answers at once with the head.
    assert_eq!(
        store
            .wait_for_events(0, Duration::from_secs(30))
            .await
            .unwrap(),
        1
    );
}

async fn snapshots_keep_the_latest(db: Arc<Fixture>) {
    let store = db.store();
    let s = stream("lead-snap");
    assert_eq!(store.load_snapshot(&s).await.unwrap(), None);
    let snapshot = |version, score| Snapshot {
        stream: "lead-snap".into(),
        version,
        schema_version: 3,
        state: json!({"score": score, "status": "working"}),
    };
    store.save_snapshot(&snapshot(5, 10)).await.unwrap();
    assert_eq!(
        store.load_snapshot(&s).await.unwrap(),
        Some(snapshot(5, 10))
    );
    store.save_snapshot(&snapshot(3, 1)).await.unwrap();
    assert_eq!(
        store.load_snapshot(&s).await.unwrap(),
        Some(snapshot(5, 10)),
        "an older snapshot does not replace a newer one"
    );
    store.save_snapshot(&snapshot(8, 40)).await.unwrap();
    assert_eq!(
        store.load_snapshot(&s).await.unwrap(),
        Some(snapshot(8, 40))
    );
}

async fn claims_are_taken_and_released_with_events(db: Arc<Fixture>) {
    let store = db.store();
    let key = "lead-email:5d41402abc4b2a76b9719d911017c592";
    let take = |name: &str, expected| {
        append(name, expected, vec![event("LeadCaptured", 1)])
            .with_claims(vec![Claim::Take(key.into())])
    };
    store
        .append(take("lead-a", ExpectedVersion::NoStream))
        .await
        .unwrap();
    match store
        .append(take("lead-b", ExpectedVersion::NoStream))
        .await
    {
        Err(StoreError::ClaimHeld { key: k, holder }) => {
            assert_eq!((k.as_str(), holder.as_str()), (key, "lead-a"))
        }
        other => panic!("expected ClaimHeld, got {other:?}"),
    }
    assert!(
        store
            .read_stream(&stream("lead-b"), 1, Direction::Forwards, 10)
            .await
            .unwrap()
            .is_empty(),
        "the refused append stored no event"
    );
    // The holder may take its own key again; another stream may not release it.
    store
        .append(take("lead-a", ExpectedVersion::Exact(1)))
        .await
        .unwrap();
    let release_by_b = append("lead-b", ExpectedVersion::Any, vec![event("LeadErased", 1)])
        .with_claims(vec![Claim::Release(key.into())]);
    assert!(matches!(
        store.append(release_by_b).await,
        Err(StoreError::ClaimHeld { .. })
    ));
    let release = append(
        "lead-a",
        ExpectedVersion::Exact(2),
        vec![event("LeadErased", 1)],
    )
    .with_claims(vec![Claim::Release(key.into())]);
    store.append(release).await.unwrap();
    store
        .append(take("lead-b", ExpectedVersion::NoStream))
        .await
        .unwrap();
    // Released and taken again within one group commit.
    let release = append(
        "lead-b",
        ExpectedVersion::Exact(1),
        vec![event("LeadErased", 1)],
    )
    .with_claims(vec![Claim::Release(key.into())]);
    let (released, taken) = tokio::join!(store.append(release), async {
        tokio::task::yield_now().await;
        store
            .append(take("lead-c", ExpectedVersion::NoStream))
            .await
    });
    released.unwrap();
    if taken.is_err() {
        // The take was decided before the release: it may go now.
        store
            .append(take("lead-c", ExpectedVersion::NoStream))
            .await
            .unwrap();
    }
    match store
        .append(take("lead-d", ExpectedVersion::NoStream))
        .await
    {
        Err(StoreError::ClaimHeld { holder, .. }) => assert_eq!(holder, "lead-c"),
        other => panic!("expected ClaimHeld by lead-c, got {other:?}"),
    }
}

async fn concurrent_claims_of_one_key_exactly_one_wins(db: Arc<Fixture>) {
    let stores = [db.store(), db.open_again().await];
    let mut tasks = Vec::new();
    for i in 0..12 {
        let store = stores[i % 2].clone();
        let request = append(
            &format!("lead-{i}"),
            ExpectedVersion::NoStream,
            vec![event("LeadCaptured", 1)],
        )
        .with_claims(vec![Claim::Take("lead-email:same".into())]);
        tasks.push(tokio::spawn(async move { store.append(request).await }));
    }
    let mut winners = HashSet::new();
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(_) => {
                winners.insert(i);
            }
            Err(StoreError::ClaimHeld { .. }) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1);
    assert_eq!(db.store().head().await.unwrap(), 1);
}

async fn acknowledged_appends_are_durable(db: Arc<Fixture>) {
    let store = db.store();
    let outcome = store
        .append(append("lead-d", ExpectedVersion::Any, vec![event("E", 1)]))
        .await
        .unwrap();
    // Another store, with connections of its own, sees the acknowledged event at once.
    let other = db.open_again().await;
    let page = other.read_all(1, 10, &LogFilter::all()).await.unwrap();
    assert_eq!(page.events.len(), 1);
    assert_eq!(page.events[0].position, outcome.positions[0]);
    if db.backend() == Backend::Sqlite {
        assert_eq!(db.setting("PRAGMA journal_mode").await, "wal");
    }
}

/// The flush on commit is the store's own setting, not the database's default: with the
/// default turned the other way, the store's connections, the writer's among them, still
/// flush every commit.
async fn every_commit_is_flushed_whatever_the_database_default(db: Arc<Fixture>) {
    // What each append's transaction runs with, recorded by the database as it writes.
    let (record, seen, flushed): (&[&str], &str, &str) = match db.backend() {
        Backend::Sqlite => (
            &["CREATE TRIGGER flush_seen AFTER INSERT ON events BEGIN \
                 INSERT INTO flush_settings SELECT synchronous FROM pragma_synchronous; END"],
            "PRAGMA synchronous",
            "2",
        ),
        Backend::Postgres => (
            &[
                "CREATE FUNCTION flush_seen() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                   INSERT INTO flush_settings VALUES (current_setting('synchronous_commit')); \
                   RETURN NULL; END $$",
                "CREATE TRIGGER flush_seen AFTER INSERT ON events \
                   FOR EACH ROW EXECUTE FUNCTION flush_seen()",
            ],
            "SHOW synchronous_commit",
            "on",
        ),
    };
    db.execute("CREATE TABLE flush_settings (setting TEXT NOT NULL)")
        .await;
    for statement in record {
        db.execute(statement).await;
    }
    // The store under test opens where the default is not to flush: on PostgreSQL the
    // database's default; on SQLite (where the level is each connection's, and this
    // build's default is FULL) connection options that ask for NORMAL.
    let store = match &*db {
        Fixture::Postgres { database, url, .. } => {
            db.execute(&format!(
                "ALTER DATABASE {database} SET synchronous_commit = off"
            ))
            .await;
            let mut plain = <sqlx::PgConnection as sqlx::Connection>::connect(url)
                .await
                .unwrap();
            let default: String = sqlx::query_scalar("SHOW synchronous_commit")
                .fetch_one(&mut plain)
                .await
                .unwrap();
            assert_eq!(default, "off", "the database's default");
            database::Store::Postgres(
                annals_store::PostgresStore::open(url, database::config())
                    .await
                    .unwrap(),
            )
        }
        Fixture::Sqlite { url, .. } => {
            use std::str::FromStr;
            let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
                .unwrap()
                .synchronous(sqlx::sqlite::SqliteSynchronous::Normal);
            let mut plain = sqlx::ConnectOptions::connect(&options).await.unwrap();
            let default: i64 = sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(&mut plain)
                .await
                .unwrap();
            assert_eq!(default, 1, "NORMAL on a connection the store does not set");
            database::Store::Sqlite(
                annals_store::SqliteStore::open_with(options, database::config())
                    .await
                    .unwrap(),
            )
        }
    };
    // Every read connection the store holds at once…
    let settings = match &store {
        database::Store::Sqlite(store) => {
            let mut held = Vec::new();
            for _ in 0..4 {
                held.push(store.pool().acquire().await.unwrap());
            }
            let mut settings = Vec::new();
            for connection in &mut held {
                let level: i64 = sqlx::query_scalar(seen)
                    .fetch_one(&mut **connection)
                    .await
                    .unwrap();
                settings.push(level.to_string());
            }
            settings
        }
        database::Store::Postgres(store) => {
            let mut held = Vec::new();
            for _ in 0..4 {
                held.push(store.pool().acquire().await.unwrap());
            }
            let mut settings = Vec::new();
            for connection in &mut held {
                let setting: String = sqlx::query_scalar(seen)
                    .fetch_one(&mut **connection)
                    .await
                    .unwrap();
                settings.push(setting);
            }
            settings
        }
    };
    assert_eq!(settings, vec![flushed; 4], "the store's read connections");
    // …and the writer's, in the transactions of its appends.
    let writer = store.dyn_store();
    for n in 0..3 {
        writer
            .append(append("lead-f", ExpectedVersion::Any, vec![event("E", n)]))
            .await
            .unwrap();
    }
    let recorded = db.text_rows("SELECT setting FROM flush_settings").await;
    assert_eq!(
        recorded,
        vec![vec![Some(flushed.to_owned())]; 3],
        "the writer's transactions"
    );
}

/// One task's appends: (stream index, events in the append, expected version).
type TaskPlan = Vec<(usize, usize, ExpectedVersion)>;

fn task_plans() -> impl proptest::strategy::Strategy<Value = Vec<TaskPlan>> {
    use proptest::prelude::*;
    let expected = prop_oneof![
        Just(ExpectedVersion::Any),
        Just(ExpectedVersion::NoStream),
        (0u64..6).prop_map(ExpectedVersion::Exact),
    ];
    let append = (0usize..4, 1usize..5, expected);
    proptest::collection::vec(proptest::collection::vec(append, 1..8), 2..6)
}

/// Several tasks append random batches to random streams at once (through two stores on
/// the same database); afterwards the log holds exactly the acknowledged events.
async fn concurrent_random_appends_keep_the_log_sound(db: Arc<Fixture>, plans: Vec<TaskPlan>) {
    let stores = [db.store(), db.open_again().await];
    let mut tasks = Vec::new();
    for (t, plan) in plans.into_iter().enumerate() {
        let store = stores[t % 2].clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut refused = Vec::new();
            for (s, len, expected) in plan {
                let events: Vec<NewEvent> = (0..len).map(|i| event("Random", i as i64)).collect();
                let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.event_id).collect();
                let name = format!("cat{}-{s}", s % 2);
                match store.append(append(&name, expected, events)).await {
                    Ok(outcome) => {
                        assert_eq!(outcome.positions.len(), ids.len());
                        acked.push((name, ids, outcome));
                    }
                    Err(StoreError::WrongExpectedVersion { .. }) => refused.extend(ids),
                    Err(other) => panic!("unexpected error {other:?}"),
                }
            }
            (acked, refused)
        }));
    }
    let mut acked = Vec::new();
    let mut refused = HashSet::new();
    for task in tasks {
        let (a, r) = task.await.unwrap();
        acked.extend(a);
        refused.extend(r);
    }

    let store = db.store();
    let log = store
        .read_all(1, 100_000, &LogFilter::all())
        .await
        .unwrap()
        .events;
    assert!(
        log.windows(2).all(|w| w[0].position < w[1].position),
        "read_all is strictly increasing"
    );
    let mut by_id = std::collections::HashMap::new();
    for e in &log {
        assert!(
            by_id.insert(e.event_id, e).is_none(),
            "an event is in the log twice"
        );
        assert!(
            !refused.contains(&e.event_id),
            "an unacknowledged event is stored"
        );
    }
    let acked_events: usize = acked.iter().map(|(_, ids, _)| ids.len()).sum();
    assert_eq!(
        log.len(),
        acked_events,
        "the log holds exactly the acked events"
    );
    for (name, ids, outcome) in &acked {
        for (i, id) in ids.iter().enumerate() {
            let stored = by_id.get(id).expect("an acknowledged event is stored");
            assert_eq!(&stored.stream, name);
            assert_eq!(stored.position, outcome.positions[i]);
            assert_eq!(stored.version, outcome.version - (ids.len() - 1 - i) as u64);
        }
    }
    for s in 0..4 {
        let name = format!("cat{}-{s}", s % 2);
        let versions: Vec<u64> = store
            .read_stream(&stream(&name), 1, Direction::Forwards, 100_000)
            .await
            .unwrap()
            .iter()
            .map(|e| e.version)
            .collect();
        assert_eq!(versions, (1..=versions.len() as u64).collect::<Vec<_>>());
    }
    assert!(store.verify().await.unwrap().ok());
}

mod properties {
    use proptest::prelude::*;

    use crate::database::{Backend, run};

    fn check(backend: Backend, plans: Vec<super::TaskPlan>) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run(backend, move |db| {
            super::concurrent_random_appends_keep_the_log_sound(db, plans)
        }));
    }

    proptest! {
        // Each case makes a database of its own; a few cases of many appends each.
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        #[test]
        fn sqlite_concurrent_random_appends_keep_the_log_sound(plans in super::task_plans()) {
            check(Backend::Sqlite, plans);
        }

        #[test]
        fn postgres_concurrent_random_appends_keep_the_log_sound(plans in super::task_plans()) {
            check(Backend::Postgres, plans);
        }
    }
}

fn key(name: &str, hash: &str) -> IdempotencyKey {
    IdempotencyKey {
        key: name.into(),
        request_hash: hash.into(),
        payload: json!({"id": "lead-1", "events": ["SignalRecorded"]}),
    }
}

async fn idempotency_keys_are_stored_with_their_append(db: Arc<Fixture>) {
    let store = db.store();
    store
        .append(append("lead-0", ExpectedVersion::Any, vec![event("E", 0)]))
        .await
        .unwrap();
    let request = append(
        "lead-1",
        ExpectedVersion::Any,
        vec![event("E", 1), event("E", 2)],
    )
    .with_idempotency(key("alice:k1", "h1"));
    let outcome = store.append(request.clone()).await.unwrap();
    let record = store.find_idempotency("alice:k1").await.unwrap().unwrap();
    assert_eq!(
        (record.stream.as_str(), record.version, record.last_position),
        ("lead-1", 2, outcome.last_position())
    );
    assert_eq!(record.request_hash, "h1");
    assert_eq!(
        record.payload,
        json!({"id": "lead-1", "events": ["SignalRecorded"]})
    );
    assert!(
        (chrono::Utc::now() - record.recorded_at)
            .num_seconds()
            .abs()
            < 60
    );
    assert_eq!(store.find_idempotency("alice:other").await.unwrap(), None);

    // The same append again (a retry) is the same no-op as without a key.
    assert_eq!(store.append(request).await.unwrap(), outcome);
    // Another append with the key is refused with the stored record, whatever its stream,
    // and stores nothing; also from another store (process) that has remembered nothing.
    for target in [db.store(), db.open_again().await] {
        for name in ["lead-1", "lead-2"] {
            let other = append(name, ExpectedVersion::Any, vec![event("E", 3)])
                .with_idempotency(key("alice:k1", "h2"));
            match target.append(other).await {
                Err(StoreError::IdempotencyKeyUsed { record: stored }) => {
                    assert_eq!(*stored, record)
                }
                other => panic!("expected IdempotencyKeyUsed, got {other:?}"),
            }
        }
    }
    assert_eq!(store.head().await.unwrap(), 3);

    // Keys older than the retention are purged; younger ones stay.
    assert_eq!(
        store
            .purge_idempotency(record.recorded_at - chrono::Duration::seconds(1))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .purge_idempotency(record.recorded_at + chrono::Duration::seconds(1))
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.find_idempotency("alice:k1").await.unwrap(), None);
    let bad =
        append("lead-3", ExpectedVersion::Any, vec![event("E", 4)]).with_idempotency(key("", "h"));
    assert!(matches!(
        store.append(bad).await,
        Err(StoreError::InvalidInput(InvalidInput::IdempotencyKey))
    ));
}

async fn concurrent_appends_with_one_idempotency_key_exactly_one_wins(db: Arc<Fixture>) {
    let stores = [db.store(), db.open_again().await];
    let mut tasks = Vec::new();
    for i in 0..10 {
        let store = stores[i % 2].clone();
        let request = append(
            &format!("lead-{i}"),
            ExpectedVersion::Any,
            vec![event("E", i as i64)],
        )
        .with_idempotency(key("bob:same", &format!("h{i}")));
        tasks.push(tokio::spawn(async move { store.append(request).await }));
    }
    let mut winners = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => winners += 1,
            Err(StoreError::IdempotencyKeyUsed { .. }) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(winners, 1);
    assert_eq!(db.store().head().await.unwrap(), 1);
}
