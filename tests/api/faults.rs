//! The server under faults, on loopback and bounded in time: killed with SIGKILL under
//! load, its PostgreSQL connections cut, one of two servers killed, a poisoned event, a
//! transaction held open during appends. Nothing acknowledged is ever lost, nothing is
//! applied twice, and the read models verify equal afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use annals_domain::Event;
use annals_domain::lead::LeadEvent;
use annals_domain::values::{Email, PersonName, Source};
use annals_store::{AppendRequest, ExpectedVersion, NewEvent, StreamName};
use reqwest::Method;
use serde_json::{Value, json};

use crate::database::{Backend, Fixture, run};
use crate::server::{Server, TOKENS, WRITER, lead};

on_both_backends!(
    acknowledged_commands_survive_kill_9_and_their_retries_append_nothing,
    a_poisoned_event_is_parked_and_the_rest_keeps_serving,
    a_transaction_held_open_during_appends_is_never_skipped,
);

/// A command the server acknowledged: what was sent, and what came back.
#[derive(Debug, Clone)]
struct Acked {
    path: String,
    body: Value,
    key: String,
    answer: Value,
}

/// One client: captures leads and records signals on them, every command with an
/// idempotency key, until `stop` or until the server stops answering. Returns what was
/// acknowledged and every status it saw.
async fn client(
    server: Arc<Server>,
    name: String,
    stop: Arc<AtomicBool>,
) -> (Vec<Acked>, Vec<u16>) {
    let mut acked = Vec::new();
    let mut statuses = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        // A capture, then two signals on the captured lead.
        let mut path = "/leads".to_owned();
        let mut body = lead(&format!("{name}n{n}"));
        for step in 0..3 {
            let key = format!("{name}-{n}-{step}");
            let sent = server
                .try_call(
                    Method::POST,
                    &path,
                    WRITER,
                    Some(&body),
                    &[("Idempotency-Key", &key)],
                )
                .await;
            let Ok(answer) = sent else {
                return (acked, statuses); // The server is gone.
            };
            statuses.push(answer.status);
            if !matches!(answer.status, 200 | 201) {
                break;
            }
            let id = answer.body["id"].as_str().unwrap_or_default().to_owned();
            acked.push(Acked {
                path,
                body,
                key,
                answer: answer.body,
            });
            path = format!("/leads/{id}/signals");
            body = json!({"kind": "email_click"});
        }
    }
    (acked, statuses)
}

/// Starts `clients` clients on the server.
fn start_load(
    server: &Arc<Server>,
    label: &str,
    clients: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(Vec<Acked>, Vec<u16>)>> {
    (0..clients)
        .map(|c| tokio::spawn(client(server.clone(), format!("{label}c{c}"), stop.clone())))
        .collect()
}

async fn collect(
    load: Vec<tokio::task::JoinHandle<(Vec<Acked>, Vec<u16>)>>,
) -> (Vec<Acked>, Vec<u16>) {
    let mut acked = Vec::new();
    let mut statuses = Vec::new();
    for task in load {
        let (a, s) = task.await.unwrap();
        acked.extend(a);
        statuses.extend(s);
    }
    (acked, statuses)
}

async fn head(server: &Server) -> u64 {
    server.read("/events?limit=1").await["head"]
        .as_u64()
        .unwrap()
}

/// Every acknowledged command's last event is in the log, where its answer said.
async fn assert_in_log(server: &Server, acked: &[Acked]) {
    for a in acked {
        let position = a.answer["position"].as_u64().unwrap();
        let page = server
            .read(&format!("/events?from_position={position}&limit=1"))
            .await;
        let event = &page["items"][0];
        assert_eq!(event["position"], position, "{a:?}");
        assert_eq!(event["version"], a.answer["version"], "{a:?}");
        let id = a.answer["id"].as_str().unwrap();
        assert_eq!(event["stream"], format!("lead-{id}"), "{a:?}");
    }
}

/// Every read model catches up with the log and equals a rebuild from position 0.
async fn assert_read_models_verify(server: &Server) {
    let head = head(server).await;
    server.read(&format!("/leads?min_position={head}")).await;
    server.read(&format!("/deals?min_position={head}")).await;
    for projection in ["lead_board", "deal_board", "account_360"] {
        let verified = server
            .admin(&format!("/admin/projections/{projection}/verify"))
            .await;
        assert_eq!(verified.status, 200, "{}", verified.body);
        assert_eq!(
            verified.body["equal"], true,
            "{projection}: {}",
            verified.body
        );
    }
}

async fn acknowledged_commands_survive_kill_9_and_their_retries_append_nothing(db: Arc<Fixture>) {
    let mut acked = Vec::new();
    // Several kill points: early, in the middle of things, later.
    for (round, kill_after) in [150, 400, 900].into_iter().enumerate() {
        let server = Arc::new(Server::start(db.url()));
        let stop = Arc::new(AtomicBool::new(false));
        let load = start_load(&server, &format!("r{round}"), 6, &stop);
        tokio::time::sleep(Duration::from_millis(kill_after)).await;
        server.kill();
        let (round_acked, statuses) = collect(load).await;
        assert!(
            statuses.iter().all(|s| matches!(s, 200 | 201)),
            "{statuses:?}"
        );
        eprintln!(
            "round {round}: {} acknowledged before the kill",
            round_acked.len()
        );
        acked.extend(round_acked);
    }
    assert!(
        acked.len() >= 10,
        "only {} commands got through",
        acked.len()
    );

    let server = Server::start(db.url());
    assert_in_log(&server, &acked).await;
    // Retrying every acknowledged command with its key appends nothing and answers the
    // same.
    let before = head(&server).await;
    for a in &acked {
        let again = server
            .call(
                Method::POST,
                &a.path,
                WRITER,
                Some(&a.body),
                &[("Idempotency-Key", &a.key)],
            )
            .await;
        assert!(matches!(again.status, 200 | 201), "{}", again.body);
        assert_eq!(again.body, a.answer);
    }
    assert_eq!(head(&server).await, before);
    assert_read_models_verify(&server).await;
    let audit = server.read("/admin/audit/verify").await;
    assert_eq!(audit["ok"], true, "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_connections_cut_under_load_fail_fast_and_recover() {
    run(Backend::Postgres, |db: Arc<Fixture>| async move {
        let server = Arc::new(Server::start(db.url()));
        let stop = Arc::new(AtomicBool::new(false));
        let load = start_load(&server, "cut", 6, &stop);
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Cut every connection the server holds, three times over a second.
        let database = db.database_name().unwrap().to_owned();
        for _ in 0..3 {
            let cut = terminate_backends(&database).await;
            assert!(cut > 0, "no connection was cut");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // The server recovers by itself: commands go through again within seconds.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let started = Instant::now();
            let answer = server.post("/leads", lead("after")).await;
            // Failing is allowed while it recovers, but fast and as a 503.
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "a request hung for {:?}",
                started.elapsed()
            );
            if answer.status == 201 {
                break;
            }
            assert_eq!(answer.status, 503, "{}", answer.body);
            assert!(Instant::now() < deadline, "the server did not recover");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let (acked, statuses) = collect(load).await;
        let refused = statuses.iter().filter(|s| **s == 503).count();
        eprintln!("{} acknowledged, {refused} refused with 503", acked.len());
        assert!(
            statuses.iter().all(|s| matches!(s, 200 | 201 | 503)),
            "{statuses:?}"
        );
        assert!(!acked.is_empty());
        assert_in_log(&server, &acked).await;
        assert_read_models_verify(&server).await;
    })
    .await;
}

/// Terminates every connection to the database but this one; returns how many.
async fn terminate_backends(database: &str) -> u64 {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(&crate::database::admin_url())
        .await
        .unwrap();
    let cut: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
          WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(database)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    cut.into_iter().filter(|c| *c).count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_projections_move_to_the_other_server_when_one_is_killed() {
    run(Backend::Postgres, |db: Arc<Fixture>| async move {
        let first = Arc::new(Server::start(db.url()));
        let holds = |server: &Server, projection: &str| {
            let taken = format!("lease taken; running projection=\"{projection}\"");
            strip_ansi(&server.logs()).contains(&taken)
        };
        let projections = ["lead_board", "deal_board", "account_360"];
        // The first server takes every projection's lease just after it is ready.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !projections.iter().all(|p| holds(&first, p)) {
            assert!(Instant::now() < deadline, "{}", first.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let second = Arc::new(Server::start_with(
            db.url(),
            &[
                ("ANNALS_API_TOKENS", TOKENS),
                ("ANNALS_CONSISTENCY_WAIT_MS", "10000"),
            ],
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        for projection in projections {
            assert!(!holds(&second, projection), "{}", second.logs());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut load = start_load(&first, "a", 3, &stop);
        load.extend(start_load(&second, "b", 3, &stop));
        tokio::time::sleep(Duration::from_millis(500)).await;
        first.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Relaxed);
        let (acked, _) = collect(load).await;

        // Within 10 seconds the second server applies new events to every read model.
        let killed = Instant::now();
        let account = second
            .command("/accounts", json!({"name": "After the kill"}))
            .await;
        let position = account["position"].as_u64().unwrap();
        let id = account["id"].as_str().unwrap();
        let view = second
            .get(&format!("/accounts/{id}?min_position={position}"))
            .await;
        assert_eq!(view.status, 200, "{}\n{}", view.body, second.logs());
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "{:?}",
            killed.elapsed()
        );
        assert_in_log(&second, &acked).await;
        assert_read_models_verify(&second).await;
    })
    .await;
}

fn strip_ansi(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for end in chars.by_ref() {
                if end.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// A `LeadCaptured` event as the domain writes it.
fn captured(id: uuid::Uuid) -> NewEvent {
    let stored = LeadEvent::LeadCaptured {
        lead_id: id,
        email: Email::parse(&format!("held.{}@example.com", id.simple())).unwrap(),
        name: PersonName::parse("Held").unwrap(),
        company: None,
        source: Source::Partner,
    }
    .encode();
    NewEvent::new(stored.event_type, stored.data).with_schema_version(stored.schema_version)
}

async fn a_poisoned_event_is_parked_and_the_rest_keeps_serving(db: Arc<Fixture>) {
    let server = Server::start(db.url());
    let before = server.command("/leads", lead("ada")).await;
    // A writer that bypassed the domain left an event no projector can read.
    let poisoned = uuid::Uuid::now_v7();
    db.store()
        .append(AppendRequest::new(
            StreamName::parse(format!("lead-{poisoned}")).unwrap(),
            ExpectedVersion::NoStream,
            vec![NewEvent::new("LeadCaptured", json!({"bogus": true})).with_schema_version(2)],
        ))
        .await
        .unwrap();
    // The lead board parks it and halts before it; it says so.
    let deadline = Instant::now() + Duration::from_secs(20);
    let board = loop {
        let status = server.read("/admin/projections").await;
        let board = status["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "lead_board")
            .unwrap()
            .clone();
        if board["status"] == "halted" {
            break board;
        }
        assert!(Instant::now() < deadline, "never halted: {board}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        board["last_error"].as_str().unwrap().contains("position 2"),
        "{board}"
    );
    // Everything else keeps serving: commands, the other read models, the stale board.
    let account = server
        .command("/accounts", json!({"name": "Initech"}))
        .await;
    let deal = server
        .command(
            "/deals",
            json!({"account_id": account["id"], "name": "Engines",
                   "amount": {"currency": "EUR", "amount_minor": 100}}),
        )
        .await;
    let position = deal["position"].as_u64().unwrap();
    let deals = server
        .read(&format!("/deals?min_position={position}"))
        .await;
    assert_eq!(deals["items"].as_array().unwrap().len(), 1);
    let stale = server.read("/leads").await;
    assert_eq!(stale["items"][0]["id"], before["id"]);
    let lagging = server.get(&format!("/leads?min_position={position}")).await;
    assert_eq!(
        (lagging.status, lagging.code()),
        (503, "projection-lagging")
    );
    let ready = server.get("/health/ready").await;
    assert_eq!(ready.status, 200);
}

async fn a_transaction_held_open_during_appends_is_never_skipped(db: Arc<Fixture>) {
    let server = Arc::new(Server::start(db.url()));
    server.command("/leads", lead("first")).await;
    // Another writer opens its append and holds it uncommitted.
    let held_id = uuid::Uuid::now_v7();
    let held = db
        .hold_append(AppendRequest::new(
            StreamName::parse(format!("lead-{held_id}")).unwrap(),
            ExpectedVersion::NoStream,
            vec![captured(held_id)],
        ))
        .await;
    // Meanwhile the server takes commands (they wait for the writers' lock).
    let writers: Vec<_> = (0..3)
        .map(|n| {
            let server = server.clone();
            tokio::spawn(async move { server.post("/leads", lead(&format!("during{n}"))).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outcome = held.commit().await.unwrap();
    let mut positions = vec![outcome.last_position()];
    for writer in writers {
        let answer = writer.await.unwrap();
        assert_eq!(answer.status, 201, "{}", answer.body);
        positions.push(answer.body["position"].as_u64().unwrap());
    }
    let highest = *positions.iter().max().unwrap();
    let board = server
        .read(&format!("/leads?min_position={highest}&limit=500"))
        .await;
    let ids: Vec<&str> = board["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 5, "{board}");
    assert!(
        ids.contains(&held_id.to_string().as_str()),
        "the held lead was skipped"
    );
    assert_read_models_verify(&server).await;
}
