//! The server as a process: it refuses to run open to the network without tokens, logs
//! the correlation id on every request line (as JSON when asked), counts what it does in
//! its metrics, and exits 0 on SIGTERM after finishing its work.

use std::sync::Arc;

use reqwest::Method;
use serde_json::json;

use crate::database::Fixture;
use crate::server::{Server, TOKENS, WRITER, annals, lead};

on_both_backends!(sigterm_finishes_and_exits_zero_and_the_work_survives);

async fn sigterm_finishes_and_exits_zero_and_the_work_survives(db: Arc<Fixture>) {
    let server = Server::start(db.url());
    let id = server.command("/leads", lead("ada")).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let status = server.terminate();
    assert!(status.success(), "{status:?}\n{}", server.logs());
    assert!(server.logs().contains("stopped"), "{}", server.logs());
    // A new server on the same database finds the lead.
    let again = Server::start(db.url());
    let history = again.read(&format!("/leads/{id}/history")).await;
    assert_eq!(history["version"], 1);
}

#[test]
fn without_tokens_it_serves_only_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("open.db").display());
    let refused = annals()
        .args(["serve", "--database-url", &url, "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0 without ANNALS_API_TOKENS"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let bad_tokens = annals()
        .args(["serve", "--database-url", &url, "--listen", "127.0.0.1:0"])
        .env("ANNALS_API_TOKENS", "admin:secret")
        .output()
        .unwrap();
    assert!(!bad_tokens.status.success());
    let stderr = String::from_utf8_lossy(&bad_tokens.stderr);
    assert!(
        stderr.contains("the role must be writer, analyst or operator"),
        "{stderr}"
    );
}

/// The master key: with SQLite and none given, a key file is made beside the database,
/// readable by its owner only, and used again at the next start (the lead captured under
/// it reads back); a malformed key, or a key that is not the database's, stops the start
/// with a message saying so, never a wrong answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_database_gets_a_key_file_and_a_wrong_key_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keyed.db");
    let url = format!("sqlite://{}", file.display());
    let serve = |env: &[(&str, &str)]| {
        let mut command = annals();
        command
            .env_remove("ANNALS_MASTER_KEY")
            .env("ANNALS_API_TOKENS", TOKENS)
            .args(["serve", "--database-url", &url, "--listen", "127.0.0.1:0"])
            .envs(env.iter().copied());
        command
    };
    // A start that stops at once: the key is checked before anything is served.
    let refused = |env: &[(&str, &str)], says: &str| {
        let output = serve(env).output().unwrap();
        assert!(!output.status.success(), "{env:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(says), "{env:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    };
    refused(&[("ANNALS_MASTER_KEY", "not-hex")], "64 hex characters");

    let mut first = serve(&[]);
    let id = {
        let server = Server::start_command(&mut first);
        let id = server.command("/leads", lead("kim")).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        server.terminate();
        id
    };
    let key_file = dir.path().join("keyed.db.key");
    let key = std::fs::read_to_string(&key_file).unwrap();
    assert_eq!(key.trim().len(), 64, "{key}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    let mut second = serve(&[]);
    let server = Server::start_command(&mut second);
    let lead = server.read(&format!("/leads/{id}/personal-data")).await;
    assert_eq!(lead["name"], "kim", "{lead}");
    server.terminate();

    let other = "ab".repeat(32);
    refused(
        &[("ANNALS_MASTER_KEY", other.as_str())],
        "not the master key this database was started with",
    );
}

/// PostgreSQL's servers must share a key: without one, the start stops and says how to
/// give it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_without_a_master_key_is_refused_at_start() {
    crate::database::run(
        crate::database::Backend::Postgres,
        |db: Arc<Fixture>| async move {
            let output = annals()
                .env_remove("ANNALS_MASTER_KEY")
                .args([
                    "serve",
                    "--database-url",
                    db.url(),
                    "--listen",
                    "127.0.0.1:0",
                ])
                .output()
                .unwrap();
            assert!(!output.status.success());
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                stderr.contains("PostgreSQL needs a master key")
                    && stderr.contains("ANNALS_MASTER_KEY"),
                "{stderr}"
            );
        },
    )
    .await;
}

/// A response deadline that is not a duration stops the start with a message naming it;
/// nothing is served.
#[test]
fn a_lead_response_deadline_that_is_not_a_duration_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("deadline.db").display());
    for bad in ["soon", "0s", "1.5h", "24", "-1h"] {
        let refused = annals()
            .args(["serve", "--database-url", &url, "--listen", "127.0.0.1:0"])
            .env("ANNALS_LEAD_RESPONSE_DEADLINE", bad)
            .output()
            .unwrap();
        assert!(!refused.status.success(), "{bad}");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            stderr.contains("ANNALS_LEAD_RESPONSE_DEADLINE"),
            "{bad}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// A lease life under a second (which would cut the server's own sessions, the idle
/// transaction bound being at most the life) stops the start with a message naming it.
#[test]
fn a_lease_life_under_a_second_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("lease.db").display());
    for bad in ["1ms", "999ms", "soon"] {
        let refused = annals()
            .args(["serve", "--database-url", &url, "--listen", "127.0.0.1:0"])
            .env("ANNALS_LEASE_TTL", bad)
            .output()
            .unwrap();
        assert!(!refused.status.success(), "{bad}");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains("ANNALS_LEASE_TTL"), "{bad}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_on_loopback_logs_json_with_the_correlation_id_and_counts_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("anonymous.db").display());
    let server = Server::start_with(
        &url,
        &[
            ("ANNALS_LOG_FORMAT", "json"),
            ("RUST_LOG", "info,annals_api=debug"),
        ],
    );
    assert!(server.logs().contains("ANNALS_API_TOKENS is unset"));
    // Anonymous mode: no token needed, and the actor is `anonymous`.
    let captured = server
        .call(
            Method::POST,
            "/leads",
            None,
            Some(&lead("ada")),
            &[("Correlation-Id", "trace-me-42")],
        )
        .await;
    assert_eq!(captured.status, 201);
    assert_eq!(captured.header("correlation-id"), Some("trace-me-42"));
    let id = captured.body["id"].as_str().unwrap();
    let events = server
        .call(
            Method::GET,
            &format!("/streams/lead-{id}/events"),
            None,
            None,
            &[],
        )
        .await;
    assert_eq!(events.body["items"][0]["metadata"]["actor"], "anonymous");
    assert_eq!(
        events.body["items"][0]["metadata"]["correlation_id"],
        "trace-me-42"
    );
    let assign = json!({"owner": "grace"});
    let path = format!("/leads/{id}/assign");
    let assigned = server
        .call(Method::POST, &path, WRITER, Some(&assign), &[])
        .await;
    assert_eq!(assigned.status, 200);
    let again = server
        .call(Method::POST, &path, WRITER, Some(&assign), &[])
        .await;
    assert_eq!(again.status, 409);

    let metrics = server.call(Method::GET, "/metrics", None, None, &[]).await;
    assert_eq!(metrics.status, 200);
    let text = reqwest::get(format!("{}/metrics", server.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for expected in [
        "annals_commands_total{command=\"Capture\",outcome=\"ok\"} 1",
        "annals_commands_total{command=\"Assign\",outcome=\"already-assigned\"} 1",
        "annals_append_duration_seconds_bucket",
        "annals_projection_lag{projection=\"lead_board\"}",
        "annals_http_requests_total{method=\"POST\",route=\"/leads\",status=\"201\"} 1",
    ] {
        assert!(text.contains(expected), "{expected} not in:\n{text}");
    }
    // Every line logged for the request is JSON and carries its correlation id.
    let logs = server.logs();
    // Every line is JSON; every line logged while a request ran names its
    // correlation id, and the one we sent is among them.
    let mut ids = Vec::new();
    for line in logs.lines() {
        let parsed: serde_json::Value = serde_json::from_str(line).unwrap();
        if parsed["fields"]["message"] == "answered" {
            let id = parsed["span"]["correlation_id"].as_str();
            assert!(id.is_some_and(|id| !id.is_empty()), "{line}");
            ids.extend(id.map(str::to_owned));
        }
    }
    assert!(ids.len() >= 4, "{logs}");
    assert!(ids.iter().any(|id| id == "trace-me-42"), "{logs}");
}
