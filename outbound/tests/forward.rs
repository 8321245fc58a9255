//! The smallest outbound consumer, `forward`, against a receiver the test starts on
//! loopback, on both backends: its target (a URL and a secret, from the settings)
//! reaches it; every event goes out in log order with its event id and the secret; an
//! answer that says "not now" is retried and parks nothing, a refusal is parked after its
//! attempts, and the consumer goes on past it.

// A test that cannot go on should stop loudly; `unwrap` says so shortest.
#![allow(clippy::unwrap_used)]

#[macro_use]
#[path = "../../tests/support/database.rs"]
mod database;

use std::sync::{Arc, Mutex};

use annals_engine::{
    ActionError, Consumer, ConsumerError, ConsumerRunner, FailurePolicy, Outcome, ReadDatabase,
};
use annals_outbound::OutboundSettings;
use annals_outbound::forward::{Forward, Target};
use annals_store::ExpectedVersion;
use axum::http::{HeaderMap, StatusCode};
use database::{Fixture, append, event};

on_both_backends!(forward_delivers_in_order_with_the_event_id_retries_and_parks_a_refusal);

/// One delivery as the receiver saw it: the `idempotency-key`, the `authorization` and
/// the body's `type`.
type Seen = (String, String, String);

/// Starts a receiver that answers 503 to the first delivery, 422 to an event of type
/// `Refused`, and 204 to everything else; returns its URL and what it saw.
async fn receiver() -> (String, Arc<Mutex<Vec<Seen>>>) {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let app = {
        let seen = seen.clone();
        axum::Router::new().route(
            "/events",
            axum::routing::post(
                move |headers: HeaderMap, body: axum::Json<serde_json::Value>| async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let kind = body["type"].as_str().unwrap_or_default().to_owned();
                    let mut seen = seen.lock().unwrap();
                    seen.push((header("idempotency-key"), header("authorization"), kind));
                    match seen.last() {
                        _ if seen.len() == 1 => StatusCode::SERVICE_UNAVAILABLE,
                        Some((_, _, kind)) if kind == "Refused" => StatusCode::UNPROCESSABLE_ENTITY,
                        _ => StatusCode::NO_CONTENT,
                    }
                },
            ),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

async fn forward_delivers_in_order_with_the_event_id_retries_and_parks_a_refusal(db: Arc<Fixture>) {
    let store = db.store();
    for (n, kind) in ["Ping", "Refused", "Ping"].into_iter().enumerate() {
        let expected = ExpectedVersion::Exact(n as u64);
        let n = i64::try_from(n).unwrap();
        store
            .append(append("probe-1", expected, vec![event(kind, n)]))
            .await
            .unwrap();
    }
    let events = store
        .read_all(1, 10, &annals_store::LogFilter::all())
        .await
        .unwrap()
        .events;
    let (url, seen) = receiver().await;
    // The target comes in the settings, as the registry builds the consumer from them.
    let settings = OutboundSettings {
        forward: Some(Target::new(url, "s3cret", std::time::Duration::from_secs(10)).unwrap()),
    };
    let forward = Forward::new(settings.forward.clone().unwrap());
    let runner = ConsumerRunner::new(
        store.clone(),
        ReadDatabase::new(db.tables()),
        Consumer::Outbound(Arc::new(forward)),
    )
    .with_failure_policy(FailurePolicy::Skip, 2);

    // 503: not now; retried, never parked.
    assert!(matches!(
        runner.run_once().await,
        Err(ConsumerError::Action(ActionError::NotNow(_)))
    ));
    assert!(runner.parked().await.unwrap().is_empty());
    // Delivered at last; then the refusal, once and again: parked, and skipped past.
    assert!(matches!(
        runner.run_once().await,
        Err(ConsumerError::Action(ActionError::Refused(_)))
    ));
    assert_eq!(runner.run_once().await.unwrap(), Outcome::Applied(0));
    runner.catch_up().await.unwrap();

    let parked = runner.parked().await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].position, events[1].position);
    assert!(parked[0].error.contains("422"), "{}", parked[0].error);
    assert_eq!(
        runner.checkpoint().await.unwrap(),
        store.head().await.unwrap()
    );
    let id = |i: usize| events[i].event_id.to_string();
    let expected: Vec<Seen> = [
        (0, "Ping"),
        (0, "Ping"),
        (1, "Refused"),
        (1, "Refused"),
        (2, "Ping"),
    ]
    .into_iter()
    .map(|(i, kind)| (id(i), "Bearer s3cret".to_owned(), kind.to_owned()))
    .collect();
    assert_eq!(
        *seen.lock().unwrap(),
        expected,
        "in log order, each try with its event's id and the secret"
    );
    assert!(
        !format!("{:?}", settings.forward).contains("s3cret"),
        "the secret is never shown"
    );
}
