//! The revenue history through the API: every command endpoint, the queries that show
//! its effects (read-your-writes with `min_position`), idempotent retries, `If-Match`,
//! and the conversion process end to end.

use std::sync::Arc;

use reqwest::Method;
use serde_json::{Value, json};

use crate::database::{Backend, Fixture};
use crate::server::{ANALYST, Answer, OPERATOR, Server, TOKENS, WRITER, lead, qualified_lead};

on_both_backends!(
    a_lead_is_captured_scored_assigned_and_read_back_at_once,
    the_lead_board_filters_sorts_and_pages,
    a_qualified_lead_converts_and_the_process_opens_its_account_and_deal,
    accounts_and_deals_follow_their_commands,
    retries_with_an_idempotency_key_append_nothing,
    keyed_duplicates_sent_at_once_never_fail,
    if_match_applies_a_command_only_at_that_version,
    concurrent_commands_on_one_lead_never_both_win_a_version,
    the_funnel_counts_what_happened_in_its_window,
);

async fn a_lead_is_captured_scored_assigned_and_read_back_at_once(db: Arc<Fixture>) {
    let server = Server::start(db.url());
    let captured = server.post("/leads", lead("ada")).await;
    assert_eq!(captured.status, 201, "{}", captured.body);
    let id = captured.body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        captured.header("location"),
        Some(format!("/leads/{id}").as_str())
    );
    assert_eq!(captured.body["version"], 1);
    assert_eq!(captured.body["events"], json!(["LeadCaptured"]));

    // Read-your-writes: every answer after a command, asked with its position, shows it.
    let mut score = 0;
    for (kind, points) in [
        ("page_view", 1),
        ("pricing_page_view", 10),
        ("webinar_attended", 8),
    ] {
        let recorded = server
            .command(&format!("/leads/{id}/signals"), json!({"kind": kind}))
            .await;
        score += points;
        let position = recorded["position"].as_u64().unwrap();
        let read = server
            .call(
                Method::GET,
                &format!("/leads/{id}?min_position={position}"),
                ANALYST,
                None,
                &[],
            )
            .await;
        assert_eq!(read.status, 200, "{}", read.body);
        assert_eq!(read.body["score"], score);
        let seen: u64 = read.header("annals-position").unwrap().parse().unwrap();
        assert!(seen >= position);
    }
    let assigned = server
        .command(&format!("/leads/{id}/assign"), json!({"owner": "grace"}))
        .await;
    let position = assigned["position"].as_u64().unwrap();
    let board = server
        .read(&format!("/leads/{id}?min_position={position}"))
        .await;
    assert_eq!(board["status"], "working");
    assert_eq!(board["owner"], "grace");
    assert_eq!(board["source"], "web");
    assert_eq!(board["company"], "ada Industries");
    assert!(board["captured_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(board["qualified_at"], Value::Null);

    // The second demo request passes 50: qualified, in the same answer.
    let signals = format!("/leads/{id}/signals");
    let first = server
        .command(&signals, json!({"kind": "demo_request"}))
        .await;
    assert_eq!(first["events"], json!(["SignalRecorded"]));
    let second = server
        .command(&signals, json!({"kind": "demo_request"}))
        .await;
    assert_eq!(second["events"], json!(["SignalRecorded", "LeadQualified"]));

    // The events carry who and why.
    let events = server.read(&format!("/streams/lead-{id}/events")).await;
    let first = &events["items"][0];
    assert_eq!(first["type"], "LeadCaptured");
    assert_eq!(first["version"], 1);
    assert_eq!(first["metadata"]["actor"], "wendy");
    assert_eq!(first["metadata"]["schema_version"], 2);
    for key in ["event_id", "correlation_id", "causation_id", "recorded_at"] {
        assert!(first["metadata"][key].is_string(), "{key}: {first}");
    }

    // Disqualifying closes it; a closed lead takes no more signals.
    let other = server.command("/leads", lead("bob")).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    server
        .command(
            &format!("/leads/{other}/disqualify"),
            json!({"reason": "no budget"}),
        )
        .await;
    let refused = server
        .post(
            &format!("/leads/{other}/signals"),
            json!({"kind": "page_view"}),
        )
        .await;
    assert_eq!((refused.status, refused.code()), (409, "lead-closed"));
}

async fn the_lead_board_filters_sorts_and_pages(db: Arc<Fixture>) {
    let server = Server::start(db.url());
    let mut last = 0;
    for (n, source) in [
        "web", "event", "referral", "partner", "web", "outbound", "web",
    ]
    .iter()
    .enumerate()
    {
        let mut body = lead(&format!("lead{n}"));
        body["source"] = json!(source);
        let id = server.command("/leads", body).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        for _ in 0..n {
            last = server
                .command(
                    &format!("/leads/{id}/signals"),
                    json!({"kind": "email_click"}),
                )
                .await["position"]
                .as_u64()
                .unwrap();
        }
        if n % 2 == 0 {
            last = server
                .command(&format!("/leads/{id}/assign"), json!({"owner": "grace"}))
                .await["position"]
                .as_u64()
                .unwrap();
        }
    }
    let all = server
        .read(&format!("/leads?min_position={last}&limit=500"))
        .await;
    let scores: Vec<i64> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["score"].as_i64().unwrap())
        .collect();
    assert_eq!(scores, [18, 15, 12, 9, 6, 3, 0]);
    assert_eq!(all["next_cursor"], Value::Null);

    let web = server.read("/leads?source=web").await;
    assert_eq!(web["items"].as_array().unwrap().len(), 3);
    let grace = server.read("/leads?owner=grace&min_score=10").await;
    let grace_scores: Vec<&Value> = grace["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| &l["score"])
        .collect();
    assert_eq!(grace_scores, [&json!(18), &json!(12)]);
    let working = server.read("/leads?status=working").await;
    assert_eq!(working["items"].as_array().unwrap().len(), 4);

    // Pages of two visit every lead once, in order.
    let mut seen = Vec::new();
    let mut path = "/leads?limit=2".to_owned();
    loop {
        let page = server.read(&path).await;
        for item in page["items"].as_array().unwrap() {
            seen.push(item["score"].as_i64().unwrap());
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/leads?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, scores);
}

async fn a_qualified_lead_converts_and_the_process_opens_its_account_and_deal(db: Arc<Fixture>) {
    let server = Server::start(db.url());
    let id = qualified_lead(&server, "ada").await;
    let converted = server
        .command(
            &format!("/leads/{id}/convert"),
            json!({"deal_name": "Engines", "amount": {"currency": "EUR", "amount_minor": 129900}}),
        )
        .await;
    assert_eq!(converted["events"], json!(["LeadConverted"]));
    let account_id = converted["account_id"].as_str().unwrap().to_owned();
    let deal_id = converted["deal_id"].as_str().unwrap().to_owned();

    // The process opens the account and the deal asynchronously; the boards show them.
    let deal = eventually(&server, &format!("/deals/{deal_id}")).await;
    assert_eq!(deal["account_id"], account_id.as_str());
    assert_eq!(deal["stage"], "prospecting");
    assert_eq!(
        deal["amount"],
        json!({"currency": "EUR", "amount_minor": 129900})
    );
    eventually(&server, &format!("/accounts/{account_id}")).await;
    // Both exist: every read model has applied the log up to the head from here on.
    let head = server.read("/events?limit=1").await["head"].clone();
    let account = server
        .read(&format!("/accounts/{account_id}?min_position={head}"))
        .await;
    assert_eq!(account["name"], "ada Industries");
    assert_eq!(account["converted_leads"], json!([id]));
    assert_eq!(account["deals"][0]["id"], deal_id.as_str());
    let lead = server
        .read(&format!("/leads/{id}?min_position={head}"))
        .await;
    assert_eq!(lead["status"], "converted");
    assert_eq!(lead["converted_deal_id"], deal_id.as_str());

    // A second lead converts into that account, with the deal id the client chose.
    let second = qualified_lead(&server, "grace").await;
    let chosen = uuid::Uuid::now_v7().to_string();
    let converted = server
        .command(
            &format!("/leads/{second}/convert"),
            json!({"deal_name": "More engines", "amount": {"currency": "EUR", "amount_minor": 5000},
                   "account_id": account_id, "deal_id": chosen}),
        )
        .await;
    assert_eq!(converted["deal_id"], chosen.as_str());
    assert_eq!(converted["account_id"], account_id.as_str());
    let mut tries = 0;
    let deals = loop {
        tries += 1;
        assert!(tries < 200, "the second deal never appeared");
        let deals = server
            .read(&format!("/deals?account_id={account_id}"))
            .await;
        if deals["items"].as_array().unwrap().len() == 2 {
            break deals;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(deals["items"][1]["id"], chosen.as_str());

    // Converting into an account that does not exist is refused before anything is
    // appended.
    let third = qualified_lead(&server, "alan").await;
    let refused = server
        .post(
            &format!("/leads/{third}/convert"),
            json!({"deal_name": "X", "amount": {"currency": "EUR", "amount_minor": 1},
                   "account_id": uuid::Uuid::now_v7()}),
        )
        .await;
    assert_eq!((refused.status, refused.code()), (404, "account-not-found"));
    let refused = server
        .post(
            &format!("/leads/{third}/convert"),
            json!({"deal_name": "X", "amount": {"currency": "EUR", "amount_minor": 1},
                   "deal_id": deal_id}),
        )
        .await;
    assert_eq!((refused.status, refused.code()), (409, "deal-exists"));
    let head = server.read("/events?limit=1").await["head"].clone();
    let funnel = server
        .read(&format!("/analytics/funnel?min_position={head}"))
        .await;
    assert_eq!(funnel["overall"]["captured"], 3);
    assert_eq!(funnel["overall"]["qualified"], 3);
    assert_eq!(funnel["overall"]["converted"], 2);
}

/// Reads a path until it exists (the conversion process and projectors run behind).
async fn eventually(server: &Server, path: &str) -> Value {
    for _ in 0..200 {
        let answer = server.get(path).await;
        if answer.status == 200 {
            return answer.body;
        }
        assert_eq!(answer.status, 404, "{path}: {}", answer.body);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{path} never appeared");
}

async fn accounts_and_deals_follow_their_commands(db: Arc<Fixture>) {
    let server = Server::start(db.url());
    let opened = server
        .post(
            "/accounts",
            json!({"name": "Initech", "domain": "initech.example", "industry": "software",
                   "employees": 40}),
        )
        .await;
    assert_eq!(opened.status, 201, "{}", opened.body);
    let account = opened.body["id"].as_str().unwrap().to_owned();
    server
        .command(
            &format!("/accounts/{account}/rename"),
            json!({"name": "Initrode"}),
        )
        .await;
    server
        .command(&format!("/accounts/{account}/tier"), json!({"tier": "key"}))
        .await;
    let same = server
        .post(&format!("/accounts/{account}/tier"), json!({"tier": "key"}))
        .await;
    assert_eq!((same.status, same.code()), (409, "same-tier"));

    let mut deals = Vec::new();
    for (n, owner) in ["grace", "grace", "alan"].iter().enumerate() {
        let opened = server
            .post(
                "/deals",
                json!({"account_id": account, "name": format!("Deal {n}"), "owner": owner,
                       "amount": {"currency": "EUR", "amount_minor": 1000 * (n + 1)},
                       "expected_close": "2027-03-31"}),
            )
            .await;
        assert_eq!(opened.status, 201, "{}", opened.body);
        deals.push(opened.body["id"].as_str().unwrap().to_owned());
    }
    let (a, b, c) = (&deals[0], &deals[1], &deals[2]);
    server
        .command(&format!("/deals/{a}/advance"), json!({"stage": "demo"}))
        .await;
    let back = server
        .post(
            &format!("/deals/{a}/advance"),
            json!({"stage": "qualification"}),
        )
        .await;
    assert_eq!(
        (back.status, back.code()),
        (409, "invalid-stage-transition")
    );
    server
        .command(
            &format!("/deals/{a}/amount"),
            json!({"amount": {"currency": "EUR", "amount_minor": 7000}}),
        )
        .await;
    let dollars = server
        .post(
            &format!("/deals/{a}/amount"),
            json!({"amount": {"currency": "USD", "amount_minor": 7000}}),
        )
        .await;
    assert_eq!((dollars.status, dollars.code()), (422, "currency-mismatch"));
    // Win takes an empty object or no body at all.
    server.command(&format!("/deals/{a}/win"), json!({})).await;
    let won_without_body = server
        .call(Method::POST, &format!("/deals/{b}/win"), WRITER, None, &[])
        .await;
    assert_eq!(won_without_body.status, 200, "{}", won_without_body.body);
    let lost = server
        .command(&format!("/deals/{c}/lose"), json!({"reason": "price"}))
        .await;
    let position = lost["position"].as_u64().unwrap();
    let closed = server.post(&format!("/deals/{c}/win"), json!({})).await;
    assert_eq!((closed.status, closed.code()), (409, "deal-closed"));

    let view = server
        .read(&format!("/accounts/{account}?min_position={position}"))
        .await;
    assert_eq!(view["name"], "Initrode");
    assert_eq!(view["tier"], "key");
    assert_eq!(view["employees"], 40);
    assert_eq!(
        view["won"],
        json!([{"currency": "EUR", "amount_minor": 9000}])
    );
    assert_eq!(view["deals"].as_array().unwrap().len(), 3);

    let won = server.read("/deals?stage=won").await;
    assert_eq!(won["items"].as_array().unwrap().len(), 2);
    let alan = server.read("/deals?owner=alan").await;
    assert_eq!(alan["items"][0]["status"], "lost");
    assert_eq!(alan["items"][0]["lost_reason"], "price");
    let deal = server.read(&format!("/deals/{a}")).await;
    assert_eq!(deal["stage"], "demo");
    assert_eq!(deal["status"], "won");
    assert_eq!(deal["expected_close"], "2027-03-31");
    let pipeline = server.read("/analytics/pipeline").await;
    assert_eq!(
        (pipeline["won"].clone(), pipeline["lost"].clone()),
        (json!(2), json!(1))
    );
    let rate = pipeline["win_rate"].as_f64().unwrap();
    assert!((rate - 2.0 / 3.0).abs() < 1e-9, "{rate}");

    // A deal for an account that does not exist is not found.
    let orphan = server
        .post(
            "/deals",
            json!({"account_id": uuid::Uuid::now_v7(), "name": "X",
                   "amount": {"currency": "EUR", "amount_minor": 1}}),
        )
        .await;
    assert_eq!((orphan.status, orphan.code()), (404, "account-not-found"));
}

async fn retries_with_an_idempotency_key_append_nothing(db: Arc<Fixture>) {
    let server = Server::start(db.url());
    let body = lead("ada");
    let key = [("Idempotency-Key", "capture-ada-1")];
    let first = server
        .call(Method::POST, "/leads", WRITER, Some(&body), &key)
        .await;
    assert_eq!(first.status, 201);
    // The retry gets the first answer, the same server-made id included.
    let retry = server
        .call(Method::POST, "/leads", WRITER, Some(&body), &key)
        .await;
    assert_eq!(retry.status, 201);
    assert_eq!(retry.body, first.body);
    let id = first.body["id"].as_str().unwrap();

    let signal = json!({"kind": "email_click"});
    let key = [("Idempotency-Key", "signal-1")];
    let path = format!("/leads/{id}/signals");
    let once = server
        .call(Method::POST, &path, WRITER, Some(&signal), &key)
        .await;
    let again = server
        .call(Method::POST, &path, WRITER, Some(&signal), &key)
        .await;
    assert_eq!((once.status, again.status), (200, 200));
    assert_eq!(once.body, again.body);
    let events = server.read(&format!("/streams/lead-{id}/events")).await;
    assert_eq!(events["items"].as_array().unwrap().len(), 2);

    // The same key with another body is refused, and appends nothing.
    let other = server
        .call(
            Method::POST,
            &path,
            WRITER,
            Some(&json!({"kind": "page_view"})),
            &key,
        )
        .await;
    assert_eq!(
        (other.status, other.code()),
        (422, "idempotency-key-reused")
    );
    let events = server.read(&format!("/streams/lead-{id}/events")).await;
    assert_eq!(events["items"].as_array().unwrap().len(), 2);

    // Keys are the caller's: another token's same key is a new command.
    let operator = server
        .call(
            Method::POST,
            &path,
            crate::server::OPERATOR,
            Some(&signal),
            &key,
        )
        .await;
    assert_eq!(operator.status, 200);
    assert_eq!(operator.body["version"], 3);

    // Too long a key is refused.
    let long = "k".repeat(201);
    let refused = server
        .call(
            Method::POST,
            &path,
            WRITER,
            Some(&signal),
            &[("Idempotency-Key", &long)],
        )
        .await;
    assert_eq!(
        (refused.status, refused.code()),
        (422, "invalid-idempotency-key")
    );
}

/// A keyed request sent twice at once: each answer is the first's (the same 201 or 200),
/// or 409 `idempotency-key-in-use` with `Retry-After` while the first is in flight;
/// never anything else.
async fn twice_at_once(server: &Server, path: &str, body: &Value, key: &str) -> Answer {
    let headers = [("Idempotency-Key", key)];
    let send = || server.call(Method::POST, path, WRITER, Some(body), &headers);
    let (one, two) = tokio::join!(send(), send());
    let done: Vec<&Answer> = [&one, &two]
        .into_iter()
        .filter(|a| a.status < 300)
        .collect();
    assert!(
        !done.is_empty(),
        "neither try was carried out: {one:?} {two:?}"
    );
    for answer in [&one, &two] {
        match (answer.status, answer.code()) {
            (200 | 201, _) => assert_eq!(answer.body, done[0].body),
            (409, "idempotency-key-in-use") => {
                assert!(answer.header("retry-after").is_some(), "{answer:?}");
            }
            (status, _) => panic!("{path}: {status}: {}", answer.body),
        }
    }
    done[0].clone()
}

async fn count_events(server: &Server, event_type: &str) -> usize {
    let page = server
        .call(
            Method::GET,
            &format!("/events?type={event_type}&limit=500"),
            OPERATOR,
            None,
            &[],
        )
        .await;
    assert_eq!(page.status, 200, "{}", page.body);
    page.body["items"].as_array().unwrap().len()
}

async fn keyed_duplicates_sent_at_once_never_fail(db: Arc<Fixture>) {
    let server = Server::start(db.url());
    // Creates whose id the server makes: each try makes another, only the key ties them.
    let rounds = 6;
    for round in 0..rounds {
        let key = format!("capture-{round}");
        let created = twice_at_once(&server, "/leads", &lead("ada"), &key).await;
        assert_eq!(created.status, 201);
        let account = json!({"name": format!("Acme {round}")});
        let key = format!("open-{round}");
        let opened = twice_at_once(&server, "/accounts", &account, &key).await;
        let deal = json!({"account_id": opened.body["id"], "name": "Engines",
                          "amount": {"currency": "EUR", "amount_minor": 100}});
        twice_at_once(&server, "/deals", &deal, &format!("deal-{round}")).await;
    }
    assert_eq!(count_events(&server, "LeadCaptured").await, rounds);
    assert_eq!(count_events(&server, "AccountOpened").await, rounds);
    assert_eq!(count_events(&server, "DealOpened").await, rounds);

    // A conversion without a `deal_id`: each try makes another deal id.
    for round in 0..3 {
        let id = qualified_lead(&server, "grace").await;
        let body = json!({"deal_name": "Grace engines",
                          "amount": {"currency": "EUR", "amount_minor": 5_000}});
        let key = format!("convert-{round}");
        let converted = twice_at_once(&server, &format!("/leads/{id}/convert"), &body, &key).await;
        assert!(converted.body["deal_id"].is_string(), "{}", converted.body);
    }
    assert_eq!(count_events(&server, "LeadConverted").await, 3);
}

async fn if_match_applies_a_command_only_at_that_version(db: Arc<Fixture>) {
    let server = Server::start(db.url());
    let id = server.command("/leads", lead("ada")).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/leads/{id}/signals");
    let signal = json!({"kind": "page_view"});
    let stale = server
        .call(
            Method::POST,
            &path,
            WRITER,
            Some(&signal),
            &[("If-Match", "\"7\"")],
        )
        .await;
    assert_eq!((stale.status, stale.code()), (412, "version-mismatch"));
    let current = server
        .call(
            Method::POST,
            &path,
            WRITER,
            Some(&signal),
            &[("If-Match", "\"1\"")],
        )
        .await;
    assert_eq!(current.status, 200);
    assert_eq!(current.body["version"], 2);
    let events = server.read(&format!("/streams/lead-{id}/events")).await;
    assert_eq!(events["items"].as_array().unwrap().len(), 2);
    let bad = server
        .call(
            Method::POST,
            &path,
            WRITER,
            Some(&signal),
            &[("If-Match", "soon")],
        )
        .await;
    assert_eq!((bad.status, bad.code()), (400, "invalid-if-match"));
}

async fn concurrent_commands_on_one_lead_never_both_win_a_version(db: Arc<Fixture>) {
    // JSON logs with the handler's decisions: how the test knows every contender decided.
    let server = Arc::new(Server::start_with(
        db.url(),
        &[
            ("ANNALS_API_TOKENS", TOKENS),
            ("ANNALS_LOG_FORMAT", "json"),
            ("RUST_LOG", "info,sqlx=warn,annals_commands=debug"),
        ],
    ));
    let id = server.command("/leads", lead("ada")).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let tasks: Vec<_> = (0..24)
        .map(|_| {
            let (server, id) = (server.clone(), id.clone());
            tokio::spawn(async move {
                server
                    .post(
                        &format!("/leads/{id}/signals"),
                        json!({"kind": "page_view"}),
                    )
                    .await
            })
        })
        .collect();
    let mut versions = Vec::new();
    for task in tasks {
        let answer = task.await.unwrap();
        match answer.status {
            200 => versions.push(answer.body["version"].as_u64().unwrap()),
            409 => assert_eq!(answer.code(), "concurrency-conflict"),
            other => panic!("{other}: {}", answer.body),
        }
    }
    // Every accepted command got a version of its own, and each is in the stream.
    assert!(!versions.is_empty(), "no command got through");
    versions.sort_unstable();
    let expected: Vec<u64> = (2..2 + versions.len() as u64).collect();
    assert_eq!(versions, expected);
    let history = server.read(&format!("/leads/{id}/history")).await;
    assert_eq!(history["version"], 1 + versions.len() as u64);
    assert_eq!(history["state"]["score"], versions.len() as u64);

    // Decisions that depend on the state, sent at once while the database's write lock
    // is held: the first is decided, the others wait their turn (commands to one
    // aggregate take turns on a server, undecided until it commits), so only the first
    // acts on that version and every other is decided on the new state.
    let id = server.command("/leads", lead("grace")).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for kind in ["demo_request", "pricing_page_view", "content_download"] {
        server
            .command(&format!("/leads/{id}/signals"), json!({"kind": kind}))
            .await;
    }
    // At 40, +10 qualifies: six signals decide to qualify the lead, one may.
    let signal = json!({"kind": "pricing_page_view"});
    let answers = sent_at_once_while_held(&db, &server, &id, "signals", &signal, 6).await;
    let mut accepted = 0;
    let mut qualified_by = Vec::new();
    for answer in &answers {
        match (answer.status, answer.code()) {
            (200, _) => {
                accepted += 1;
                if answer.body["events"] == json!(["SignalRecorded", "LeadQualified"]) {
                    qualified_by.push(answer.body["version"].clone());
                } else {
                    assert_eq!(answer.body["events"], json!(["SignalRecorded"]));
                }
            }
            (409, "concurrency-conflict") => {}
            (status, _) => panic!("{status}: {}", answer.body),
        }
    }
    assert_eq!(
        qualified_by.len(),
        1,
        "answers that qualified: {:?}",
        bodies(&answers)
    );
    let events = server.read(&format!("/streams/lead-{id}/events")).await;
    let qualified: Vec<&Value> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "LeadQualified")
        .collect();
    assert_eq!(qualified.len(), 1, "{qualified:?}");
    assert_eq!(qualified[0]["data"]["score"], 50);
    let history = server.read(&format!("/leads/{id}/history")).await;
    assert_eq!(history["state"]["score"], 40 + 10 * accepted);

    // Four assignments to grace: one assigns, the others find her the owner already.
    let owner = json!({"owner": "grace"});
    let answers = sent_at_once_while_held(&db, &server, &id, "assign", &owner, 4).await;
    assert_one_wins(&answers, "already-assigned");
    // Four conversions: one converts, the others find the lead closed.
    let convert = json!({"deal_name": "Grace engines",
                         "amount": {"currency": "EUR", "amount_minor": 5_000}});
    let answers = sent_at_once_while_held(&db, &server, &id, "convert", &convert, 4).await;
    assert_one_wins(&answers, "lead-closed");
    let events = server.read(&format!("/streams/lead-{id}/events")).await;
    for (event_type, once) in [("LeadAssigned", 1), ("LeadConverted", 1)] {
        let seen = events["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == event_type)
            .count();
        assert_eq!(seen, once, "{event_type}");
    }
}

/// Each answer's status and body.
fn bodies(answers: &[Answer]) -> Vec<(u16, &Value)> {
    answers.iter().map(|a| (a.status, &a.body)).collect()
}

/// Exactly one answer is 200; every other is 409 with `refused` (or a conflict after
/// too many lost races).
fn assert_one_wins(answers: &[Answer], refused: &str) {
    let won = answers.iter().filter(|a| a.status == 200).count();
    assert_eq!(won, 1, "{:?}", bodies(answers));
    for answer in answers.iter().filter(|a| a.status != 200) {
        assert_eq!(answer.status, 409, "{}", answer.body);
        assert!(
            [refused, "concurrency-conflict"].contains(&answer.code()),
            "{}",
            answer.body
        );
    }
}

/// Sends `n` copies of a lead command at once while a transaction of the test holds the
/// database's write lock; once the server's log shows one decided on the lead's current
/// version, checks that no other is decided meanwhile (they wait their turn), releases
/// the lock, and returns their answers.
async fn sent_at_once_while_held(
    db: &Fixture,
    server: &Arc<Server>,
    id: &str,
    action: &str,
    body: &Value,
    n: usize,
) -> Vec<Answer> {
    let version = server.read(&format!("/leads/{id}/history")).await["version"]
        .as_u64()
        .unwrap();
    // Inside the server's lock timeout (10 s), so a failure here is the test's own.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(8);
    let stream = format!("lead-{id}");
    let decided = || {
        server
            .logs()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|line| {
                line["target"] == "annals_commands"
                    && line["fields"]["message"] == "decided"
                    && line["fields"]["stream"] == stream.as_str()
            })
            .map(|line| line["fields"]["version"] == version)
            .collect::<Vec<bool>>()
    };
    let before = decided().len();
    let lock = WriteLock::take(db).await;
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (server, path, body) = (
                server.clone(),
                format!("/leads/{id}/{action}"),
                body.clone(),
            );
            tokio::spawn(async move { server.post(&path, body).await })
        })
        .collect();
    loop {
        if decided()[before..].iter().any(|at_version| *at_version) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {action} command decided at version {version}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        decided().len() - before,
        1,
        "one of {n} {action} commands decided while the first is held"
    );
    lock.release().await;
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

/// A transaction of the test's own that holds the lock every writer of the database
/// needs: `BEGIN IMMEDIATE` on SQLite, an `EXCLUSIVE` lock on `events` on PostgreSQL
/// (reads go on; inserts wait).
pub(crate) enum WriteLock {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl WriteLock {
    pub(crate) async fn take(db: &Fixture) -> WriteLock {
        use sqlx::Connection;
        match db.backend() {
            Backend::Sqlite => {
                let mut connection = sqlx::SqliteConnection::connect(db.url()).await.unwrap();
                sqlx::query("BEGIN IMMEDIATE")
                    .execute(&mut connection)
                    .await
                    .unwrap();
                WriteLock::Sqlite(connection)
            }
            Backend::Postgres => {
                let mut connection = sqlx::PgConnection::connect(db.url()).await.unwrap();
                for statement in ["BEGIN", "LOCK TABLE events IN EXCLUSIVE MODE"] {
                    sqlx::query(statement)
                        .execute(&mut connection)
                        .await
                        .unwrap();
                }
                WriteLock::Postgres(connection)
            }
        }
    }

    pub(crate) async fn release(self) {
        match self {
            WriteLock::Sqlite(mut connection) => {
                sqlx::query("ROLLBACK")
                    .execute(&mut connection)
                    .await
                    .unwrap();
            }
            WriteLock::Postgres(mut connection) => {
                sqlx::query("ROLLBACK")
                    .execute(&mut connection)
                    .await
                    .unwrap();
            }
        }
    }
}

async fn the_funnel_counts_what_happened_in_its_window(db: Arc<Fixture>) {
    let server = Server::start(db.url());
    let before = chrono::Utc::now();
    let id = qualified_lead(&server, "ada").await;
    let position = server
        .command(&format!("/leads/{id}/assign"), json!({"owner": "grace"}))
        .await["position"]
        .as_u64()
        .unwrap();
    let after = chrono::Utc::now() + chrono::Duration::seconds(1);
    let at =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let inside = server
        .read(&format!(
            "/analytics/funnel?min_position={position}&from={}&to={}&source=web",
            at(before),
            at(after)
        ))
        .await;
    assert_eq!(inside["overall"]["captured"], 1);
    assert_eq!(inside["overall"]["qualified"], 1);
    assert_eq!(inside["by_source"][0]["source"], "web");
    let later = server
        .read(&format!("/analytics/funnel?from={}", at(after)))
        .await;
    assert_eq!(later["overall"]["captured"], 0);
    let bad = server.get("/analytics/funnel?from=yesterday").await;
    assert_eq!((bad.status, bad.code()), (422, "invalid-parameter"));
    let owners = server.read("/analytics/pipeline?owner=nobody").await;
    assert_eq!(owners["stages"], json!([]));
}
