//! History, the log, and the operator's endpoints: state as of a version and a time,
//! stream and log pages, projection status, a rebuild that readers never see half-done,
//! verify, and the audit catching a row edited behind the store's back.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::database::{Backend, Fixture, run};
use crate::server::{Server, lead, qualified_lead};

on_both_backends!(
    history_shows_an_aggregate_as_of_a_version_and_a_time,
    streams_and_the_log_read_in_pages,
    a_rebuild_keeps_readers_reading_and_verifies_equal,
    the_audit_catches_a_row_edited_in_the_database,
);

async fn history_shows_an_aggregate_as_of_a_version_and_a_time(db: Arc<Fixture>) {
    let server = Server::start(db.url());
    let id = server.command("/leads", lead("ada")).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    server
        .command(
            &format!("/leads/{id}/signals"),
            json!({"kind": "pricing_page_view"}),
        )
        .await;
    // Times in the log are the store's clock: take the time between two commands.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let between = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    server
        .command(&format!("/leads/{id}/assign"), json!({"owner": "grace"}))
        .await;

    let now = server.read(&format!("/leads/{id}/history")).await;
    assert_eq!(now["version"], 3);
    assert_eq!(now["state"]["status"], "working");
    assert_eq!(now["state"]["owner"], "grace");
    let first = server.read(&format!("/leads/{id}/history?version=1")).await;
    assert_eq!(first["version"], 1);
    assert_eq!(first["state"]["status"], "new");
    assert_eq!(first["state"]["score"], 0);
    let as_of = between.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let then = server
        .read(&format!(
            "/leads/{id}/history?as_of={}",
            as_of.replace('+', "%2B")
        ))
        .await;
    assert_eq!(then["version"], 2);
    assert_eq!(then["state"]["score"], 10);
    assert_eq!(then["state"]["owner"], Value::Null);

    let account = server
        .command("/accounts", json!({"name": "Initech"}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    server
        .command(
            &format!("/accounts/{account}/rename"),
            json!({"name": "Initrode"}),
        )
        .await;
    let before = server
        .read(&format!("/accounts/{account}/history?version=1"))
        .await;
    assert_eq!(before["state"]["name"], "Initech");
    let nobody = uuid::Uuid::now_v7();
    let missing = server.get(&format!("/deals/{nobody}/history")).await;
    assert_eq!((missing.status, missing.code()), (404, "deal-not-found"));
    // Both: the state at whichever comes first (the document allows both at once).
    for (version, expected) in [(1, 1), (3, 2)] {
        let both = server
            .read(&format!(
                "/leads/{id}/history?version={version}&as_of={as_of}"
            ))
            .await;
        assert_eq!(both["version"], expected, "version={version}");
    }
}

async fn streams_and_the_log_read_in_pages(db: Arc<Fixture>) {
    let server = Server::start(db.url());
    let id = qualified_lead(&server, "ada").await;
    // Capture, two signals and the qualification: four events.
    let mut versions = Vec::new();
    let mut path = format!("/streams/lead-{id}/events?limit=3");
    loop {
        let page = server.read(&path).await;
        for event in page["items"].as_array().unwrap() {
            versions.push(event["version"].as_u64().unwrap());
            assert_eq!(event["stream"], format!("lead-{id}"));
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/streams/lead-{id}/events?limit=3&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(versions, [1, 2, 3, 4]);
    let from_three = server
        .read(&format!("/streams/lead-{id}/events?from_version=3"))
        .await;
    assert_eq!(from_three["items"][0]["type"], "SignalRecorded");
    assert_eq!(from_three["items"][1]["type"], "LeadQualified");

    let log = server.read("/events?limit=2").await;
    assert_eq!(log["items"][0]["position"], 1);
    assert_eq!(log["head"], 4);
    let cursor = log["next_cursor"].as_str().unwrap();
    let rest = server.read(&format!("/events?cursor={cursor}")).await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 2);
    assert_eq!(rest["next_cursor"], Value::Null);
    let qualified = server.read("/events?type=LeadQualified").await;
    assert_eq!(qualified["items"].as_array().unwrap().len(), 1);
    for name in ["lead-nobody", "..%2F..%2Fetc", "lead-1'%20OR%201=1"] {
        let missing = server.get(&format!("/streams/{name}/events")).await;
        assert_eq!(
            (missing.status, missing.code()),
            (404, "stream-not-found"),
            "{name}"
        );
    }
}

async fn a_rebuild_keeps_readers_reading_and_verifies_equal(db: Arc<Fixture>) {
    // A store with history before the server starts: the demo writes it.
    demo(&db, 120);
    let server = Server::start(db.url());
    let head = server.read("/events?limit=1").await["head"]
        .as_u64()
        .unwrap();
    let before = server
        .read(&format!("/leads?limit=500&min_position={head}"))
        .await;
    let leads = before["items"].as_array().unwrap().len();
    assert_eq!(leads, 120);

    let started = server.admin("/admin/projections/lead_board/rebuild").await;
    assert_eq!(started.status, 202, "{}", started.body);
    // Readers see the whole board at every moment of the rebuild, never a part of it,
    // until it is swapped in. (A second rebuild meanwhile: see below.)
    let mut reads = 0;
    loop {
        let page = server.read("/leads?limit=500").await;
        assert_eq!(
            page["items"], before["items"],
            "a reader saw a half-built board"
        );
        reads += 1;
        let status = server.read("/admin/projections").await;
        let board = status["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "lead_board")
            .unwrap()
            .clone();
        if board["status"] == "running" {
            assert_eq!(board["checkpoint"], head);
            assert_eq!(board["lag"], 0);
            break;
        }
        assert!(reads < 2_000, "the rebuild never finished: {board}");
    }
    for projection in ["lead_board", "deal_board", "account_360"] {
        let verified = server
            .admin(&format!("/admin/projections/{projection}/verify"))
            .await;
        assert_eq!(verified.status, 200);
        assert_eq!(
            verified.body["equal"], true,
            "{projection}: {}",
            verified.body
        );
        assert_eq!(verified.body["position"], head);
    }
    let unknown = server.admin("/admin/projections/nothing/verify").await;
    assert_eq!(
        (unknown.status, unknown.code()),
        (404, "projection-not-found")
    );
}

/// A second rebuild while one runs is refused (409 `projection-busy`), never started beside
/// it. The first is held, so it is certainly still running: a lock on the table of parked
/// events, which each batch of a rebuild reads before it writes, and which neither a
/// claim nor a query reads. PostgreSQL only: SQLite has one write lock for the whole file,
/// which would hold the second rebuild's claim as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_second_rebuild_while_one_runs_is_refused() {
    use sqlx::Connection;
    run(Backend::Postgres, |db: Arc<Fixture>| async move {
        demo(&db, 40);
        let server = Server::start(db.url());
        let head = server.read("/events?limit=1").await["head"]
            .as_u64()
            .unwrap();
        let before = server
            .read(&format!("/leads?limit=500&min_position={head}"))
            .await;
        let live = "SELECT live_generation, rebuilding FROM projections WHERE name = 'lead_board'";

        let mut holder = sqlx::PgConnection::connect(db.url()).await.unwrap();
        let mut held = holder.begin().await.unwrap();
        sqlx::query("LOCK TABLE projection_dead_letters IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *held)
            .await
            .unwrap();
        let (old, none): (i64, Option<i64>) =
            sqlx::query_as(live).fetch_one(&mut *held).await.unwrap();
        assert_eq!(none, None);
        let started = server.admin("/admin/projections/lead_board/rebuild").await;
        assert_eq!(started.status, 202, "{}", started.body);
        // The first rebuild holds its claim, and cannot finish while the lock is held.
        let (_, rebuilding): (i64, Option<i64>) =
            sqlx::query_as(live).fetch_one(&mut *held).await.unwrap();
        let claimed = rebuilding.expect("the rebuild holds its claim");
        assert!(claimed > old);
        let again = server.admin("/admin/projections/lead_board/rebuild").await;
        assert_eq!(
            (again.status, again.code()),
            (409, "projection-busy"),
            "{}",
            again.body
        );
        // Readers keep reading the live board meanwhile.
        assert_eq!(
            server.read("/leads?limit=500").await["items"],
            before["items"]
        );
        held.rollback().await.unwrap();

        // Let go, the first rebuild finishes: its generation is live, and equal.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (now, rebuilding): (i64, Option<i64>) =
                sqlx::query_as(live).fetch_one(&mut holder).await.unwrap();
            if rebuilding.is_none() {
                // The first rebuild's generation is the one swapped in.
                assert_eq!(now, claimed);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the rebuild never finished"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            server.read("/leads?limit=500").await["items"],
            before["items"]
        );
        let verified = server.admin("/admin/projections/lead_board/verify").await;
        assert_eq!(verified.body["equal"], true, "{}", verified.body);
    })
    .await;
}

async fn the_audit_catches_a_row_edited_in_the_database(db: Arc<Fixture>) {
    let server = Server::start(db.url());
    let id = qualified_lead(&server, "ada").await;
    let audit = server.read("/admin/audit/verify").await;
    let anchor = audit["anchor"]["hash"].as_str().unwrap().to_owned();
    assert_eq!(anchor.len(), 64);
    assert_eq!(
        audit,
        json!({"ok": true, "streams": 1, "events": 4, "first_broken_link": null,
               "anchor": {"position": 4, "hash": anchor}})
    );
    // Someone with database access raises the score of a signal.
    let edited = match db.backend() {
        crate::database::Backend::Sqlite => {
            db.execute("UPDATE events SET data = replace(data, '25', '99') WHERE version = 2")
                .await
        }
        crate::database::Backend::Postgres => {
            db.execute(
                "UPDATE events SET data = jsonb_set(data, '{points}', '99') WHERE version = 2",
            )
            .await
        }
    };
    assert_eq!(edited, 1);
    let audit = server.read("/admin/audit/verify").await;
    assert_eq!(audit["ok"], false);
    assert_eq!(audit["first_broken_link"]["stream"], format!("lead-{id}"));
    assert_eq!(audit["first_broken_link"]["version"], 2);
}

/// Writes a history of `leads` leads with `annals demo`, before any server starts.
fn demo(db: &Fixture, leads: u32) {
    let demo = crate::server::annals()
        .args([
            "demo",
            "--leads",
            &leads.to_string(),
            "--database-url",
            db.url(),
        ])
        .output()
        .unwrap();
    assert!(
        demo.status.success(),
        "{}",
        String::from_utf8_lossy(&demo.stderr)
    );
}
