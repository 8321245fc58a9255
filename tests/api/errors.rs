//! Every error status of `api.md`, as problem+json with a stable code, and nothing
//! stored by a refused request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::database::Fixture;
use crate::server::{ANALYST, OPERATOR, Server, WRITER, lead};

on_both_backends!(
    every_refusal_is_a_problem_with_a_stable_code,
    a_query_that_cannot_reach_its_position_is_503_with_retry_after,
    a_min_position_beyond_the_head_is_the_clients_error_at_once,
    the_server_enforces_the_bounds_and_forms_the_document_states,
    a_server_error_says_nothing_of_the_insides,
    an_analytics_window_that_holds_no_instant_is_refused,
);

fn assert_problem(answer: &crate::server::Answer, status: u16, code: &str) {
    assert_eq!(
        (answer.status, answer.code()),
        (status, code),
        "{}",
        answer.body
    );
    assert_eq!(
        answer.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(answer.body["status"], status);
    assert_eq!(answer.body["type"], format!("urn:annals:problem:{code}"));
    assert!(answer.body["title"].is_string() && answer.body["detail"].is_string());
}

/// A body as bytes, exactly as given, to `POST /leads`.
async fn raw(server: &Server, body: &[u8]) -> crate::server::Answer {
    raw_to(server, "/leads", body).await
}

async fn raw_to(server: &Server, path: &str, body: &[u8]) -> crate::server::Answer {
    let response = reqwest::Client::new()
        .post(format!("{}{path}", server.base))
        .bearer_auth("writer-token")
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body: Value = response.json().await.unwrap();
    crate::server::Answer {
        status,
        headers,
        body,
    }
}

async fn every_refusal_is_a_problem_with_a_stable_code(db: Arc<Fixture>) {
    let server = Server::start(db.url());
    let ada = lead("ada");
    let id = server.command("/leads", ada.clone()).await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // 400: not JSON, not UTF-8, nested past any sense.
    assert_problem(&raw(&server, b"{\"email\": ").await, 400, "malformed-json");
    assert_problem(&raw(&server, b"\x00\x01").await, 400, "malformed-json");
    assert_problem(
        &raw(&server, b"{\"email\": \"\xff\xfe\"}").await,
        400,
        "malformed-json",
    );
    // Deep nesting is refused, by the parser's depth limit or as the wrong shape.
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep = raw(&server, deep.as_bytes()).await;
    assert!(matches!(deep.status, 400 | 422), "{}", deep.body);
    // 401 and 403.
    let anonymous = server
        .call(Method::POST, "/leads", None, Some(&lead("x")), &[])
        .await;
    assert_problem(&anonymous, 401, "unauthorized");
    assert_eq!(anonymous.header("www-authenticate"), Some("Bearer"));
    let unknown = server
        .call(Method::POST, "/leads", Some("guess"), Some(&lead("x")), &[])
        .await;
    assert_problem(&unknown, 401, "unauthorized");
    let analyst = server
        .call(Method::POST, "/leads", ANALYST, Some(&lead("x")), &[])
        .await;
    assert_problem(&analyst, 403, "forbidden");
    // 404: an unknown lead, an id that is no id, a path that is nothing.
    let nobody = uuid::Uuid::now_v7();
    assert_problem(
        &server
            .post(
                &format!("/leads/{nobody}/signals"),
                json!({"kind": "page_view"}),
            )
            .await,
        404,
        "lead-not-found",
    );
    assert_problem(
        &server
            .post(
                "/leads/../../etc/passwd/signals",
                json!({"kind": "page_view"}),
            )
            .await,
        404,
        "not-found",
    );
    assert_problem(
        &server
            .post(
                "/leads/1%27%20OR%201=1/signals",
                json!({"kind": "page_view"}),
            )
            .await,
        404,
        "not-found",
    );
    assert_problem(
        &server.get(&format!("/leads/{nobody}")).await,
        404,
        "lead-not-found",
    );
    assert_problem(&server.get("/nothing/here").await, 404, "not-found");
    // 405.
    assert_problem(
        &server
            .call(Method::DELETE, "/leads", WRITER, None, &[])
            .await,
        405,
        "method-not-allowed",
    );
    // 409: the email is another lead's; the answer names it to a role that reads leads
    // (the operator), and not to a writer.
    let duplicate = server
        .call(Method::POST, "/leads", OPERATOR, Some(&ada), &[])
        .await;
    assert_problem(&duplicate, 409, "duplicate-email");
    assert_eq!(duplicate.body["existing_id"], id.as_str());
    let duplicate = server.post("/leads", ada.clone()).await;
    assert_problem(&duplicate, 409, "duplicate-email");
    assert!(
        duplicate.body.get("existing_id").is_none(),
        "{}",
        duplicate.body
    );
    assert!(
        !duplicate.body.to_string().contains(&id),
        "{}",
        duplicate.body
    );
    // 412 is If-Match's (see flows). 413: over 1 MiB.
    let huge =
        json!({"email": "a@b.example", "name": "x".repeat(2 * 1024 * 1024), "source": "web"});
    assert_problem(&server.post("/leads", huge).await, 413, "body-too-large");
    // 415: not JSON by its content type.
    let form = reqwest::Client::new()
        .post(format!("{}/leads", server.base))
        .bearer_auth("writer-token")
        .header("content-type", "text/plain")
        .body("email=a")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status().as_u16(), 415);
    // 422: unknown fields, wrong types, broken rules, bad parameters.
    let mut extra = lead("y");
    extra["admin"] = json!(true);
    assert_problem(&server.post("/leads", extra).await, 422, "invalid-request");
    assert_problem(
        &server
            .post("/leads", json!({"email": 5, "name": "x", "source": "web"}))
            .await,
        422,
        "invalid-request",
    );
    assert_problem(
        &raw(&server, b"{\"email\": \"a@b.example\", \"email\": \"c@d.example\", \"name\": \"x\", \"source\": \"web\"}").await,
        422,
        "invalid-request",
    );
    let mut bad_email = lead("z");
    bad_email["email"] = json!("not-an-email");
    assert_problem(
        &server.post("/leads", bad_email).await,
        422,
        "invalid-email",
    );
    let mut bad_source = lead("z");
    bad_source["source"] = json!("telepathy");
    assert_problem(
        &server.post("/leads", bad_source).await,
        422,
        "unknown-value",
    );
    assert_problem(
        &server
            .post("/accounts", json!({"name": "Negative", "employees": -1}))
            .await,
        422,
        "negative-number",
    );
    for bad in [
        "limit=0",
        "limit=501",
        "limit=ten",
        "min_score=-1",
        "status=sleeping",
        "cursor=zz",
    ] {
        let code = if bad.starts_with("cursor") {
            "invalid-cursor"
        } else {
            "invalid-parameter"
        };
        assert_problem(&server.get(&format!("/leads?{bad}")).await, 422, code);
    }
    assert_problem(
        &server.get("/leads?source=telepathy").await,
        422,
        "unknown-value",
    );
    assert_problem(
        &server.get("/deals?stage=closing").await,
        422,
        "unknown-value",
    );
    // NUL never reaches a database; amounts have a ceiling.
    for path in [
        "/leads?owner=%00",
        "/deals?owner=a%00b",
        "/events?type=%00",
        "/analytics/pipeline?owner=%00",
    ] {
        assert_problem(&server.get(path).await, 422, "invalid-parameter");
    }
    assert_problem(
        &server.post("/accounts", json!({"name": "Acme\u{0}"})).await,
        422,
        "invalid-text",
    );
    // Numbers past any integer type, or with a fractional part, are not amounts.
    for amount in ["123456789012345678901234567890", "1e30", "12.5"] {
        let body = format!(
            r#"{{"account_id": "{}", "name": "X", "amount": {{"currency": "EUR", "amount_minor": {amount}}}}}"#,
            uuid::Uuid::now_v7()
        );
        assert_problem(
            &raw_to(&server, "/deals", body.as_bytes()).await,
            422,
            "invalid-request",
        );
    }
    assert_problem(
        &server.get("/leads?limit=99999999999999999999").await,
        422,
        "invalid-parameter",
    );
    // SQL in a filter is a value like any other: it matches nothing.
    let injected = server.read("/leads?owner=%27%20OR%201%3D1%20--").await;
    assert_eq!(injected["items"], json!([]));
    let big = 10_000_000_000_000_000_i64;
    assert_problem(
        &server
            .post(
                "/deals",
                json!({"account_id": uuid::Uuid::now_v7(), "name": "Big",
                       "amount": {"currency": "EUR", "amount_minor": big}}),
            )
            .await,
        422,
        "number-too-large",
    );

    // Nothing refused was stored: the log holds the one capture.
    let log = server.read("/events").await;
    assert_eq!(log["items"].as_array().unwrap().len(), 1);
    // No answer leaks SQL or paths.
    assert!(!duplicate.body.to_string().contains("SELECT"));
}

async fn a_query_that_cannot_reach_its_position_is_503_with_retry_after(db: Arc<Fixture>) {
    // A wait long enough to tell from the time a request takes, so that both an answer
    // that did not wait and one that waited longer are seen.
    let wait = Duration::from_secs(2);
    let server = Server::start_with(
        db.url(),
        &[
            ("ANNALS_API_TOKENS", crate::server::TOKENS),
            ("ANNALS_CONSISTENCY_WAIT_MS", "2000"),
        ],
    );
    // A position the read model does not reach within the wait: the lead board is
    // halted before a poisoned event, and the lead captured after it waits behind it.
    db.store()
        .append(annals_store::AppendRequest::new(
            annals_store::StreamName::parse("lead-poisoned").unwrap(),
            annals_store::ExpectedVersion::NoStream,
            vec![annals_store::NewEvent::new(
                "LeadCaptured",
                json!({"bogus": 1}),
            )],
        ))
        .await
        .unwrap();
    let position = server.command("/leads", lead("late")).await["position"]
        .as_u64()
        .unwrap();
    let started = Instant::now();
    let lagging = server.get(&format!("/leads?min_position={position}")).await;
    let took = started.elapsed();
    assert_problem(&lagging, 503, "projection-lagging");
    assert!(lagging.header("retry-after").is_some());
    // Answered once the wait ran out: not before, and not much after.
    assert!(
        took >= wait && took < wait + Duration::from_secs(1),
        "answered after {took:?}, the wait is {wait:?}"
    );
    // A request that outlasts the request timeout is cut off with a 503 of its own.
    let impatient = Server::start_with(
        db.url(),
        &[
            ("ANNALS_API_TOKENS", crate::server::TOKENS),
            ("ANNALS_CONSISTENCY_WAIT_MS", "5000"),
            ("ANNALS_REQUEST_TIMEOUT_MS", "200"),
        ],
    );
    let started = Instant::now();
    let cut_off = impatient
        .get(&format!("/leads?min_position={position}"))
        .await;
    let took = started.elapsed();
    assert_problem(&cut_off, 503, "timeout");
    // At the request timeout (200 ms), long before the consistency wait (5 s).
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(2),
        "answered after {took:?}"
    );
}

/// api.md: a `min_position` beyond the log's last position is not a position this log
/// has given out: 422 `invalid-parameter`, at once (not a 503 after the whole wait:
/// the client's mistake is not an outage, and retrying it cannot help).
async fn a_min_position_beyond_the_head_is_the_clients_error_at_once(db: Arc<Fixture>) {
    // A wait long enough that answering after it would be seen.
    let server = Server::start_with(
        db.url(),
        &[
            ("ANNALS_API_TOKENS", crate::server::TOKENS),
            ("ANNALS_CONSISTENCY_WAIT_MS", "10000"),
        ],
    );
    let head = server.command("/leads", lead("head")).await["position"]
        .as_u64()
        .unwrap();
    let id = uuid::Uuid::now_v7();
    let queries = [
        "/leads?".to_owned(),
        format!("/leads/{id}?"),
        format!("/accounts/{id}?"),
        "/deals?".to_owned(),
        format!("/deals/{id}?"),
        "/analytics/funnel?".to_owned(),
        "/analytics/pipeline?".to_owned(),
    ];
    for query in &queries {
        for beyond in [head + 1, 1_000_000, i64::MAX as u64] {
            let started = std::time::Instant::now();
            let answer = server.get(&format!("{query}min_position={beyond}")).await;
            assert_problem(&answer, 422, "invalid-parameter");
            assert!(answer.header("retry-after").is_none());
            assert!(
                started.elapsed() < std::time::Duration::from_secs(2),
                "{query}: {:?}",
                started.elapsed()
            );
        }
    }
    // The head itself is a position the log gave out: answered once it is applied.
    let answer = server.get(&format!("/leads?min_position={head}")).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(
        answer
            .header("annals-position")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= head
    );
}

/// An analytics window is `[from, to)`: one whose `from` is not before its `to` holds no
/// instant, and is refused (422 `invalid-window`) rather than answered with figures.
async fn an_analytics_window_that_holds_no_instant_is_refused(db: Arc<Fixture>) {
    let server = Server::start(db.url());
    let (early, late) = ("2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z");
    for path in [
        "/analytics/funnel",
        "/analytics/revenue",
        "/analytics/response-times",
    ] {
        for (from, to) in [(late, early), (early, early)] {
            let answer = server.get(&format!("{path}?from={from}&to={to}")).await;
            assert_problem(&answer, 422, "invalid-window");
        }
        let answer = server.get(&format!("{path}?from={early}&to={late}")).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.body);
        for one_side in [format!("from={late}"), format!("to={early}")] {
            let answer = server.get(&format!("{path}?{one_side}")).await;
            assert_eq!(answer.status, 200, "{path}?{one_side}: {}", answer.body);
        }
    }
}

/// The rules the OpenAPI document states (`api/src/contract.rs`) are the ones the server
/// enforces, no more and no less: what the document allows is taken, what it forbids is
/// refused. schemathesis checks the same both ways (`tests/fuzz/run.sh`); these are the
/// cases it found.
async fn the_server_enforces_the_bounds_and_forms_the_document_states(db: Arc<Fixture>) {
    let server = Server::start(db.url());
    let answer = server.command("/leads", lead("ada")).await;
    let id = answer["id"].as_str().unwrap().to_owned();
    let signal = format!("/leads/{id}/signals");
    let page_view = json!({"kind": "page_view"});
    let with = async |headers: &[(&str, &str)]| {
        server
            .call(Method::POST, &signal, WRITER, Some(&page_view), headers)
            .await
    };

    // If-Match: exactly `"<version>"` (at most 18 digits).
    let current = with(&[("If-Match", "\"1\"")]).await;
    assert_eq!(current.status, 200, "{}", current.body);
    assert_problem(
        &with(&[("If-Match", "\"1\"")]).await,
        412,
        "version-mismatch",
    );
    for bad in [
        "2",
        "W/\"2\"",
        "\"2",
        "\"\"",
        "\"+2\"",
        "\"1234567890123456789\"",
        "*",
    ] {
        assert_problem(&with(&[("If-Match", bad)]).await, 400, "invalid-if-match");
    }
    // Idempotency-Key: 1–200 visible ASCII characters, spaces only inside.
    let longest = "k".repeat(200);
    assert_eq!(with(&[("Idempotency-Key", &longest)]).await.status, 200);
    assert_eq!(with(&[("Idempotency-Key", "a key")]).await.status, 200);
    for bad in ["k".repeat(201), "a\tkey".to_owned()] {
        assert_problem(
            &with(&[("Idempotency-Key", &bad)]).await,
            422,
            "invalid-idempotency-key",
        );
    }

    // Integers: within the documented minimum and maximum (int64), else 422.
    let beyond_int64 = "9223372036854775808";
    for path in [
        format!("/leads/{id}/history?version={beyond_int64}"),
        format!("/leads?min_position={beyond_int64}"),
        format!("/events?from_position={beyond_int64}"),
        format!("/streams/lead-{id}/events?from_version={beyond_int64}"),
        format!("/streams/lead-{id}/events?from_version=0"),
        format!("/leads?min_score={beyond_int64}"),
        "/leads?limit=501".to_owned(),
        "/deals?limit=0".to_owned(),
    ] {
        assert_problem(&server.get(&path).await, 422, "invalid-parameter");
    }
    for path in [
        format!("/leads/{id}/history?version=9223372036854775807"),
        "/events?from_position=9223372036854775807".to_owned(),
        format!("/streams/lead-{id}/events?from_version=9223372036854775807"),
        "/leads?min_score=9223372036854775807&limit=500".to_owned(),
    ] {
        let answer = server.get(&path).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.body);
    }
    // History takes `as_of` and `version` together: the earlier of the two.
    let both = server
        .read(&format!(
            "/leads/{id}/history?version=1&as_of=2999-01-01T00:00:00Z"
        ))
        .await;
    assert_eq!(both["version"], 1);

    // Cursors have a documented form; every string of it is served.
    for (path, cursor) in [
        ("/events", "+5"),
        ("/events", "12345678901234567890"),
        ("/leads", "abc"),
        ("/leads", "1_a"),
        ("/deals", "1_a_b"),
    ] {
        assert_problem(
            &server.get(&format!("{path}?cursor={cursor}")).await,
            422,
            "invalid-cursor",
        );
    }
    for (path, cursor) in [
        ("/events", "9999999999999999999"),
        ("/leads", "-5__"),
        (
            "/leads",
            "9999999999999999999_2026-01-01T00:00:00.000000Z_x",
        ),
        ("/deals", "0_"),
    ] {
        let answer = server.get(&format!("{path}?cursor={cursor}")).await;
        assert_eq!(
            answer.status, 200,
            "{path}?cursor={cursor}: {}",
            answer.body
        );
    }

    // An integer is one by JSON Schema's count: however it is written, without a
    // fractional part (the account does not exist: the amount was read).
    for amount in ["50.0", "5e1", "-0.0"] {
        let body = format!(
            r#"{{"account_id": "{}", "name": "X", "amount": {{"currency": "EUR", "amount_minor": {amount}}}}}"#,
            uuid::Uuid::now_v7()
        );
        assert_problem(
            &raw_to(&server, "/deals", body.as_bytes()).await,
            404,
            "account-not-found",
        );
    }
    let employees = server
        .post("/accounts", json!({"name": "Floaty", "employees": 40.0}))
        .await;
    assert_eq!(employees.status, 201, "{}", employees.body);
    // An empty If-Match or Idempotency-Key is none (an empty list: no condition).
    assert_eq!(
        with(&[("If-Match", ""), ("Idempotency-Key", "")])
            .await
            .status,
        200
    );

    // Free text: 1–N characters once trimmed, however much white space is around it.
    let padded = format!("  {}  ", "n".repeat(200));
    let mut body = lead("padded");
    body["name"] = json!(padded);
    assert_eq!(server.post("/leads", body).await.status, 201);
    let mut body = lead("blank");
    body["name"] = json!(" \u{3000}\t");
    assert_problem(&server.post("/leads", body).await, 422, "invalid-text");
    // An email: at most 254 characters as sent, white space around it included.
    let local = "e".repeat(254 - "@example.com".len() - 1);
    let mut body = lead("spaced");
    body["email"] = json!(format!(" {local}@example.com"));
    assert_eq!(server.post("/leads", body).await.status, 201);
    let mut body = lead("wide");
    body["email"] = json!(format!("  {local}@example.com"));
    assert_problem(&server.post("/leads", body).await, 422, "invalid-email");
}

/// api.md: a 5xx says nothing of the server's insides; the cause goes to its log. The
/// store made unavailable (another writer holds the writers' lock past the server's wait
/// for it), and internal errors forced three ways (a table gone from under the event
/// store, one gone from under a read model, an event written behind the domain's back
/// that no longer decodes): each answer is the generic problem, with no SQL, no table,
/// no path, no type name, and nothing of the error chain the server logged for it.
async fn a_server_error_says_nothing_of_the_insides(db: Arc<Fixture>) {
    let server = Server::start_with(
        db.url(),
        &[
            ("ANNALS_API_TOKENS", crate::server::TOKENS),
            ("ANNALS_LOG_FORMAT", "json"),
        ],
    );
    let id = server.command("/leads", lead("ada")).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let signal = format!("/leads/{id}/signals");
    let page_view = json!({"kind": "page_view"});
    // Each request names itself (`Correlation-Id`), which finds its line in the log.
    let call = async |method: Method, path: &str, body: Option<&Value>, name: &str| {
        let token = if method == Method::GET {
            OPERATOR
        } else {
            WRITER
        };
        let headers = [("Correlation-Id", name), ("Idempotency-Key", name)];
        let answer = server.call(method, path, token, body, &headers).await;
        (name.to_owned(), answer)
    };
    let mut failed = Vec::new();

    // 503: the store is unavailable.
    let held = db
        .hold_append(annals_store::AppendRequest::new(
            annals_store::StreamName::parse("lead-holder").unwrap(),
            annals_store::ExpectedVersion::Any,
            vec![annals_store::NewEvent::new("Held", json!({}))],
        ))
        .await;
    failed.push((
        503,
        call(Method::POST, &signal, Some(&page_view), "store-unavailable").await,
    ));
    held.commit().await.unwrap();

    // 500: the event store's table of idempotency keys is gone (a keyed command reads it).
    db.execute("ALTER TABLE idempotency_keys RENAME TO idempotency_keys_gone")
        .await;
    failed.push((
        500,
        call(Method::POST, &signal, Some(&page_view), "store-table-gone").await,
    ));
    db.execute("ALTER TABLE idempotency_keys_gone RENAME TO idempotency_keys")
        .await;

    // 500: the lead board's table is gone.
    db.execute("ALTER TABLE lead_board RENAME TO lead_board_gone")
        .await;
    failed.push((
        500,
        call(Method::GET, "/leads", None, "read-model-table-gone").await,
    ));
    db.execute("ALTER TABLE lead_board_gone RENAME TO lead_board")
        .await;

    // 500: a lead whose stored event no longer decodes.
    let broken = uuid::Uuid::now_v7();
    db.store()
        .append(annals_store::AppendRequest::new(
            annals_store::StreamName::parse(format!("lead-{broken}")).unwrap(),
            annals_store::ExpectedVersion::NoStream,
            vec![annals_store::NewEvent::new(
                "LeadCaptured",
                json!({"bogus": true}),
            )],
        ))
        .await
        .unwrap();
    failed.push((
        500,
        call(
            Method::POST,
            &format!("/leads/{broken}/signals"),
            Some(&page_view),
            "undecodable-event",
        )
        .await,
    ));

    for (status, (name, answer)) in &failed {
        let code = if *status == 503 {
            "unavailable"
        } else {
            "internal"
        };
        assert_problem(answer, *status, code);
        let mut fields: Vec<&String> = answer.body.as_object().unwrap().keys().collect();
        fields.sort();
        assert_eq!(
            fields,
            ["code", "detail", "status", "title", "type"],
            "{name}"
        );
        let body = answer.body.to_string();
        let detail = answer.body["detail"].as_str().unwrap();
        // What the server logged of it: the error and its sources (the log is read from
        // the server's stderr as it comes, so its line may follow the answer).
        let deadline = Instant::now() + Duration::from_secs(10);
        let logged = loop {
            let logged = logged_errors(&server.logs(), name);
            if !logged.is_empty() {
                break logged;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: nothing logged\n{}",
                server.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        for error in &logged {
            for part in error.split(": ").filter(|p| p.len() >= 8) {
                assert!(
                    !body.contains(part),
                    "{name}: the answer carries {part:?} of the logged error {error:?}: {body}"
                );
            }
        }
        for inside in [
            "SELECT",
            "INSERT",
            "relation",
            "table",
            "idempotency_keys",
            "lead_board",
            "sqlx",
            "SQLite",
            "sqlite",
            "Postgres",
            "postgres",
            "database error",
            "LeadCaptured",
            "bogus",
            "missing field",
            "Error",
            "::",
            "(",
            "{",
            "/",
            ".rs",
        ] {
            assert!(!detail.contains(inside), "{name}: {inside:?} in {body}");
        }
        assert!(!body.contains(db.url()), "{name}: {body}");
        if let Some(database) = db.database_name() {
            assert!(!body.contains(database), "{name}: {body}");
        }
    }
}

/// The errors the server logged (JSON lines) for the request with this correlation id.
fn logged_errors(logs: &str, correlation_id: &str) -> Vec<String> {
    logs.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["span"]["correlation_id"] == correlation_id)
        .filter_map(|line| line["fields"]["error"].as_str().map(str::to_owned))
        .collect()
}
