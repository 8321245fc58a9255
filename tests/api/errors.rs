//! Every error status of `api.md`, as problem+json with a stable code, and nothing
//! stored by a refused request.

use std::sync::Arc;

use reqwest::Method;
use serde_json::{Value, json};

use crate::database::Fixture;
use crate::server::{ANALYST, Server, WRITER, lead};

on_both_backends!(
    every_refusal_is_a_problem_with_a_stable_code,
    a_query_that_cannot_reach_its_position_is_503_with_retry_after,
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
    // 409: the email is another lead's, and the answer names it.
    let duplicate = server.post("/leads", ada.clone()).await;
    assert_problem(&duplicate, 409, "duplicate-email");
    assert_eq!(duplicate.body["existing_id"], id.as_str());
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
    // Numbers past any integer type, or written as floats, are not amounts.
    for amount in ["123456789012345678901234567890", "1e30", "12.5", "-0.0"] {
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
    let server = Server::start_with(
        db.url(),
        &[
            ("ANNALS_API_TOKENS", crate::server::TOKENS),
            ("ANNALS_CONSISTENCY_WAIT_MS", "300"),
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
    let lagging = server.get(&format!("/leads?min_position={position}")).await;
    assert_problem(&lagging, 503, "projection-lagging");
    assert!(lagging.header("retry-after").is_some());
    // A request that outlasts the request timeout is cut off with a 503 of its own.
    let impatient = Server::start_with(
        db.url(),
        &[
            ("ANNALS_API_TOKENS", crate::server::TOKENS),
            ("ANNALS_CONSISTENCY_WAIT_MS", "5000"),
            ("ANNALS_REQUEST_TIMEOUT_MS", "200"),
        ],
    );
    let started = std::time::Instant::now();
    let cut_off = impatient
        .get(&format!("/leads?min_position={position}"))
        .await;
    assert_problem(&cut_off, 503, "timeout");
    assert!(started.elapsed() < std::time::Duration::from_secs(4));
    // A position past the head of the log was never given out: refused at once.
    let started = std::time::Instant::now();
    let analytics = server.get("/analytics/funnel?min_position=1000000").await;
    assert_problem(&analytics, 503, "projection-lagging");
    assert!(started.elapsed() < std::time::Duration::from_millis(300));
}
