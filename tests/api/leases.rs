//! Leases on SQLite, black-box: beside a running `annals serve`, the demo (twice in a
//! row) and a second server work on the same file; each consumer runs in exactly one
//! process (the one whose log says `lease taken` for it), and the server's own timers
//! are left to the real clock: an order placed through the server stays invoiced, and a
//! lead routed just before keeps its owner.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::database::{Backend, Fixture};
use crate::server::{OPERATOR, Server, TOKENS, annals, qualified_lead, strip_ansi, won_deal};

/// Every consumer of the log, and the timer scheduler: each has a lease.
const LEASED: [&str; 12] = [
    "lead_board",
    "deal_board",
    "account_360",
    "due_timers",
    "lead_response",
    "order_board",
    "subscription_board",
    "revenue",
    "lead_conversion",
    "lead_routing",
    "order_saga",
    "timer_scheduler",
];

/// How many times a server's log says it took `consumer`'s lease.
fn taken(server: &Server, consumer: &str) -> usize {
    strip_ansi(&server.logs())
        .matches(&format!("lease taken; running consumer=\"{consumer}\""))
        .count()
}

/// An order's status, from its history.
async fn status(server: &Server, order: &str) -> serde_json::Value {
    server.read(&format!("/orders/{order}/history")).await["state"]["status"].clone()
}

fn demo(url: &str) -> (bool, String) {
    let output = annals()
        .args(["demo", "--leads", "300", "--database-url", url])
        .output()
        .unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_the_demo_and_a_second_server_run_beside_a_server_and_leave_its_timers() {
    crate::database::run(Backend::Sqlite, |db: std::sync::Arc<Fixture>| async move {
        let url = db.url().to_owned();
        let server = Server::start(&url);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !LEASED.iter().all(|c| taken(&server, c) == 1) {
            assert!(Instant::now() < deadline, "{}", server.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A lead routed by the server's routing process (its owner has 24 h to act).
        let rules = json!({"rules": [{"name": "everyone", "match": {}, "owners": ["ada", "bea"]}]});
        let set = server
            .call(Method::PUT, "/admin/routing", OPERATOR, Some(&rules), &[])
            .await;
        assert_eq!(set.status, 200, "{:?}", set.body);
        let routed = qualified_lead(&server, "routed").await;
        let owner = loop {
            let view = server.get(&format!("/leads/{routed}")).await.body;
            if !view["owner"].is_null() {
                break view["owner"].clone();
            }
            assert!(Instant::now() < deadline, "{view}\n{}", server.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // No more routing: the demo's leads are not the routing's business here.
        let none = json!({"rules": []});
        let set = server
            .call(Method::PUT, "/admin/routing", OPERATOR, Some(&none), &[])
            .await;
        assert_eq!(set.status, 200, "{:?}", set.body);
        // An order through the server, invoiced by its saga (due in 7 days).
        let deal = won_deal(&server).await;
        let order = server
            .command(
                "/orders",
                json!({"deal_id": deal, "lines": [{"sku": "S", "quantity": 1,
                       "unit_price": {"currency": "EUR", "amount_minor": 100}}]}),
            )
            .await;
        let order = order["id"].as_str().unwrap().to_owned();
        while status(&server, &order).await != "invoiced" {
            assert!(Instant::now() < deadline, "{}", server.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // The demo beside it, twice in a row.
        for run in 0..2 {
            let (ok, out) = demo(&url);
            assert!(ok, "demo run {run}: {out}\n{}", server.logs());
            assert!(out.contains("300 leads"), "{out}");
        }
        // A second server on the same file serves, and stands by for every lease.
        let second = Server::start_with(
            &url,
            &[
                ("ANNALS_API_TOKENS", TOKENS),
                ("RUST_LOG", "info,sqlx=warn,annals_engine=debug"),
            ],
        );
        let standing = |c: &str| {
            strip_ansi(&second.logs()).contains(&format!(
                "lease held elsewhere; standing by consumer=\"{c}\""
            ))
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !LEASED.iter().all(|c| standing(c)) {
            assert!(Instant::now() < deadline, "{}", second.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(second.get("/leads?limit=5").await.status, 200);
        for consumer in LEASED {
            assert_eq!(
                taken(&server, consumer) + taken(&second, consumer),
                1,
                "{consumer} runs in one process only:\n{}\n{}",
                server.logs(),
                second.logs()
            );
        }
        // The server's own timers: untouched by the demo.
        assert_eq!(status(&server, &order).await, "invoiced");
        let view = server.read(&format!("/leads/{routed}")).await;
        assert_eq!(view["owner"], owner, "{view}");
        let stream = annals_store::StreamName::parse(format!("lead-{routed}")).unwrap();
        let assigned = db
            .store()
            .read_stream(&stream, 1, annals_store::Direction::Forwards, 1_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.event_type == "LeadAssigned")
            .count();
        assert_eq!(assigned, 1, "the routed lead was reassigned");
        let fired = db
            .store()
            .read_all(
                1,
                1_000_000,
                &annals_store::LogFilter::event_types(["TimerFired"]),
            )
            .await
            .unwrap()
            .events
            .len();
        assert_eq!(fired, 0, "a timer fired before its time");
        // Every read model equals a rebuild.
        let head = server.read("/events?limit=1").await["head"]
            .as_u64()
            .unwrap();
        server.read(&format!("/leads?min_position={head}")).await;
        for projection in &LEASED[..8] {
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
    })
    .await;
}
