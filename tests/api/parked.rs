//! A halted projection restarted over HTTP, as an operator would: the parked event is
//! listed with its error, retried (409 while it still fails, 200 once the fault is
//! fixed) or skipped (recorded with who and when), and the projection resumes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use annals_store::{AppendRequest, ExpectedVersion, NewEvent, StreamName};
use reqwest::Method;
use serde_json::{Value, json};

use crate::database::{Backend, Fixture};
use crate::server::{Server, WRITER, lead};

on_both_backends!(
    a_process_parks_an_event_it_cannot_read_and_resumes_once_it_is_skipped,
    a_poisoned_event_is_listed_and_skipped_and_the_board_resumes,
    a_parked_event_is_retried_once_its_fault_is_fixed_and_the_board_resumes,
);

/// The lead board's entry of `/admin/projections`, once its status is `status`.
async fn lead_board_when(server: &Server, status: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = server.read("/admin/projections").await;
        let board = all["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "lead_board")
            .unwrap()
            .clone();
        if board["status"] == status {
            return board;
        }
        assert!(Instant::now() < deadline, "never {status}: {board}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A consumer's entry of `/admin/consumers`, once `ready` says it is as wanted.
async fn consumer_when(server: &Server, name: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = server.read("/admin/consumers").await;
        let consumer = all["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} is not listed: {all}"))
            .clone();
        if ready(&consumer) {
            return consumer;
        }
        assert!(Instant::now() < deadline, "never as wanted: {consumer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every consumer is listed with its kind; the lead conversion process (a process, not a
/// read model) parks a conversion it cannot read, halts before it, and goes on once an
/// operator skips it, as the read models do.
async fn a_process_parks_an_event_it_cannot_read_and_resumes_once_it_is_skipped(db: Arc<Fixture>) {
    let server = Server::start(db.url());
    let all = server.read("/admin/consumers").await;
    let kinds: Vec<(String, String)> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (name, kind) in [
        ("lead_board", "read_model"),
        ("deal_board", "read_model"),
        ("account_360", "read_model"),
        ("lead_conversion", "process"),
    ] {
        assert!(
            kinds.contains(&(name.to_owned(), kind.to_owned())),
            "{name} ({kind}) in {kinds:?}"
        );
    }
    // `/admin/projections` stays the read models' subset.
    let projections = server.read("/admin/projections").await;
    let names: Vec<&str> = projections["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(!names.contains(&"lead_conversion"), "{names:?}");

    // A writer that bypassed the domain left a conversion no one can read.
    let poisoned = uuid::Uuid::now_v7();
    let appended = db
        .store()
        .append(AppendRequest::new(
            StreamName::parse(format!("lead-{poisoned}")).unwrap(),
            ExpectedVersion::NoStream,
            vec![NewEvent::new("LeadConverted", json!({"bogus": true}))],
        ))
        .await
        .unwrap();
    let position = appended.last_position();
    let halted = consumer_when(&server, "lead_conversion", |c| c["status"] == "halted").await;
    assert_eq!(halted["kind"], "process");
    assert_eq!(halted["parked"], 1, "{halted}");
    assert!(
        halted["last_error"]
            .as_str()
            .unwrap()
            .contains("LeadConverted"),
        "{halted}"
    );
    let list = server.read("/admin/consumers/lead_conversion/parked").await;
    assert_eq!(list["items"][0]["position"], position, "{list}");
    assert_eq!(list["items"][0]["type"], "LeadConverted", "{list}");

    // It still cannot be read: a retry says so; a skip lets the process go on.
    let retried = server
        .admin(&format!(
            "/admin/consumers/lead_conversion/parked/{position}/retry"
        ))
        .await;
    assert_eq!((retried.status, retried.code()), (409, "still-failing"));
    let skipped = server
        .admin(&format!(
            "/admin/consumers/lead_conversion/parked/{position}/skip"
        ))
        .await;
    assert_eq!(skipped.status, 200, "{:?}", skipped.body);
    let running = consumer_when(&server, "lead_conversion", |c| {
        c["status"] == "running" && c["lag"] == 0
    })
    .await;
    assert_eq!(running["parked"], 0, "{running}");
    assert!(
        running["checkpoint"].as_u64().unwrap() >= position,
        "{running}"
    );
}

async fn parked(server: &Server) -> Vec<Value> {
    let list = server.read("/admin/consumers/lead_board/parked").await;
    assert_eq!(list["next_cursor"], Value::Null, "{list}");
    list["items"].as_array().unwrap().clone()
}

async fn a_poisoned_event_is_listed_and_skipped_and_the_board_resumes(db: Arc<Fixture>) {
    let server = Server::start(db.url());
    server.command("/leads", lead("ada")).await;
    // A writer that bypassed the domain left an event no projector can read.
    let poisoned = uuid::Uuid::now_v7();
    let appended = db
        .store()
        .append(AppendRequest::new(
            StreamName::parse(format!("lead-{poisoned}")).unwrap(),
            ExpectedVersion::NoStream,
            vec![NewEvent::new("LeadCaptured", json!({"bogus": true})).with_schema_version(2)],
        ))
        .await
        .unwrap();
    let position = appended.last_position();
    lead_board_when(&server, "halted").await;

    let items = parked(&server).await;
    assert_eq!(items.len(), 1, "{items:?}");
    let item = &items[0];
    assert_eq!(item["position"], position);
    assert_eq!(item["type"], "LeadCaptured");
    assert!(
        item["error"]
            .as_str()
            .unwrap()
            .contains("cannot be projected"),
        "{item}"
    );
    assert!(item["attempts"].as_u64().unwrap() >= 3, "{item}");
    assert!(item["parked_at"].is_string(), "{item}");
    let event_id = &db
        .store()
        .read_all(position, 1, &annals_store::LogFilter::all())
        .await
        .unwrap()
        .events[0]
        .event_id;
    assert_eq!(item["event_id"], event_id.to_string());

    // The event still fails: a retry says so, and it stays parked.
    let retried = server
        .admin(&format!(
            "/admin/consumers/lead_board/parked/{position}/retry"
        ))
        .await;
    assert_eq!(
        (retried.status, retried.code()),
        (409, "still-failing"),
        "{:?}",
        retried.body
    );
    assert!(
        retried.body["detail"]
            .as_str()
            .unwrap()
            .contains("cannot be projected")
    );
    assert_eq!(
        parked(&server).await[0]["attempts"],
        item["attempts"].as_u64().unwrap() + 1
    );

    // What is not parked, or not a consumer, or not a position, says so.
    for (path, status, code) in [
        (
            "/admin/consumers/nothing/parked/1/retry",
            404,
            "consumer-not-found",
        ),
        (
            "/admin/consumers/lead_board/parked/1/retry",
            404,
            "not-parked",
        ),
        (
            "/admin/consumers/lead_board/parked/1/skip",
            404,
            "not-parked",
        ),
        (
            "/admin/consumers/lead_board/parked/0/skip",
            422,
            "invalid-parameter",
        ),
        (
            "/admin/consumers/lead_board/parked/x/retry",
            422,
            "invalid-parameter",
        ),
    ] {
        let answer = server.admin(path).await;
        assert_eq!((answer.status, answer.code()), (status, code), "{path}");
    }
    let unknown = server.get("/admin/consumers/nothing/parked").await;
    assert_eq!(
        (unknown.status, unknown.code()),
        (404, "consumer-not-found")
    );
    let writer = server
        .call(
            Method::GET,
            "/admin/consumers/lead_board/parked",
            WRITER,
            None,
            &[],
        )
        .await;
    assert_eq!(writer.status, 403);

    // A later lead waits behind the halt; the skip lets the board go on.
    let later = server.command("/leads", lead("bea")).await;
    let skipped = server
        .admin(&format!(
            "/admin/consumers/lead_board/parked/{position}/skip"
        ))
        .await;
    assert_eq!(skipped.status, 200, "{:?}", skipped.body);
    assert_eq!(skipped.body["position"], position);
    assert_eq!(skipped.body["skipped_by"], "olga");
    assert!(skipped.body["skipped_at"].is_string());
    let again = server
        .admin(&format!(
            "/admin/consumers/lead_board/parked/{position}/skip"
        ))
        .await;
    assert_eq!((again.status, again.code()), (404, "not-parked"));

    let board = lead_board_when(&server, "running").await;
    assert_eq!(board["last_error"], Value::Null, "{board}");
    let leads = server
        .read(&format!("/leads?min_position={}", later["position"]))
        .await;
    assert_eq!(leads["items"].as_array().unwrap().len(), 2, "{leads}");
    assert!(parked(&server).await.is_empty());
}

async fn a_parked_event_is_retried_once_its_fault_is_fixed_and_the_board_resumes(db: Arc<Fixture>) {
    // The database refuses what the board makes of one assignment (a constraint an
    // operator added by mistake): the event is parked and the board halts before it.
    // (The board's table first, made as its runner makes it.)
    for table in
        annals_engine::Projector::tables(&annals_consumers::read_models::lead_board::LeadBoard)
    {
        for statement in table.create_statements() {
            db.execute(&statement).await;
        }
    }
    match db.backend() {
        Backend::Postgres => {
            db.execute(
                "ALTER TABLE lead_board ADD CONSTRAINT no_bob \
                 CHECK (owner IS DISTINCT FROM 'bob')",
            )
            .await;
        }
        Backend::Sqlite => {
            // Both: the capture and the assignment may be folded into one insert.
            for (name, on) in [("no_bob", "UPDATE"), ("no_new_bob", "INSERT")] {
                db.execute(&format!(
                    "CREATE TRIGGER {name} BEFORE {on} ON lead_board \
                     WHEN NEW.owner = 'bob' BEGIN SELECT RAISE(ABORT, 'no bob'); END"
                ))
                .await;
            }
        }
    }
    let server = Server::start(db.url());
    let id = server.command("/leads", lead("cid")).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let assigned = server
        .command(&format!("/leads/{id}/assign"), json!({"owner": "bob"}))
        .await;
    let position = assigned["position"].as_u64().unwrap();
    lead_board_when(&server, "halted").await;
    let items = parked(&server).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(
        (&items[0]["position"], &items[0]["type"]),
        (&json!(position), &json!("LeadAssigned"))
    );
    let later = server.command("/leads", lead("dot")).await;

    let retried = server
        .admin(&format!(
            "/admin/consumers/lead_board/parked/{position}/retry"
        ))
        .await;
    assert_eq!((retried.status, retried.code()), (409, "still-failing"));

    // The operator removes the fault and retries: applied, and the board goes on.
    match db.backend() {
        Backend::Postgres => {
            db.execute("ALTER TABLE lead_board DROP CONSTRAINT no_bob")
                .await
        }
        Backend::Sqlite => {
            db.execute("DROP TRIGGER no_bob").await;
            db.execute("DROP TRIGGER no_new_bob").await
        }
    };
    let retried = server
        .admin(&format!(
            "/admin/consumers/lead_board/parked/{position}/retry"
        ))
        .await;
    assert_eq!(retried.status, 200, "{:?}", retried.body);
    assert_eq!(retried.body["status"], "applied");
    let again = server
        .admin(&format!(
            "/admin/consumers/lead_board/parked/{position}/retry"
        ))
        .await;
    assert_eq!((again.status, again.code()), (404, "not-parked"));

    lead_board_when(&server, "running").await;
    let leads = server
        .read(&format!("/leads?min_position={}", later["position"]))
        .await;
    assert_eq!(leads["items"].as_array().unwrap().len(), 2, "{leads}");
    let lead = server.read(&format!("/leads/{id}")).await;
    assert_eq!(lead["owner"], "bob");
    assert!(parked(&server).await.is_empty());
    let verified = server.admin("/admin/projections/lead_board/verify").await;
    assert_eq!(verified.body["equal"], true, "{:?}", verified.body);
}
