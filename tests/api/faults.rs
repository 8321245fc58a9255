//! The server under faults, on loopback and bounded in time: killed with SIGKILL under
//! load and inside a command's write, its PostgreSQL connections cut, one of two servers
//! killed, one of two servers frozen (SIGSTOP) holding the order saga's lease while the
//! other takes a payment and its cancellation, the lease holder frozen under load and
//! taken over once its leases expire, a poisoned event, a transaction held open during
//! appends. Nothing acknowledged
//! is ever lost, no command is applied twice however often it is retried, no request
//! hangs, and the read models verify equal afterwards.
//!
//! Each test waits for a signal (commands acknowledged, a session waiting on a lock, a
//! key in use, a line in the server's log), never for a fixed time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use annals_domain::Event;
use annals_domain::lead::LeadEvent;
use annals_domain::values::{Email, PersonName, Source};
use annals_store::{AppendRequest, Direction, ExpectedVersion, LogFilter, NewEvent, StreamName};
use reqwest::Method;
use serde_json::{Value, json};

use crate::database::{Backend, Fixture, run};
use crate::server::{Answer, Server, TOKENS, WRITER, lead, qualified_lead, strip_ansi, won_deal};

on_both_backends!(
    acknowledged_commands_survive_kill_9_and_no_command_sent_appends_twice,
    conversions_open_each_account_and_deal_once_across_kill_9,
    a_command_in_flight_at_kill_9_appends_once_when_retried,
    a_poisoned_event_is_parked_and_the_rest_keeps_serving,
    a_transaction_held_open_during_appends_is_never_skipped,
);

/// The longest a request may take under these faults: far above what one takes
/// (milliseconds), far below the 30 s a client would wait. A request past it has hung.
const HUNG: Duration = Duration::from_secs(5);

/// The `application_name` of the server's PostgreSQL sessions (the store's default; the
/// test's own stores name theirs `annals-test`).
const SERVER_SESSIONS: &str = annals_store::postgres::APPLICATION_NAME;

/// A command a client sent: what, with which key (also its correlation id, so its
/// events can be found in the log), and the answer, if one came.
#[derive(Debug, Clone)]
struct Sent {
    path: String,
    body: Value,
    key: String,
    answer: Option<Answer>,
}

impl Sent {
    fn acknowledged(&self) -> bool {
        self.answer
            .as_ref()
            .is_some_and(|a| matches!(a.status, 200 | 201))
    }
}

/// What a load's clients sent and saw, shared while they run.
#[derive(Debug, Default)]
struct Seen {
    sent: Mutex<Vec<Sent>>,
    /// Every status, in the order the answers came.
    statuses: Mutex<Vec<u16>>,
    /// Requests that got no answer: the connection broke, or `HUNG` passed.
    unanswered: Mutex<Vec<String>>,
}

impl Seen {
    fn sending(&self, path: &str, body: &Value, key: &str) -> usize {
        let mut sent = self.sent.lock().unwrap();
        sent.push(Sent {
            path: path.to_owned(),
            body: body.clone(),
            key: key.to_owned(),
            answer: None,
        });
        sent.len() - 1
    }

    fn answered(&self, index: usize, answer: Answer) {
        self.statuses.lock().unwrap().push(answer.status);
        self.sent.lock().unwrap()[index].answer = Some(answer);
    }

    fn sent(&self) -> Vec<Sent> {
        self.sent.lock().unwrap().clone()
    }

    fn statuses(&self) -> Vec<u16> {
        self.statuses.lock().unwrap().clone()
    }

    fn unanswered(&self) -> Vec<String> {
        self.unanswered.lock().unwrap().clone()
    }

    fn acknowledged(&self) -> usize {
        self.statuses()
            .iter()
            .filter(|s| matches!(s, 200 | 201))
            .count()
    }
}

/// A command with an idempotency key, sent as a client sends it: the key also names the
/// request (`Correlation-Id`), so the events it appended carry it.
async fn send(server: &Server, path: &str, body: &Value, key: &str) -> Result<Answer, String> {
    let started = Instant::now();
    let headers = [("Idempotency-Key", key), ("Correlation-Id", key)];
    let call = server.try_call(Method::POST, path, WRITER, Some(body), &headers);
    match tokio::time::timeout(HUNG, call).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(error)) => Err(format!(
            "POST {path} ({key}): no answer, after {:?}: {error}",
            started.elapsed()
        )),
        Err(_) => Err(format!("POST {path} ({key}): no answer within {HUNG:?}")),
    }
}

/// One client: captures leads and records signals on them, every command with an
/// idempotency key, until `stop`, or until a request gets no answer (the server was
/// killed, or the request hung: `Seen::unanswered` says which).
async fn client(server: Arc<Server>, name: String, stop: Arc<AtomicBool>, seen: Arc<Seen>) {
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        // A capture, then two signals on the captured lead.
        let mut path = "/leads".to_owned();
        let mut body = lead(&format!("{name}n{n}"));
        for step in 0..3 {
            let key = format!("{name}-{n}-{step}");
            let index = seen.sending(&path, &body, &key);
            let answer = match send(&server, &path, &body, &key).await {
                Ok(answer) => answer,
                Err(unanswered) => {
                    seen.unanswered.lock().unwrap().push(unanswered);
                    return;
                }
            };
            let carried_out = matches!(answer.status, 200 | 201);
            let id = answer.body["id"].as_str().unwrap_or_default().to_owned();
            seen.answered(index, answer);
            if !carried_out {
                break;
            }
            path = format!("/leads/{id}/signals");
            body = json!({"kind": "email_click"});
        }
    }
}

/// Starts `clients` clients on the server.
fn start_load(
    server: &Arc<Server>,
    label: &str,
    clients: usize,
    stop: &Arc<AtomicBool>,
    seen: &Arc<Seen>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|c| {
            tokio::spawn(client(
                server.clone(),
                format!("{label}c{c}"),
                stop.clone(),
                seen.clone(),
            ))
        })
        .collect()
}

async fn finish(load: Vec<tokio::task::JoinHandle<()>>) {
    for task in load {
        task.await.unwrap();
    }
}

/// Polls `condition` until it holds, for at most 30 s: how these tests wait for a signal.
async fn until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn head(server: &Server) -> u64 {
    server.read("/events?limit=1").await["head"]
        .as_u64()
        .unwrap()
}

/// Every acknowledged command's last event is in the log, where its answer said.
async fn assert_in_log(server: &Server, acked: &[&Sent]) {
    for a in acked {
        let answer = &a.answer.as_ref().unwrap().body;
        let position = answer["position"].as_u64().unwrap();
        let page = server
            .read(&format!("/events?from_position={position}&limit=1"))
            .await;
        let event = &page["items"][0];
        assert_eq!(event["position"], position, "{a:?}");
        assert_eq!(event["version"], answer["version"], "{a:?}");
        let id = answer["id"].as_str().unwrap();
        assert_eq!(event["stream"], format!("lead-{id}"), "{a:?}");
    }
}

/// Each command appended exactly one event over all its tries (one event carries its
/// correlation id), and the log holds nothing else.
async fn assert_each_appended_once(db: &Fixture, sent: &[Sent]) {
    let store = db.store();
    let mut by_command: HashMap<String, Vec<u64>> = HashMap::new();
    let mut from = 1;
    loop {
        let page = store
            .read_all(from, 1_000, &LogFilter::all())
            .await
            .unwrap();
        for event in &page.events {
            let command = event.metadata.correlation_id.clone().unwrap_or_default();
            by_command.entry(command).or_default().push(event.position);
        }
        if page.events.is_empty() {
            break;
        }
        from = page.next_position;
    }
    for s in sent {
        let positions = by_command.remove(&s.key).unwrap_or_default();
        assert_eq!(
            positions.len(),
            1,
            "{} appended at positions {positions:?} over its tries",
            s.key
        );
    }
    assert!(
        by_command.is_empty(),
        "events no command sent: {by_command:?}"
    );
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

async fn acknowledged_commands_survive_kill_9_and_no_command_sent_appends_twice(db: Arc<Fixture>) {
    let seen = Arc::new(Seen::default());
    // Several kill points, by the commands acknowledged in the round: early, in the middle
    // of things, later.
    for (round, kill_after) in [10, 40, 100].into_iter().enumerate() {
        let server = Arc::new(Server::start(db.url()));
        let stop = Arc::new(AtomicBool::new(false));
        let before = seen.acknowledged();
        let load = start_load(&server, &format!("r{round}"), 6, &stop, &seen);
        until(&format!("{kill_after} commands are acknowledged"), || {
            seen.acknowledged() >= before + kill_after
        })
        .await;
        server.kill();
        finish(load).await;
    }
    let sent = seen.sent();
    let statuses = seen.statuses();
    assert!(
        statuses.iter().all(|s| matches!(s, 200 | 201)),
        "{statuses:?}"
    );
    let in_flight = sent.iter().filter(|s| s.answer.is_none()).count();
    eprintln!(
        "{} commands sent, {in_flight} in flight at the kills",
        sent.len()
    );

    let server = Server::start(db.url());
    let acked: Vec<&Sent> = sent.iter().filter(|s| s.acknowledged()).collect();
    assert_in_log(&server, &acked).await;
    // Every command sent is retried with its key, acknowledged or in flight when its server
    // was killed: each is carried out, and one acknowledged answers as it did.
    for s in &sent {
        let again = send(&server, &s.path, &s.body, &s.key).await.unwrap();
        assert!(
            matches!(again.status, 200 | 201),
            "{}: {}",
            s.key,
            again.body
        );
        if let Some(answer) = &s.answer {
            assert_eq!(again.body, answer.body, "{}", s.key);
        }
    }
    // Over all its tries, each appended once.
    assert_each_appended_once(&db, &sent).await;
    assert_read_models_verify(&server).await;
    let audit = server.read("/admin/audit/verify").await;
    assert_eq!(audit["ok"], true, "{audit}");
}

/// The advisory lock the gate on idempotency records waits for (a number the store does
/// not use).
const GATE: i64 = 4242;

/// A server killed inside a command's write, at the last step before the commit that
/// acknowledges it (the write of its idempotency record), then the command retried with
/// its key: it appends once in all. On PostgreSQL a trigger makes the record's write
/// wait for a lock the test holds, and the server is killed while its session waits
/// there (its sessions then end, as they do when their process is gone). SQLite cannot
/// make a write wait for another process, so there the record's write fails instead, and
/// the server is killed after answering 5xx: the command was not acknowledged either way.
async fn a_command_in_flight_at_kill_9_appends_once_when_retried(db: Arc<Fixture>) {
    use sqlx::Connection;
    let server = Arc::new(Server::start(db.url()));
    let id = server.command("/leads", lead("inflight")).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/leads/{id}/signals");
    let body = json!({"kind": "email_click"});
    let key = "in-flight-at-the-kill";
    match db.backend() {
        Backend::Postgres => {
            let mut gate = sqlx::PgConnection::connect(db.url()).await.unwrap();
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(GATE)
                .execute(&mut gate)
                .await
                .unwrap();
            db.execute(&format!(
                "CREATE FUNCTION annals_test_gate() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN PERFORM pg_advisory_xact_lock_shared({GATE}); RETURN NEW; END $$"
            ))
            .await;
            db.execute(
                "CREATE TRIGGER annals_test_gate BEFORE INSERT ON idempotency_keys \
                 FOR EACH ROW EXECUTE FUNCTION annals_test_gate()",
            )
            .await;
            let command = {
                let (server, path, body) = (server.clone(), path.clone(), body.clone());
                tokio::spawn(async move { send(&server, &path, &body, key).await })
            };
            // The server's session waits at the gate, inside the command's write.
            let deadline = Instant::now() + Duration::from_secs(30);
            let database = db.database_name().unwrap();
            loop {
                if waiting_for_advisory_locks(database, Some(GATE)).await > 0 {
                    break;
                }
                assert!(!command.is_finished(), "{:?}", command.await.unwrap());
                assert!(
                    Instant::now() < deadline,
                    "the write never reached the gate"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            server.kill();
            assert!(command.await.unwrap().is_err(), "the command was answered");
            let ended = end_sessions(db.database_name().unwrap(), SERVER_SESSIONS).await;
            assert!(
                ended > 0,
                "the killed server's waiting session was not found"
            );
            gate.close().await.unwrap();
            db.execute("DROP TRIGGER annals_test_gate ON idempotency_keys")
                .await;
            db.execute("DROP FUNCTION annals_test_gate()").await;
        }
        Backend::Sqlite => {
            db.execute(
                "CREATE TRIGGER annals_test_fail BEFORE INSERT ON idempotency_keys \
                 BEGIN SELECT RAISE(ABORT, 'the disk failed'); END",
            )
            .await;
            let answer = send(&server, &path, &body, key).await.unwrap();
            assert!(answer.status >= 500, "{}", answer.body);
            server.kill();
            db.execute("DROP TRIGGER annals_test_fail").await;
        }
    }

    let server = Server::start(db.url());
    let again = send(&server, &path, &body, key).await.unwrap();
    assert_eq!(again.status, 200, "{}", again.body);
    let events = db
        .store()
        .read_stream(
            &StreamName::parse(format!("lead-{id}")).unwrap(),
            1,
            Direction::Forwards,
            100,
        )
        .await
        .unwrap();
    let appended: Vec<u64> = events
        .iter()
        .filter(|e| e.metadata.correlation_id.as_deref() == Some(key))
        .map(|e| e.version)
        .collect();
    assert_eq!(
        appended,
        vec![2],
        "the command appended at versions {appended:?} over its tries"
    );
    assert_eq!(again.body["version"], 2, "{}", again.body);
    assert_read_models_verify(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_connections_cut_under_load_fail_fast_as_503_and_recover() {
    run(Backend::Postgres, |db: Arc<Fixture>| async move {
        let server = Arc::new(Server::start(db.url()));
        let seen = Arc::new(Seen::default());
        let stop = Arc::new(AtomicBool::new(false));
        let load = start_load(&server, "cut", 6, &stop, &seen);
        until("commands go through", || seen.acknowledged() >= 20).await;
        let database = db.database_name().unwrap().to_owned();
        for cut in 0..3 {
            // Cut the server's sessions, and only those (not the test's own).
            let answered = seen.statuses().len();
            let ended = end_sessions(&database, SERVER_SESSIONS).await;
            assert!(ended > 0, "cut {cut}: the server had no session to cut");
            // A command caught by the cut fails at once, as a 503; none hangs.
            until(&format!("a command caught by cut {cut} is refused"), || {
                !seen.unanswered().is_empty()
                    || seen.statuses()[answered..]
                        .iter()
                        .any(|s| !matches!(s, 200 | 201))
            })
            .await;
            assert_eq!(
                seen.unanswered(),
                Vec::<String>::new(),
                "cut {cut}: requests hung"
            );
            let since = seen.statuses()[answered..].to_vec();
            assert!(
                since.contains(&503) && since.iter().all(|s| matches!(s, 200 | 201 | 503)),
                "cut {cut}: {since:?}"
            );
            // The server recovers by itself: a command sent now goes through (so its
            // writer has a live session again before the next cut).
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let answer = send(
                    &server,
                    "/leads",
                    &lead("after"),
                    &format!("after-{cut}-{}", uuid::Uuid::new_v4()),
                )
                .await
                .unwrap();
                if answer.status == 201 {
                    break;
                }
                assert_eq!(answer.status, 503, "{}", answer.body);
                assert!(Instant::now() < deadline, "the server did not recover");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        stop.store(true, Ordering::Relaxed);
        finish(load).await;
        assert_eq!(seen.unanswered(), Vec::<String>::new());
        let statuses = seen.statuses();
        let refused = statuses.iter().filter(|s| **s == 503).count();
        assert!(
            statuses.iter().all(|s| matches!(s, 200 | 201 | 503)),
            "{statuses:?}"
        );
        let sent = seen.sent();
        let acked: Vec<&Sent> = sent.iter().filter(|s| s.acknowledged()).collect();
        eprintln!("{} acknowledged, {refused} refused with 503", acked.len());
        assert_in_log(&server, &acked).await;
        assert_read_models_verify(&server).await;
    })
    .await;
}

/// How many of the server's sessions wait for an advisory lock (`key`, or any).
async fn waiting_for_advisory_locks(database: &str, key: Option<i64>) -> i64 {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(&crate::database::admin_url())
        .await
        .unwrap();
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
          WHERE a.datname = $1 AND a.application_name = $2 \
            AND l.locktype = 'advisory' AND NOT l.granted \
            AND ($3::bigint IS NULL OR l.objid = $3::bigint)",
    )
    .bind(database)
    .bind(SERVER_SESSIONS)
    .bind(key)
    .fetch_one(&mut admin)
    .await
    .unwrap()
}

/// Ends every session on the database whose `application_name` is `name`, waiting (10 s
/// at most) for each to be gone; returns how many ended.
async fn end_sessions(database: &str, name: &str) -> u64 {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(&crate::database::admin_url())
        .await
        .unwrap();
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity \
          WHERE datname = $1 AND application_name = $2",
    )
    .bind(database)
    .bind(name)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    ended.into_iter().filter(|e| *e).count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_projections_move_to_the_other_server_when_one_is_killed() {
    run(Backend::Postgres, |db: Arc<Fixture>| async move {
        let first = Arc::new(Server::start(db.url()));
        let holds = |server: &Server, projection: &str| {
            let taken = format!("lease taken; running consumer=\"{projection}\"");
            strip_ansi(&server.logs()).contains(&taken)
        };
        // The read models and the conversion process: every consumer's lease moves.
        let projections = [
            "lead_board",
            "deal_board",
            "account_360",
            "lead_conversion",
            "order_saga",
        ];
        // The first server takes every consumer's lease just after it is ready.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !projections.iter().all(|p| holds(&first, p)) {
            assert!(Instant::now() < deadline, "{}", first.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The second server stands by: it looks for each lease (its log says so at debug
        // level) and finds it taken.
        let second = Arc::new(Server::start_with(
            db.url(),
            &[
                ("ANNALS_API_TOKENS", TOKENS),
                ("ANNALS_CONSISTENCY_WAIT_MS", "10000"),
                ("RUST_LOG", "info,sqlx=warn,annals_engine=debug"),
            ],
        ));
        let stands_by = |projection: &str| {
            let standing = format!("lease held elsewhere; standing by consumer=\"{projection}\"");
            strip_ansi(&second.logs()).contains(&standing)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for projection in projections {
                assert!(
                    !holds(&second, projection),
                    "the second server took {projection} from the first:\n{}",
                    second.logs()
                );
            }
            if projections.iter().all(|p| stands_by(p)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the second server never looked for the leases:\n{}",
                second.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (seen_first, seen_second) = (Arc::new(Seen::default()), Arc::new(Seen::default()));
        let mut load = start_load(&first, "a", 3, &stop, &seen_first);
        load.extend(start_load(&second, "b", 3, &stop, &seen_second));
        until("both servers take commands", || {
            seen_first.acknowledged() >= 10 && seen_second.acknowledged() >= 10
        })
        .await;
        first.kill();
        // The second server goes on taking commands after the kill.
        let before = seen_second.acknowledged();
        until("the second server takes commands after the kill", || {
            seen_second.acknowledged() >= before + 10
        })
        .await;
        stop.store(true, Ordering::Relaxed);
        finish(load).await;
        assert_eq!(seen_second.unanswered(), Vec::<String>::new());
        let sent: Vec<Sent> = seen_first
            .sent()
            .into_iter()
            .chain(seen_second.sent())
            .collect();
        let acked: Vec<&Sent> = sent.iter().filter(|s| s.acknowledged()).collect();

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
        // And the conversion process: a conversion's deal is opened.
        let lead = qualified_lead(&second, "after-the-kill").await;
        let converted = second
            .command(
                &format!("/leads/{lead}/convert"),
                json!({"deal_name": "Engines", "amount": {"currency": "EUR", "amount_minor": 100}}),
            )
            .await;
        let deal = converted["deal_id"].as_str().unwrap().to_owned();
        loop {
            if second.get(&format!("/deals/{deal}/history")).await.status == 200 {
                break;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(10),
                "the deal was not opened within 10 s of the kill:\n{}",
                second.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // And the order saga: an order placed and paid on the survivor is fulfilled.
        let won = second
            .command(
                "/deals",
                json!({"account_id": account["id"], "name": "Saga",
                       "amount": {"currency": "EUR", "amount_minor": 100}}),
            )
            .await;
        let deal = won["id"].as_str().unwrap();
        second
            .command(&format!("/deals/{deal}/win"), json!({}))
            .await;
        let order = second
            .command(
                "/orders",
                json!({"deal_id": deal, "lines": [{"sku": "S", "quantity": 1,
                       "unit_price": {"currency": "EUR", "amount_minor": 100}}]}),
            )
            .await;
        let order = order["id"].as_str().unwrap().to_owned();
        let history = format!("/orders/{order}/history");
        let mut paid = false;
        loop {
            let state = second.get(&history).await.body["state"]["status"].clone();
            if state == "invoiced" && !paid {
                second
                    .command(
                        &format!("/orders/{order}/pay"),
                        json!({"amount": {"currency": "EUR", "amount_minor": 100}}),
                    )
                    .await;
                paid = true;
            }
            if state == "fulfilled" {
                break;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(20),
                "the saga did not finish on the survivor: {state}\n{}",
                second.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_in_log(&second, &acked).await;
        assert_read_models_verify(&second).await;
    })
    .await;
}

/// A `LeadCaptured` event as the domain writes it.
fn captured(id: uuid::Uuid) -> NewEvent {
    let stored = LeadEvent::LeadCaptured {
        lead_id: id,
        email: Some(Email::parse(&format!("held.{}@example.com", id.simple())).unwrap()),
        name: Some(PersonName::parse("Held").unwrap()),
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
    // Meanwhile the server takes commands (they wait for the writers' lock), each with a
    // key, sent again while the server says the key is in use (a probe below may hold it).
    let keys: Vec<String> = (0..3).map(|n| format!("during{n}")).collect();
    let writers: Vec<_> = keys
        .iter()
        .map(|key| {
            let (server, key) = (server.clone(), key.clone());
            tokio::spawn(async move {
                let body = lead(&key);
                loop {
                    let answer = server
                        .call(
                            Method::POST,
                            "/leads",
                            WRITER,
                            Some(&body),
                            &[("Idempotency-Key", &key)],
                        )
                        .await;
                    if answer.code() != "idempotency-key-in-use" {
                        return (answer, Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();
    // Each command is pending while the transaction is held: the server is carrying it
    // out (its key is in use) and has not answered. The probe, a signal on no lead with
    // the same key, finds the key in use, or else nothing to do (404) and takes nothing.
    for key in &keys {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let nobody = uuid::Uuid::now_v7();
            let probe = server
                .call(
                    Method::POST,
                    &format!("/leads/{nobody}/signals"),
                    WRITER,
                    Some(&json!({"kind": "page_view"})),
                    &[("Idempotency-Key", key)],
                )
                .await;
            if probe.code() == "idempotency-key-in-use" {
                break;
            }
            assert_eq!(
                (probe.status, probe.code()),
                (404, "lead-not-found"),
                "the command with key {key} was carried out while the transaction was held"
            );
            assert!(Instant::now() < deadline, "the command {key} never arrived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // They wait for the writers' lock, which the held transaction has: it is still open
    // (its event is not to be seen), and no append commits before it does. On PostgreSQL
    // the server also says so: its writer's session waits for that lock.
    let held_stream = StreamName::parse(format!("lead-{held_id}")).unwrap();
    let seen_held = db
        .store()
        .read_stream(&held_stream, 1, Direction::Forwards, 10)
        .await
        .unwrap();
    assert!(
        seen_held.is_empty(),
        "the held append is not held: {seen_held:?}"
    );
    if let Some(database) = db.database_name() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while waiting_for_advisory_locks(database, None).await == 0 {
            assert!(
                Instant::now() < deadline,
                "the server's writer never waited for the writers' lock"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    for writer in &writers {
        assert!(
            !writer.is_finished(),
            "a command was answered while the transaction was held"
        );
    }
    let committing = Instant::now();
    let outcome = held.commit().await.unwrap();
    let mut positions = vec![outcome.last_position()];
    for writer in writers {
        let (answer, answered) = writer.await.unwrap();
        assert!(
            answered > committing,
            "a command was answered before the held transaction committed"
        );
        assert_eq!(answer.status, 201, "{}", answer.body);
        let position = answer.body["position"].as_u64().unwrap();
        assert!(
            position > outcome.last_position(),
            "a command committed at {position}, before the held append's {}",
            outcome.last_position()
        );
        positions.push(position);
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

/// The conversion process under kill -9 at several points: leads are converted one after
/// another while the server is killed after the 2nd, the 5th and the 9th conversion of a
/// round is acknowledged (the process acting on the latest ones, or about to), and
/// started again. In the end every conversion opened its account and its deal, each
/// exactly once.
async fn conversions_open_each_account_and_deal_once_across_kill_9(db: Arc<Fixture>) {
    for kill_after in [2, 5, 9] {
        let server = Server::start(db.url());
        for n in 0..kill_after {
            let lead = qualified_lead(&server, &format!("k{kill_after}-{n}")).await;
            server
                .command(
                    &format!("/leads/{lead}/convert"),
                    json!({"deal_name": "Engines", "amount": {"currency": "EUR", "amount_minor": 100}}),
                )
                .await;
        }
        server.kill();
    }
    let server = Server::start(db.url());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = server.read("/admin/consumers").await;
        let process = all["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "lead_conversion")
            .unwrap()
            .clone();
        if process["lag"] == 0 {
            assert_eq!(process["parked"], 0, "{process}");
            break;
        }
        assert!(Instant::now() < deadline, "{process}\n{}", server.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let count = |event_type: &'static str| {
        let db = db.clone();
        async move {
            db.store()
                .read_all(
                    1,
                    100_000,
                    &annals_store::LogFilter::event_types([event_type]),
                )
                .await
                .unwrap()
                .events
        }
    };
    let conversions = count("LeadConverted").await;
    assert_eq!(conversions.len(), 2 + 5 + 9);
    let (accounts, deals) = (count("AccountOpened").await, count("DealOpened").await);
    assert_eq!((accounts.len(), deals.len()), (16, 16), "each opened once");
    for conversion in &conversions {
        let deal = conversion.data["deal_id"].as_str().unwrap();
        assert_eq!(
            deals
                .iter()
                .filter(|d| d.stream == format!("deal-{deal}"))
                .count(),
            1,
            "{deal}"
        );
    }
    assert_read_models_verify(&server).await;
}

/// Two servers on one PostgreSQL; the first runs the order saga. Orders are placed and
/// paid through the second, and the first is killed -9 the moment the last payment is
/// acknowledged, mid-saga (the payments not yet all taken). The second takes the saga's
/// lease over and finishes every order: fulfilled once, one subscription each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_saga_cut_short_by_kill_9_is_finished_by_the_other_server() {
    run(Backend::Postgres, |db: Arc<Fixture>| async move {
        let first = Server::start(db.url());
        let taken = "lease taken; running consumer=\"order_saga\"";
        let deadline = Instant::now() + Duration::from_secs(10);
        while !strip_ansi(&first.logs()).contains(taken) {
            assert!(Instant::now() < deadline, "{}", first.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let second = Server::start(db.url());
        let deal = won_deal(&second).await;
        let mut orders = Vec::new();
        for _ in 0..6 {
            let order = second
                .command(
                    "/orders",
                    json!({"deal_id": deal, "lines": [{"sku": "S", "quantity": 1,
                           "unit_price": {"currency": "EUR", "amount_minor": 100},
                           "recurring": true}]}),
                )
                .await;
            orders.push(order["id"].as_str().unwrap().to_owned());
        }
        // Each invoiced by the first server's saga, then all paid at once.
        for order in &orders {
            let deadline = Instant::now() + Duration::from_secs(20);
            while second.get(&format!("/orders/{order}/history")).await.body["state"]["status"]
                != "invoiced"
            {
                assert!(Instant::now() < deadline, "{}", first.logs());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        for order in &orders {
            second
                .command(
                    &format!("/orders/{order}/pay"),
                    json!({"amount": {"currency": "EUR", "amount_minor": 100}}),
                )
                .await;
        }
        first.kill();
        let killed = Instant::now();
        for order in &orders {
            loop {
                let state =
                    second.get(&format!("/orders/{order}/history")).await.body["state"]["status"]
                        .clone();
                if state == "fulfilled" {
                    break;
                }
                assert!(
                    killed.elapsed() < Duration::from_secs(20),
                    "{order} is {state}:\n{}",
                    second.logs()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let count = |event_type: &'static str| {
            let db = db.clone();
            async move {
                db.store()
                    .read_all(
                        1,
                        100_000,
                        &annals_store::LogFilter::event_types([event_type]),
                    )
                    .await
                    .unwrap()
                    .events
                    .len()
            }
        };
        assert_eq!(count("OrderInvoiced").await, orders.len());
        assert_eq!(count("SubscriptionStarted").await, orders.len(), "one each");
        assert_eq!(count("OrderFulfilled").await, orders.len(), "once each");
        assert_read_models_verify(&second).await;
    })
    .await;
}

/// Two servers on one PostgreSQL, with a lease life (60 s) far longer than the test; the
/// first runs the order saga and invoices an order, then is frozen (SIGSTOP: its lease on
/// the saga lives on, so the second does not take it over while the test runs). Through
/// the second the order is paid, then cancelled before any saga took the payment: the
/// cancel answers the refund with it. Thawed, the first server's saga takes the payment,
/// finds the order cancelled, and starts and fulfils nothing; a payment after that is
/// refused (409), and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_an_order_cancelled_after_payment_while_the_saga_waits_is_refunded() {
    run(Backend::Postgres, |db: Arc<Fixture>| async move {
        let settings = [("ANNALS_API_TOKENS", TOKENS), ("ANNALS_LEASE_TTL", "60s")];
        let first = Server::start_with(db.url(), &settings);
        let taken = "lease taken; running consumer=\"order_saga\"";
        let deadline = Instant::now() + Duration::from_secs(10);
        while !strip_ansi(&first.logs()).contains(taken) {
            assert!(Instant::now() < deadline, "{}", first.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let second = Server::start_with(db.url(), &settings);
        let deal = won_deal(&second).await;
        let order = second
            .command(
                "/orders",
                json!({"deal_id": deal, "lines": [{"sku": "S", "quantity": 1,
                       "unit_price": {"currency": "EUR", "amount_minor": 100},
                       "recurring": true}]}),
            )
            .await;
        let order = order["id"].as_str().unwrap().to_owned();
        let history = format!("/orders/{order}/history");
        let deadline = Instant::now() + Duration::from_secs(20);
        while second.get(&history).await.body["state"]["status"] != "invoiced" {
            assert!(Instant::now() < deadline, "{}", first.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        first.freeze();
        let paid = second
            .command(
                &format!("/orders/{order}/pay"),
                json!({"amount": {"currency": "EUR", "amount_minor": 100}}),
            )
            .await;
        let cancelled = second
            .command(
                &format!("/orders/{order}/cancel"),
                json!({"reason": "changed our mind"}),
            )
            .await;
        assert_eq!(
            cancelled["events"],
            json!(["OrderCancelled", "PaymentRefunded"]),
            "the cancel of a paid order refunds it"
        );
        first.thaw();

        // The saga has read past the payment (on whichever server holds it now).
        let payment = paid["position"].as_u64().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let all = second.read("/admin/consumers").await;
            let saga = all["items"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == "order_saga")
                .unwrap()
                .clone();
            if saga["checkpoint"].as_u64().unwrap() >= payment {
                assert_eq!(saga["parked"], 0, "{saga}");
                break;
            }
            assert!(Instant::now() < deadline, "{saga}\n{}", first.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let count = |event_type: &'static str| {
            let db = db.clone();
            async move {
                db.store()
                    .read_all(1, 100_000, &LogFilter::event_types([event_type]))
                    .await
                    .unwrap()
                    .events
                    .len()
            }
        };
        assert_eq!(count("SubscriptionStarted").await, 0, "nothing started");
        assert_eq!(count("OrderFulfilled").await, 0, "nothing fulfilled");
        assert_eq!(count("PaymentRefunded").await, 1);
        let late = second
            .post(
                &format!("/orders/{order}/pay"),
                json!({"amount": {"currency": "EUR", "amount_minor": 100}}),
            )
            .await;
        assert_eq!(late.status, 409, "{}", late.body);
        assert_eq!(
            count("PaymentReceived").await,
            1,
            "the late payment is not taken"
        );
        let view = second
            .read(&format!(
                "/orders/{order}?min_position={}",
                cancelled["position"]
            ))
            .await;
        assert_eq!(view["status"], "cancelled", "{view}");
        assert_eq!(
            view["refunded"],
            json!({"currency": "EUR", "amount_minor": 100}),
            "{view}"
        );
        assert_eq!(view["subscription_id"], Value::Null, "{view}");
        assert_read_models_verify(&second).await;
    })
    .await;
}

/// The consumer `name` as `GET /admin/consumers` on `server` shows it.
async fn consumer(server: &Server, name: &str) -> Value {
    server.read("/admin/consumers").await["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone()
}

/// Two servers on one PostgreSQL with a short lease life (3 s); the first holds every
/// consumer's lease. Under load through the second, the first is frozen (SIGSTOP). While
/// the test holds the lead board's lease row (so that no take-over of that one lease can
/// come first), the second server's `/admin/consumers` shows the lead board `stalled`,
/// with the frozen server as its holder. The other leases expire and are taken over: a
/// conversion made through the second has its deal opened within 10 s of the expiry,
/// and the second's log says `lease taken`. Thawed, the first finds its leases lost,
/// commits nothing and stands down; every read model verifies equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_frozen_lease_holder_is_taken_over_and_stands_down_when_thawed() {
    use sqlx::Connection;
    run(Backend::Postgres, |db: Arc<Fixture>| async move {
        let settings = [("ANNALS_API_TOKENS", TOKENS), ("ANNALS_LEASE_TTL", "3s")];
        let consumers = [
            "lead_board",
            "deal_board",
            "account_360",
            "lead_conversion",
            "order_saga",
        ];
        let holds = |server: &Server, consumer: &str| {
            strip_ansi(&server.logs())
                .contains(&format!("lease taken; running consumer=\"{consumer}\""))
        };
        let first = Arc::new(Server::start_with(db.url(), &settings));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !consumers.iter().all(|c| holds(&first, c)) {
            assert!(Instant::now() < deadline, "{}", first.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let second = Arc::new(Server::start_with(db.url(), &settings));
        let lead = qualified_lead(&second, "before-the-freeze").await;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Seen::default());
        let load = start_load(&second, "b", 3, &stop, &seen);
        until("the second server takes commands", || {
            seen.acknowledged() >= 20
        })
        .await;

        first.freeze();
        let frozen = Instant::now();
        // The test holds the lead board's lease row: a take-over of it waits.
        let url = db.url().to_owned();
        let mut holding = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut holding).await.unwrap();
        sqlx::query("SELECT holder FROM leases WHERE name = 'projection.lead_board' FOR UPDATE")
            .execute(&mut holding)
            .await
            .unwrap();
        // Through the second server: a conversion, whose deal only a running conversion
        // process opens.
        let converted = second
            .command(
                &format!("/leads/{lead}/convert"),
                json!({"deal_name": "Engines", "amount": {"currency": "EUR", "amount_minor": 100}}),
            )
            .await;
        let deal = converted["deal_id"].as_str().unwrap().to_owned();
        // Stalled, with the frozen server as its holder, while it is not taken over.
        let pid = format!(":{}:", first.pid());
        let stalled = loop {
            let board = consumer(&second, "lead_board").await;
            if board["status"] == "stalled" {
                break board;
            }
            assert!(
                frozen.elapsed() < Duration::from_secs(20),
                "the lead board never showed stalled: {board}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(
            stalled["holder"].as_str().unwrap().contains(&pid),
            "{stalled} is not held by {pid}"
        );
        assert!(stalled["lag"].as_u64().unwrap() > 0, "{stalled}");
        assert!(stalled["lease_expires_at"].is_string(), "{stalled}");
        // The conversion process's lease expired 3 s after its last renewal at most; the
        // deal is opened within 10 s of that.
        loop {
            if second.get(&format!("/deals/{deal}/history")).await.status == 200 {
                break;
            }
            assert!(
                frozen.elapsed() < Duration::from_secs(13),
                "the deal was not opened within 10 s of the lease's expiry:\n{}",
                second.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(holds(&second, "lead_conversion"), "{}", second.logs());
        sqlx::query("ROLLBACK").execute(&mut holding).await.unwrap();
        let released = Instant::now();
        while !consumers.iter().all(|c| holds(&second, c)) {
            assert!(
                released.elapsed() < Duration::from_secs(10),
                "the second server did not take every lease over:\n{}",
                second.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let board = loop {
            let board = consumer(&second, "lead_board").await;
            if board["status"] != "stalled" {
                break board;
            }
            assert!(released.elapsed() < Duration::from_secs(10), "{board}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(!board["holder"].as_str().unwrap().contains(&pid), "{board}");
        stop.store(true, Ordering::Relaxed);
        finish(load).await;
        assert_eq!(seen.unanswered(), Vec::<String>::new());

        // Thawed: the first finds every lease lost and takes none back.
        let before = strip_ansi(&first.logs());
        first.thaw();
        let thawed = Instant::now();
        loop {
            let logs = strip_ansi(&first.logs());
            let after = &logs[before.len().min(logs.len())..];
            let lost = |c: &&str| {
                after.lines().any(|line| {
                    line.contains("lease lost") && line.contains(&format!("consumer=\"{c}\""))
                })
            };
            if consumers.iter().all(lost) {
                assert!(!after.contains("lease taken"), "{after}");
                break;
            }
            assert!(
                thawed.elapsed() < Duration::from_secs(10),
                "the thawed server did not stand down:\n{after}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let acked: Vec<Sent> = seen
            .sent()
            .into_iter()
            .filter(|s| s.acknowledged())
            .collect();
        assert_in_log(&second, &acked.iter().collect::<Vec<_>>()).await;
        let head = head(&second).await;
        second.read(&format!("/leads?min_position={head}")).await;
        for projection in [
            "lead_board",
            "deal_board",
            "account_360",
            "due_timers",
            "lead_response",
            "order_board",
            "subscription_board",
            "revenue",
        ] {
            let verified = second
                .admin(&format!("/admin/projections/{projection}/verify"))
                .await;
            assert_eq!(verified.status, 200, "{}", verified.body);
            assert_eq!(
                verified.body["equal"], true,
                "{projection}: {}",
                verified.body
            );
        }
        // The thawed server serves still, as a standby.
        assert_eq!(first.get("/leads?limit=1").await.status, 200);
    })
    .await;
}
