//! The append's input rules at their edges, each rule alone: the largest append, key and
//! hash allowed are accepted and one more is refused (lengths of keys counted in
//! characters), every NUL is refused wherever it sits, and a refused append stores
//! nothing (no event, claim or idempotency key). Also the position a claim records: its
//! holder's first event in the append that took it, kept while the holder keeps the key.

use std::sync::Arc;

use annals_store::{
    AppendRequest, Claim, EventStore, ExpectedVersion, IdempotencyKey, InvalidInput,
    MAX_EVENTS_PER_APPEND, MAX_IDEMPOTENCY_KEY_LEN, MAX_NAME_LEN, Metadata, NewEvent, StoreError,
};
use serde_json::json;

use crate::database::{Fixture, append, event, until};

on_both_backends!(
    an_append_of_exactly_the_most_events_is_accepted_and_one_more_refused,
    a_nul_anywhere_in_an_event_is_refused,
    claim_keys_are_refused_for_each_rule_alone_and_accepted_at_the_maximum,
    idempotency_keys_are_refused_for_each_rule_alone_and_accepted_at_the_maximum,
    a_claim_records_its_holders_first_position_and_keeps_it_while_held,
);

/// Everything an append may store: the log's head, the claims (key, holder, position)
/// and the idempotency keys.
async fn stored(
    db: &Fixture,
    store: &Arc<dyn EventStore>,
) -> (u64, Vec<Vec<Option<String>>>, Vec<Vec<Option<String>>>) {
    let claims = db
        .text_rows("SELECT key, stream, CAST(position AS TEXT) FROM claims ORDER BY key")
        .await;
    let keys = db
        .text_rows("SELECT key, request_hash FROM idempotency_keys ORDER BY key")
        .await;
    (store.head().await.unwrap(), claims, keys)
}

/// Asserts that the append is refused as the expected kind of input and stores nothing.
async fn assert_refused(
    db: &Fixture,
    store: &Arc<dyn EventStore>,
    case: &str,
    request: AppendRequest,
    is_expected: impl Fn(&InvalidInput) -> bool,
) {
    let before = stored(db, store).await;
    match store.append(request).await {
        Err(StoreError::InvalidInput(error)) => {
            assert!(is_expected(&error), "{case}: unexpected error {error:?}")
        }
        other => panic!("{case}: expected InvalidInput, got {other:?}"),
    }
    assert_eq!(
        stored(db, store).await,
        before,
        "{case}: something was stored"
    );
}

async fn an_append_of_exactly_the_most_events_is_accepted_and_one_more_refused(db: Arc<Fixture>) {
    let store = db.store();
    let events = |n: usize| (0..n as i64).map(|i| event("A", i)).collect::<Vec<_>>();
    assert_refused(
        &db,
        &store,
        "one event more than the maximum",
        append(
            "lead-1",
            ExpectedVersion::Any,
            events(MAX_EVENTS_PER_APPEND + 1),
        ),
        |e| {
            matches!(e, InvalidInput::TooManyEvents { len, max }
                if (*len, *max) == (MAX_EVENTS_PER_APPEND + 1, MAX_EVENTS_PER_APPEND))
        },
    )
    .await;
    let outcome = store
        .append(append(
            "lead-1",
            ExpectedVersion::NoStream,
            events(MAX_EVENTS_PER_APPEND),
        ))
        .await
        .expect("an append of exactly the maximum number of events is accepted");
    assert_eq!(outcome.version, MAX_EVENTS_PER_APPEND as u64);
    assert_eq!(store.head().await.unwrap(), MAX_EVENTS_PER_APPEND as u64);
}

async fn a_nul_anywhere_in_an_event_is_refused(db: Arc<Fixture>) {
    let store = db.store();
    let with_metadata = |metadata: Metadata| event("A", 2).with_metadata(metadata);
    let extra = |value: serde_json::Value| Metadata {
        extra: serde_json::from_value(value).unwrap(),
        ..Metadata::default()
    };
    let nul_events = [
        (
            "a NUL in a data value",
            NewEvent::new("A", json!({"a": "x\0y"})),
        ),
        ("a NUL in a data key", NewEvent::new("A", json!({"a\0": 1}))),
        (
            "a NUL deep in the data",
            NewEvent::new("A", json!({"a": [{"b": ["\0"]}]})),
        ),
        (
            "a NUL in the actor",
            with_metadata(Metadata {
                actor: Some("alice\0".into()),
                ..Metadata::default()
            }),
        ),
        (
            "a NUL in the correlation id",
            with_metadata(Metadata {
                correlation_id: Some("\0".into()),
                ..Metadata::default()
            }),
        ),
        (
            "a NUL in the causation id",
            with_metadata(Metadata {
                causation_id: Some("c\0".into()),
                ..Metadata::default()
            }),
        ),
        (
            "a NUL in an extra metadata value",
            with_metadata(extra(json!({"tenant": "ac\0me"}))),
        ),
        (
            "a NUL in an extra metadata key",
            with_metadata(extra(json!({"ten\0ant": "acme"}))),
        ),
    ];
    for (case, bad) in nul_events {
        // The bad event comes second, so the error must name it and not the first one.
        let bad_id = bad.event_id;
        assert_refused(
            &db,
            &store,
            case,
            append("lead-1", ExpectedVersion::Any, vec![event("A", 1), bad]),
            |e| matches!(e, InvalidInput::NulCharacter { event_id } if *event_id == bad_id),
        )
        .await;
    }
    // A NUL is a control character, which the event type rule refuses first.
    assert_refused(
        &db,
        &store,
        "a NUL in the event type",
        append(
            "lead-1",
            ExpectedVersion::Any,
            vec![event("Lead\0Captured", 1)],
        ),
        |e| matches!(e, InvalidInput::EventType { event_type } if event_type == "Lead\0Captured"),
    )
    .await;
    // The same shapes without the NUL are stored.
    let clean = NewEvent::new("A", json!({"a": [{"b": ["x"]}]})).with_metadata(Metadata {
        actor: Some("alice".into()),
        correlation_id: Some("c".into()),
        causation_id: Some("c".into()),
        extra: serde_json::from_value(json!({"tenant": "acme"})).unwrap(),
    });
    store
        .append(append("lead-1", ExpectedVersion::NoStream, vec![clean]))
        .await
        .expect("the clean event is stored");
}

async fn claim_keys_are_refused_for_each_rule_alone_and_accepted_at_the_maximum(db: Arc<Fixture>) {
    let store = db.store();
    let longest_ascii = "k".repeat(MAX_NAME_LEN);
    // Two bytes a character: within the bound only when counted in characters.
    let longest_wide = "é".repeat(MAX_NAME_LEN);
    let refused_keys = [
        ("an empty key", String::new()),
        ("one character too long", "k".repeat(MAX_NAME_LEN + 1)),
        ("one wide character too long", "é".repeat(MAX_NAME_LEN + 1)),
        ("a NUL in the key", "lead-email:a\0b".to_owned()),
    ];
    for (case, key) in refused_keys {
        for claim in [Claim::Take(key.clone()), Claim::Release(key.clone())] {
            // A valid claim first: the bad one is refused wherever it sits.
            let request = append("lead-1", ExpectedVersion::Any, vec![event("A", 1)])
                .with_claims(vec![Claim::Take("lead-email:ok".into()), claim]);
            assert_refused(
                &db,
                &store,
                case,
                request,
                |e| matches!(e, InvalidInput::ClaimKey { key: k } if *k == key),
            )
            .await;
        }
    }
    let outcome = store
        .append(
            append("lead-1", ExpectedVersion::NoStream, vec![event("A", 1)]).with_claims(vec![
                Claim::Take(longest_ascii.clone()),
                Claim::Take(longest_wide.clone()),
            ]),
        )
        .await
        .expect("keys of exactly the maximum length in characters are accepted");
    let position = Some(outcome.positions[0].to_string());
    let holder = Some("lead-1".to_owned());
    assert_eq!(
        stored(&db, &store).await.1,
        vec![
            vec![Some(longest_ascii), holder.clone(), position.clone()],
            vec![Some(longest_wide), holder, position],
        ]
    );
}

async fn idempotency_keys_are_refused_for_each_rule_alone_and_accepted_at_the_maximum(
    db: Arc<Fixture>,
) {
    let store = db.store();
    let valid = IdempotencyKey {
        key: "alice:k1".into(),
        request_hash: "h1".into(),
        payload: json!({"id": "lead-1"}),
    };
    let with = |change: &dyn Fn(&mut IdempotencyKey)| {
        let mut key = valid.clone();
        change(&mut key);
        key
    };
    let refused_keys = [
        ("an empty key", with(&|k| k.key = String::new())),
        (
            "a key one wide character too long",
            with(&|k| k.key = "é".repeat(MAX_IDEMPOTENCY_KEY_LEN + 1)),
        ),
        ("a NUL in the key", with(&|k| k.key = "alice:\0".into())),
        (
            "an empty request hash",
            with(&|k| k.request_hash = String::new()),
        ),
        (
            "a NUL in the request hash",
            with(&|k| k.request_hash = "h\0".into()),
        ),
        (
            "a request hash one byte too long",
            with(&|k| k.request_hash = "h".repeat(MAX_NAME_LEN + 1)),
        ),
        (
            "a NUL in a payload value",
            with(&|k| k.payload = json!({"id": "lead\0"})),
        ),
        (
            "a NUL in a payload key",
            with(&|k| k.payload = json!({"i\0d": "lead-1"})),
        ),
    ];
    for (case, key) in refused_keys {
        let request =
            append("lead-1", ExpectedVersion::Any, vec![event("A", 1)]).with_idempotency(key);
        assert_refused(&db, &store, case, request, |e| {
            matches!(e, InvalidInput::IdempotencyKey)
        })
        .await;
    }
    // Both at their maximum at once: 400 characters (800 bytes) and 200 bytes.
    let longest = with(&|k| {
        k.key = "é".repeat(MAX_IDEMPOTENCY_KEY_LEN);
        k.request_hash = "h".repeat(MAX_NAME_LEN);
    });
    store
        .append(
            append("lead-1", ExpectedVersion::NoStream, vec![event("A", 1)])
                .with_idempotency(longest.clone()),
        )
        .await
        .expect("a key and a request hash of exactly the maximum length are accepted");
    let record = store.find_idempotency(&longest.key).await.unwrap().unwrap();
    assert_eq!(
        (record.request_hash, record.payload),
        (longest.request_hash, longest.payload)
    );
}

async fn a_claim_records_its_holders_first_position_and_keeps_it_while_held(db: Arc<Fixture>) {
    let store = db.store();
    let concrete = db.concrete();
    let probe = concrete.probe();
    let key = "lead-email:5d41402abc4b2a76b9719d911017c592";
    // Three appends in one commit, in this order; the holder's is in the middle, so its
    // first event is neither the batch's first nor its last.
    probe.pause();
    let before = probe.attempts();
    let requests = [
        append(
            "lead-other",
            ExpectedVersion::NoStream,
            vec![event("A", 1), event("A", 2)],
        ),
        append(
            "lead-holder",
            ExpectedVersion::NoStream,
            vec![event("A", 3), event("A", 4)],
        )
        .with_claims(vec![Claim::Take(key.into())]),
        append("lead-later", ExpectedVersion::NoStream, vec![event("A", 5)]),
    ];
    let mut tasks = Vec::new();
    for (i, request) in requests.into_iter().enumerate() {
        let writer = store.clone();
        tasks.push(tokio::spawn(async move { writer.append(request).await }));
        until(probe, "the append to queue", |p| {
            p.queued_appends() == i + 1
        })
        .await;
    }
    probe.resume();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap().expect("every append commits"));
    }
    assert_eq!(
        probe.attempts() - before,
        1,
        "the three appends share one commit"
    );
    let positions: Vec<_> = outcomes.iter().map(|o| o.positions.clone()).collect();
    assert_eq!(positions, vec![vec![1, 2], vec![3, 4], vec![5]]);
    let taken = vec![vec![
        Some(key.to_owned()),
        Some("lead-holder".to_owned()),
        Some("3".to_owned()),
    ]];
    assert_eq!(
        stored(&db, &store).await.1,
        taken,
        "the claim records the holder's first event, not another stream's"
    );

    // Taken again by its holder: a no-op that keeps the position of the first take.
    store
        .append(
            append(
                "lead-holder",
                ExpectedVersion::Exact(2),
                vec![event("A", 6)],
            )
            .with_claims(vec![Claim::Take(key.into())]),
        )
        .await
        .unwrap();
    assert_eq!(
        stored(&db, &store).await.1,
        taken,
        "taking a held key again moves nothing"
    );
    // Refused to another stream, which touches the key without moving it.
    for claim in [Claim::Take(key.into()), Claim::Release(key.into())] {
        let refused = store
            .append(
                append("lead-later", ExpectedVersion::Exact(1), vec![event("A", 7)])
                    .with_claims(vec![claim]),
            )
            .await;
        assert!(
            matches!(refused, Err(StoreError::ClaimHeld { .. })),
            "{refused:?}"
        );
        assert_eq!(
            stored(&db, &store).await.1,
            taken,
            "a refused claim moves nothing"
        );
    }
}
