//! Automatic lead routing end to end, with the response deadline shortened to two seconds:
//! rules set over HTTP; a qualified lead assigned by the first rule that matches, in turn;
//! reassigned once when its owner lets the deadline pass, and never again once the new
//! owner acts; a lead assigned by hand left alone; every read model verifies equal.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::database::Fixture;
use crate::server::{OPERATOR, Server, TOKENS, qualified_lead};

on_both_backends!(
    qualified_leads_are_routed_and_reassigned_once_per_missed_deadline,
    routing_rules_are_validated_and_read_back_as_set,
    a_deadline_set_before_a_kill_9_reassigns_once_after_the_restart,
);

/// The role tokens, and a writer token for each owner, so an owner can act as itself.
fn tokens() -> String {
    format!("{TOKENS},writer:ada:ada-token,writer:bea:bea-token")
}

/// The lead's owner on the lead board, once `ready` says it is the one awaited.
async fn owner_when(server: &Server, lead: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // The lead board may not have the lead yet (404): it follows the log.
        let view = server.get(&format!("/leads/{lead}")).await.body;
        if ready(&view["owner"]) {
            return view["owner"].clone();
        }
        assert!(Instant::now() < deadline, "{view}\n{}", server.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The lead's `LeadAssigned` events, from its history: each owner in turn.
async fn assignments(db: &Fixture, lead: &str) -> Vec<String> {
    let stream = annals_store::StreamName::parse(format!("lead-{lead}")).unwrap();
    db.store()
        .read_stream(&stream, 1, annals_store::Direction::Forwards, 1_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "LeadAssigned")
        .map(|e| e.data["owner"].as_str().unwrap().to_owned())
        .collect()
}

async fn qualified_leads_are_routed_and_reassigned_once_per_missed_deadline(db: Arc<Fixture>) {
    let tokens = tokens();
    let server = Server::start_with(
        db.url(),
        &[
            ("ANNALS_API_TOKENS", tokens.as_str()),
            ("ANNALS_LEAD_RESPONSE_DEADLINE", "2s"),
        ],
    );
    let rules = json!({"rules": [
        {"name": "partners", "match": {"sources": ["partner"]}, "owners": ["pat"]},
        {"name": "everyone", "match": {}, "owners": ["ada", "bea"]},
    ]});
    let set = server
        .call(Method::PUT, "/admin/routing", OPERATOR, Some(&rules), &[])
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);

    // The first lead goes to ada, the second to bea: in turn.
    let first = qualified_lead(&server, "first").await;
    assert_eq!(owner_when(&server, &first, |o| !o.is_null()).await, "ada");
    let second = qualified_lead(&server, "second").await;
    assert_eq!(owner_when(&server, &second, |o| !o.is_null()).await, "bea");
    // An operator takes the second lead by hand at once: it is never routed again.
    let by_hand = server
        .call(
            Method::POST,
            &format!("/leads/{second}/assign"),
            OPERATOR,
            Some(&json!({"owner": "zed"})),
            &[],
        )
        .await;
    assert_eq!(by_hand.status, 200, "{:?}", by_hand.body);

    // Ada lets the deadline pass: the first lead goes to bea, who acts on it at once.
    assert_eq!(owner_when(&server, &first, |o| o == "bea").await, "bea");
    let acted = server
        .call(
            Method::POST,
            &format!("/leads/{first}/signals"),
            Some("bea-token"),
            Some(&json!({"kind": "email_click"})),
            &[],
        )
        .await;
    assert_eq!(acted.status, 200, "{:?}", acted.body);

    // The operator's owner closes the second lead: not bea's action, since an operator
    // took the lead from the routing by hand.
    let closed = server
        .call(
            Method::POST,
            &format!("/leads/{second}/disqualify"),
            OPERATOR,
            Some(&json!({"reason": "not a buyer"})),
            &[],
        )
        .await;
    assert_eq!(closed.status, 200, "{:?}", closed.body);

    // Several deadlines later: bea acted, so the first lead stays hers; the second stays
    // with the operator's choice. Each deadline reassigned at most once.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(assignments(&db, &first).await, ["ada", "bea"]);
    assert_eq!(assignments(&db, &second).await, ["bea", "zed"]);
    let routed = db
        .store()
        .read_all(
            1,
            10_000,
            &annals_store::LogFilter::event_types(["LeadRouted"]),
        )
        .await
        .unwrap()
        .events;
    let reasons: Vec<(String, String)> = routed
        .iter()
        .map(|e| {
            (
                e.data["owner"].as_str().unwrap().to_owned(),
                e.data["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            ("ada".to_owned(), "qualified".to_owned()),
            ("bea".to_owned(), "qualified".to_owned()),
            ("bea".to_owned(), "response-deadline".to_owned()),
        ]
    );

    // Speed to lead: ada let one deadline pass; bea had two leads and acted on one, after
    // the first owner's deadline (so at least 2 s after it qualified).
    let position = closed.body["position"].as_u64().unwrap();
    let speed = server
        .read(&format!(
            "/analytics/response-times?min_position={position}"
        ))
        .await;
    let owners = speed["owners"].as_array().unwrap();
    assert_eq!(owners.len(), 2, "{speed}");
    let (ada, bea) = (&owners[0], &owners[1]);
    assert_eq!(
        (
            &ada["owner"],
            &ada["routed"],
            &ada["responded"],
            &ada["breached"],
            &ada["median_seconds"]
        ),
        (&json!("ada"), &json!(1), &json!(0), &json!(1), &Value::Null),
        "{speed}"
    );
    assert_eq!(
        (
            &bea["owner"],
            &bea["routed"],
            &bea["responded"],
            &bea["breached"]
        ),
        (&json!("bea"), &json!(2), &json!(1), &json!(0)),
        "{speed}"
    );
    let median = bea["median_seconds"].as_f64().unwrap();
    assert!(
        median >= 2.0 && bea["p90_seconds"].as_f64() == Some(median),
        "{speed}"
    );
    let only_ada = server
        .read(&format!(
            "/analytics/response-times?owner=ada&min_position={position}"
        ))
        .await;
    assert_eq!(
        only_ada["owners"].as_array().unwrap().len(),
        1,
        "{only_ada}"
    );
    let before = server
        .read("/analytics/response-times?to=2000-01-01T00:00:00Z")
        .await;
    assert_eq!(before["owners"], json!([]), "{before}");

    // Every read model, rebuilt from the log, equals the live one.
    let consumers = server.read("/admin/projections").await;
    for item in consumers["items"].as_array().unwrap() {
        let name = item["name"].as_str().unwrap();
        let verified = server
            .admin(&format!("/admin/projections/{name}/verify"))
            .await;
        assert_eq!(verified.status, 200, "{name}: {:?}", verified.body);
        assert_eq!(verified.body["equal"], true, "{name}: {:?}", verified.body);
    }
}

async fn routing_rules_are_validated_and_read_back_as_set(db: Arc<Fixture>) {
    let server = Server::start(db.url());
    let read = server.read("/admin/routing").await;
    assert_eq!(read, json!({"rules": [], "version": 0}));
    let rules = json!({"rules": [
        {"name": "big", "match": {"min_score": 60, "email_domains": ["*.BigCo.example", "bigco.example"]}, "owners": ["ada", "bea"]},
        {"name": "rest", "match": {}, "owners": ["cid"]},
    ]});
    let set = server
        .call(Method::PUT, "/admin/routing", OPERATOR, Some(&rules), &[])
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    assert_eq!(set.body["events"], json!(["RoutingRulesSet"]));
    let read = server.read("/admin/routing").await;
    assert_eq!(read["version"], 1);
    assert_eq!(
        read["rules"][0]["match"]["email_domains"],
        json!(["*.bigco.example", "bigco.example"]),
        "stored lower-cased"
    );
    assert_eq!(
        read["rules"][1],
        json!({"name": "rest", "match": {}, "owners": ["cid"]})
    );

    let again = server
        .call(Method::PUT, "/admin/routing", OPERATOR, Some(&rules), &[])
        .await;
    assert_eq!(
        (again.status, again.code()),
        (409, "routing-rules-unchanged")
    );
    for (bad, code) in [
        (
            json!({"rules": [{"name": "x", "match": {}, "owners": []}]}),
            "invalid-count",
        ),
        (
            json!({"rules": [{"name": "x", "match": {}, "owners": ["a", "a"]}]}),
            "duplicate-value",
        ),
        (
            json!({"rules": [{"name": "x", "match": {"sources": ["fax"]}, "owners": ["a"]}]}),
            "unknown-value",
        ),
        (
            json!({"rules": [{"name": "x", "match": {"email_domains": ["*.com"]}, "owners": ["a"]}]}),
            "invalid-domain-pattern",
        ),
        (
            json!({"rules": [
                {"name": "x", "match": {}, "owners": ["a"]},
                {"name": "x", "match": {}, "owners": ["b"]},
            ]}),
            "duplicate-value",
        ),
    ] {
        let refused = server
            .call(Method::PUT, "/admin/routing", OPERATOR, Some(&bad), &[])
            .await;
        assert_eq!(
            (refused.status, refused.code()),
            (422, code),
            "{bad}: {:?}",
            refused.body
        );
    }
    assert_eq!(
        server.read("/admin/routing").await["version"],
        1,
        "nothing stored"
    );
}

/// A deadline set before a kill -9 is kept: the server is killed right after a lead is
/// routed (its timer scheduled), stays down past the deadline, and on its start the
/// timer fires and the lead is reassigned, once.
async fn a_deadline_set_before_a_kill_9_reassigns_once_after_the_restart(db: Arc<Fixture>) {
    let tokens = tokens();
    let env = [
        ("ANNALS_API_TOKENS", tokens.as_str()),
        ("ANNALS_LEAD_RESPONSE_DEADLINE", "2s"),
    ];
    let server = Server::start_with(db.url(), &env);
    let rules = json!({"rules": [{"name": "all", "match": {}, "owners": ["ada", "bea"]}]});
    let set = server
        .call(Method::PUT, "/admin/routing", OPERATOR, Some(&rules), &[])
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    let lead = qualified_lead(&server, "killed").await;
    assert_eq!(owner_when(&server, &lead, |o| !o.is_null()).await, "ada");
    // The deadline's timer is in the log before the kill.
    let deadline = Instant::now() + Duration::from_secs(20);
    while db
        .store()
        .read_all(
            1,
            10_000,
            &annals_store::LogFilter::event_types(["TimerScheduled"]),
        )
        .await
        .unwrap()
        .events
        .is_empty()
    {
        assert!(Instant::now() < deadline, "{}", server.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.kill();
    // Down past the deadline.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let server = Server::start_with(db.url(), &env);
    assert_eq!(owner_when(&server, &lead, |o| o == "bea").await, "bea");
    let acted = server
        .call(
            Method::POST,
            &format!("/leads/{lead}/signals"),
            Some("bea-token"),
            Some(&json!({"kind": "email_click"})),
            &[],
        )
        .await;
    assert_eq!(acted.status, 200, "{:?}", acted.body);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        assignments(&db, &lead).await,
        ["ada", "bea"],
        "reassigned once"
    );
    let fired = db
        .store()
        .read_all(
            1,
            10_000,
            &annals_store::LogFilter::event_types(["TimerFired"]),
        )
        .await
        .unwrap()
        .events;
    assert_eq!(
        fired.len(),
        2,
        "ada's deadline, then bea's: each fired once"
    );
}
