//! Black-box tests: the real `annals` binary, run as a user would run it, against a
//! temporary SQLite file or a PostgreSQL server.

// A test that cannot go on should stop loudly; `unwrap` says so shortest.
#![allow(clippy::unwrap_used)]

#[macro_use]
#[path = "support/database.rs"]
mod database;

use std::process::Command;
use std::sync::Arc;

use annals_store::ExpectedVersion;
use database::{Fixture, append, event};

/// The master key every run of the binary on a test database shares.
const MASTER_KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0";

fn annals() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_annals"));
    command
        .env_remove("ANNALS_MASTER_KEY_FILE")
        .env("ANNALS_MASTER_KEY", MASTER_KEY);
    command
}

#[test]
fn migrate_creates_a_sqlite_database_from_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("new.db").display());
    let output = annals()
        .args(["migrate", "--database-url", &url])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("the log holds 0 events"));
    assert!(dir.path().join("new.db").exists());
    // Running it again is harmless.
    let again = annals()
        .args(["migrate", "--database-url", &url])
        .output()
        .unwrap();
    assert!(again.status.success());
}

#[test]
fn a_bad_database_url_is_one_clear_line_and_a_failure() {
    for url in ["mysql://x", "postgres://nobody@127.0.0.1:1/none"] {
        let output = annals()
            .args(["migrate", "--database-url", url])
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.starts_with("annals: "), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

on_both_backends!(
    the_demo_history_replays_verifies_audits_and_prints,
    an_audit_anchor_shows_a_log_rewritten_with_every_hash_recomputed,
    parked_events_are_listed_retried_and_skipped_from_the_command_line,
    a_lead_is_erased_and_its_personal_data_printed_from_the_command_line,
    keys_migrate_reports_what_an_older_build_stored_in_clear_and_rekeys_its_claims,
);

fn run(args: &[&str]) -> (bool, String, String) {
    let output = annals().args(args).output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn the_demo_history_replays_verifies_audits_and_prints(db: Arc<Fixture>) {
    let url = db.url();
    let demo = [
        "demo",
        "--leads",
        "100",
        "--seed",
        "7",
        "--database-url",
        url,
    ];
    let (ok, out, err) = run(&demo);
    assert!(ok, "{err}");
    assert!(out.contains("demo (seed 7): 100 leads"), "{out}");
    let head = db.store().head().await.unwrap();
    assert!(head > 100, "the demo wrote only {head} events");
    // Every kind of history is there: conversions, deals won and lost, orders.
    let log = db.store();
    let page = log
        .read_all(1, 100_000, &annals_store::LogFilter::all())
        .await
        .unwrap();
    for kind in [
        "LeadCaptured",
        "SignalRecorded",
        "LeadQualified",
        "LeadAssigned",
        "LeadConverted",
        "AccountOpened",
        "DealOpened",
        "DealStageChanged",
        "DealWon",
        "DealLost",
        // Orders on won deals: paid and fulfilled with a subscription, or cancelled by
        // their customer; their payment deadlines set (on the real clock, 7 days on).
        "OrderPlaced",
        "OrderInvoiced",
        "TimerScheduled",
        "PaymentReceived",
        "SubscriptionStarted",
        "OrderFulfilled",
        "OrderCancelled",
    ] {
        assert!(
            page.events.iter().any(|e| e.event_type == kind),
            "the demo has no {kind}"
        );
    }
    // No timer fired: the demo takes time from the real clock only, and none is due.
    assert!(
        !page.events.iter().any(|e| e.event_type == "TimerFired"),
        "the demo fired a timer before its time"
    );
    // The same seed again appends nothing: every command was idempotent.
    let (ok, _, err) = run(&demo);
    assert!(ok, "{err}");
    assert_eq!(db.store().head().await.unwrap(), head);

    let (ok, out, err) = run(&["verify", "--database-url", url]);
    assert!(ok, "{out}{err}");
    for projection in [
        "lead_board",
        "deal_board",
        "account_360",
        "order_board",
        "subscription_board",
        "revenue",
    ] {
        assert!(
            out.contains(&format!(
                "{projection}: equal to a rebuild at position {head}"
            )),
            "{out}"
        );
    }
    // The live deal board, edited behind its back: a deal's row gone, another's amount
    // changed. Verify shows it; replay rebuilds the board from the log into a new
    // generation, swaps it in, and says so; the rows are then what they were.
    let live = "(SELECT live_generation FROM projections WHERE name = 'deal_board')";
    let board = format!(
        "SELECT deal_id, account_id, name, stage, status, currency, \
                CAST(amount_minor AS TEXT), owner, CAST(expected_close AS TEXT), \
                CAST(opened_at AS TEXT), CAST(opened_micros AS TEXT), \
                CAST(closed_at AS TEXT), CAST(closed_micros AS TEXT), lost_reason, \
                CAST(updated_position AS TEXT) \
           FROM deal_board WHERE generation = {live} ORDER BY deal_id"
    );
    let generation = format!("SELECT CAST({live} AS TEXT)");
    let rows = db.text_rows(&board).await;
    assert!(rows.len() > 2, "{rows:?}");
    let generation_before = db.text_rows(&generation).await;
    let (first, last) = (
        rows[0][0].clone().unwrap(),
        rows[rows.len() - 1][0].clone().unwrap(),
    );
    db.execute(&format!(
        "DELETE FROM deal_board WHERE generation = {live} AND deal_id = '{first}'"
    ))
    .await;
    db.execute(&format!(
        "UPDATE deal_board SET amount_minor = amount_minor + 1 \
          WHERE generation = {live} AND deal_id = '{last}'"
    ))
    .await;
    let (ok, out, _) = run(&[
        "verify",
        "--projection",
        "deal_board",
        "--database-url",
        url,
    ]);
    assert!(!ok, "{out}");
    assert!(out.contains("deal_board: DIFFERS"), "{out}");
    let (ok, out, err) = run(&[
        "replay",
        "--projection",
        "deal_board",
        "--database-url",
        url,
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        out.trim_end(),
        format!("deal_board: rebuilt from position 0 to {head}, now live")
    );
    assert!(
        db.text_rows(&board).await == rows,
        "the replayed board is not the board as the log makes it"
    );
    let generation_after = db.text_rows(&generation).await;
    assert_ne!(
        generation_after, generation_before,
        "no new generation is live"
    );
    let (ok, out, err) = run(&[
        "verify",
        "--projection",
        "deal_board",
        "--database-url",
        url,
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!(
            "deal_board: equal to a rebuild at position {head}"
        )),
        "{out}"
    );
    let (ok, out, _) = run(&["audit", "verify", "--database-url", url]);
    assert!(ok);
    assert!(out.starts_with("ok: "), "{out}");

    let (ok, out, _) = run(&["events", "--from", "3", "--database-url", url]);
    assert!(ok);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len() as u64, head - 2);
    assert!(lines[0].trim_start().starts_with("3  "), "{}", lines[0]);
    let first_stream = page.events[0].stream.clone();
    let (ok, out, _) = run(&[
        "events",
        "--stream",
        &first_stream,
        "--json",
        "--database-url",
        url,
    ]);
    assert!(ok);
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(first["stream"], first_stream.as_str());
    assert_eq!(first["version"], 1);

    // An edited row fails the audit, and the command says so with a failing exit.
    db.execute("UPDATE events SET event_type = 'Forged' WHERE position = 1")
        .await;
    let (ok, out, _) = run(&["audit", "verify", "--database-url", url]);
    assert!(!ok);
    assert!(out.starts_with("BROKEN: stream "), "{out}");
}

async fn an_audit_anchor_shows_a_log_rewritten_with_every_hash_recomputed(db: Arc<Fixture>) {
    let url = db.url();
    let store = db.store();
    for n in 1..=4 {
        store
            .append(append("lead-x", ExpectedVersion::Any, vec![event("E", n)]))
            .await
            .unwrap();
    }
    let (ok, out, err) = run(&["audit", "anchor", "--database-url", url]);
    assert!(ok, "{err}");
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(words.len(), 2, "{out}");
    let (hash, position) = (words[0].to_owned(), words[1]);
    assert_eq!((hash.len(), position), (64, "4"), "{out}");
    let (ok, out, _) = run(&["audit", "verify", "--anchor", &hash, "--database-url", url]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("anchor {hash} found at position 4")),
        "{out}"
    );

    // Cut at position 2, the head row moved back to match: every hash is right again,
    // and only the anchor shows it.
    db.execute("DELETE FROM events WHERE position > 2").await;
    db.execute(
        "UPDATE log_head SET position = 2, hash = (SELECT log_hash FROM events WHERE position = 2)",
    )
    .await;
    let (ok, out, _) = run(&["audit", "verify", "--database-url", url]);
    assert!(ok, "{out}");
    let (ok, out, _) = run(&["audit", "verify", "--anchor", &hash, "--database-url", url]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("ANCHOR MISSING: the log no longer holds {hash}")),
        "{out}"
    );

    let (ok, _, err) = run(&[
        "audit",
        "verify",
        "--anchor",
        "not-a-hash",
        "--database-url",
        url,
    ]);
    assert!(!ok);
    assert!(
        err.starts_with("annals: ") && err.contains("--anchor"),
        "{err}"
    );
}

#[test]
fn bad_operator_arguments_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("cli.db").display());
    for args in [
        vec!["replay", "--projection", "nothing", "--database-url", &url],
        vec!["verify", "--projection", "nothing", "--database-url", &url],
        vec![
            "events",
            "--stream",
            "no spaces allowed",
            "--database-url",
            &url,
        ],
        vec!["events", "--database-url", "mysql://x"],
        vec![
            "serve",
            "--listen",
            "not-an-address",
            "--database-url",
            &url,
        ],
    ] {
        let (ok, _, err) = run(&args);
        assert!(!ok, "{args:?}");
        assert!(err.starts_with("annals: "), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let (ok, _, err) = run(&["demo", "--leads", "many"]);
    assert!(!ok);
    assert!(err.contains("invalid value"), "{err}");
}

async fn parked_events_are_listed_retried_and_skipped_from_the_command_line(db: Arc<Fixture>) {
    let url = db.url();
    // An event no projector can read, parked by the lead board (as its runner parks).
    let appended = db
        .store()
        .append(annals_store::AppendRequest::new(
            annals_store::StreamName::parse("lead-poison").unwrap(),
            annals_store::ExpectedVersion::Any,
            vec![
                annals_store::NewEvent::new("LeadCaptured", serde_json::json!({"not": "a lead"}))
                    .with_schema_version(2),
            ],
        ))
        .await
        .unwrap();
    let position = appended.last_position();
    db.execute(&format!(
        "INSERT INTO projection_dead_letters \
                (name, position, event_type, error, attempts, parked_at) \
         VALUES ('lead_board', {position}, 'LeadCaptured', 'cannot be projected', 3, \
                 '2026-11-27T10:00:00.000000Z')"
    ))
    .await;
    let position = position.to_string();

    let (ok, out, err) = run(&[
        "parked",
        "list",
        "--consumer",
        "lead_board",
        "--database-url",
        url,
    ]);
    assert!(ok, "{err}");
    let line = out.lines().next().unwrap();
    assert!(
        line.trim_start().starts_with(&format!("{position}  ")),
        "{out}"
    );
    assert!(
        line.contains("LeadCaptured") && line.contains("cannot be projected"),
        "{out}"
    );

    // Still poisoned: the retry fails with the new error, in one line, exit non-zero.
    let retry = [
        "parked",
        "retry",
        "--consumer",
        "lead_board",
        "--position",
        &position,
        "--database-url",
        url,
    ];
    let (ok, _, err) = run(&retry);
    assert!(!ok);
    assert!(err.starts_with("annals: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("still fails"), "{err}");

    let (ok, out, err) = run(&[
        "parked",
        "skip",
        "--consumer",
        "lead_board",
        "--position",
        &position,
        "--actor",
        "ops-oncall",
        "--database-url",
        url,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("skipped by ops-oncall"), "{out}");
    let recorded = db
        .text_rows("SELECT skipped_by FROM projection_dead_letters WHERE name = 'lead_board'")
        .await;
    assert_eq!(recorded, vec![vec![Some("ops-oncall".to_owned())]]);
    let (ok, out, _) = run(&[
        "parked",
        "list",
        "--consumer",
        "lead_board",
        "--database-url",
        url,
    ]);
    assert!(ok);
    assert!(out.contains("lead_board: no parked events"), "{out}");

    // Nothing parked there any more, and no such consumer: one clear line, a failure.
    for args in [
        retry.to_vec(),
        vec![
            "parked",
            "list",
            "--consumer",
            "nothing",
            "--database-url",
            url,
        ],
        vec![
            "parked",
            "skip",
            "--consumer",
            "lead_board",
            "--position",
            "999",
            "--database-url",
            url,
        ],
    ] {
        let (ok, _, err) = run(&args);
        assert!(!ok, "{args:?}");
        assert!(err.starts_with("annals: "), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
}

/// The first lead of the log, and its email as the demo wrote it (opened).
fn first_lead(url: &str) -> (String, String) {
    let (ok, out, err) = run(&["events", "--json", "--database-url", url]);
    assert!(ok, "{err}");
    let captured = out
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .find(|event| event["event_type"] == "LeadCaptured")
        .expect("a captured lead");
    let id = captured["stream"]
        .as_str()
        .unwrap()
        .trim_start_matches("lead-")
        .to_owned();
    (id, captured["data"]["email"].as_str().unwrap().to_owned())
}

/// What is held about a lead, printed as JSON; erased from the command line; then the
/// printout is refused (exit 1) and every read shows the lead erased. The log of the
/// whole run (a demo history, the printout, the erasure) names no email of the demo.
async fn a_lead_is_erased_and_its_personal_data_printed_from_the_command_line(db: Arc<Fixture>) {
    let url = db.url();
    let (ok, _, demo_log) = {
        let output = annals()
            .env("RUST_LOG", "debug,sqlx=warn")
            .args(["demo", "--leads", "20", "--database-url", url])
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    assert!(ok, "{demo_log}");
    let (id, email) = first_lead(url);
    assert!(email.contains('@'), "{email}");
    let (ok, out, err) = run(&["lead", "personal-data", "--id", &id, "--database-url", url]);
    assert!(ok, "{err}");
    let document: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(document["email"], email.as_str());
    assert_eq!(document["events"][0]["type"], "LeadCaptured");

    let (ok, out, erase_log) = run(&["lead", "erase", "--id", &id, "--database-url", url]);
    assert!(ok, "{erase_log}");
    assert!(
        out.contains(&format!("lead {id}: erased at position")),
        "{out}"
    );
    assert!(!out.contains("in clear"), "{out}");
    let (ok, _, err) = run(&["lead", "personal-data", "--id", &id, "--database-url", url]);
    assert!(!ok);
    assert!(err.contains("erased"), "{err}");
    let (again, _, err) = run(&["lead", "erase", "--id", &id, "--database-url", url]);
    assert!(!again, "a second erasure is refused");
    assert!(!err.contains("panicked"), "{err}");
    let (ok, out, _) = run(&[
        "events",
        "--json",
        "--stream",
        &format!("lead-{id}"),
        "--database-url",
        url,
    ]);
    assert!(ok);
    assert!(!out.contains(&email), "{out}");
    assert!(out.contains("\"erased\":true"), "{out}");
    let (ok, out, _) = run(&["audit", "verify", "--database-url", url]);
    assert!(ok, "{out}");
    let (ok, out, _) = run(&["verify", "--database-url", url]);
    assert!(ok, "{out}");
    for log in [demo_log, erase_log] {
        assert!(!log.contains(&email), "{log}");
        assert!(!log.contains(".example"), "a demo email in the log: {log}");
    }
}

/// An older build's events (email and name in clear) and its email claim (the domain's
/// key, not a keyed hash): `keys migrate` counts the one, the store turned the other
/// into a keyed hash on opening, so the email stays taken; the erasure of that lead
/// says its events keep it in clear, gives the email back, and every read shows it
/// erased.
async fn keys_migrate_reports_what_an_older_build_stored_in_clear_and_rekeys_its_claims(
    db: Arc<Fixture>,
) {
    use annals_domain::values::Email;
    let url = db.url();
    let claim = Email::parse("old@example.com").unwrap().claim_key();
    let lead = uuid::Uuid::now_v7();
    db.store()
        .append(
            append(
                &format!("lead-{lead}"),
                ExpectedVersion::NoStream,
                vec![
                    annals_store::NewEvent::new(
                        "LeadCaptured",
                        serde_json::json!({"lead_id": lead, "email": "old@example.com",
                        "name": "Old Timer", "company": null, "source": "web"}),
                    )
                    .with_schema_version(2),
                ],
            )
            .with_claims(vec![annals_store::Claim::Take(claim.clone())]),
        )
        .await
        .unwrap();
    let (ok, out, err) = run(&["keys", "migrate", "--database-url", url]);
    assert!(ok, "{err}");
    assert!(
        out.contains("1 events of 1 leads hold an email and a name in clear"),
        "{out}"
    );
    // The older build's claim became a keyed hash when the store opened: the email
    // stays taken, and the erasure below gives it back.
    let claims = db.text_rows("SELECT key FROM claims").await;
    let stored = claims[0][0].clone().unwrap();
    assert!(stored.starts_with("lead-email:k1:"), "{stored}");
    assert!(!stored.contains(&claim["lead-email:".len()..]), "{stored}");

    let (ok, out, err) = run(&[
        "lead",
        "erase",
        "--id",
        &lead.to_string(),
        "--database-url",
        url,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("1 of its events were written before"), "{out}");
    let (ok, out, _) = run(&[
        "events",
        "--json",
        "--stream",
        &format!("lead-{lead}"),
        "--database-url",
        url,
    ]);
    assert!(ok);
    assert!(
        !out.contains("old@example.com") && out.contains("\"erased\":true"),
        "{out}"
    );
    assert!(
        db.text_rows("SELECT key FROM claims").await.is_empty(),
        "given back"
    );
}

/// `keys rotate` on a SQLite database keyed by the file beside it: every data key is
/// wrapped anew and the file holds the new key; the log is untouched (its anchor is the
/// same) and reads as before with the new key, while the old key is refused.
#[test]
fn keys_rotate_rewraps_every_data_key_and_leaves_the_log_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rotated.db");
    let url = format!("sqlite://{}", db.display());
    let keyed = |args: &[&str]| {
        let output = annals()
            .env_remove("ANNALS_MASTER_KEY")
            .args(args)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, _, err) = keyed(&["demo", "--leads", "10", "--database-url", &url]);
    assert!(ok, "{err}");
    let key_file = dir.path().join("rotated.db.key");
    let old = std::fs::read_to_string(&key_file).unwrap();
    let (ok, anchor, _) = keyed(&["audit", "anchor", "--database-url", &url]);
    assert!(ok);
    let lead_before = {
        let (ok, out, err) = keyed(&["events", "--json", "--database-url", &url]);
        assert!(ok, "{err}");
        out
    };

    let new_file = dir.path().join("new.key");
    let (ok, _, err) = keyed(&["keys", "generate", "--out", new_file.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (ok, out, err) = keyed(&[
        "keys",
        "rotate",
        "--new-key-file",
        new_file.to_str().unwrap(),
        "--database-url",
        &url,
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("data keys wrapped with the new master key"),
        "{out}"
    );
    let new = std::fs::read_to_string(&key_file).unwrap();
    assert_eq!(new, std::fs::read_to_string(&new_file).unwrap());
    assert_ne!(new, old);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    let (ok, after, _) = keyed(&["audit", "anchor", "--database-url", &url]);
    assert!(ok);
    assert_eq!(after, anchor, "no event was touched");
    let (ok, out, err) = keyed(&["events", "--json", "--database-url", &url]);
    assert!(ok, "{err}");
    assert_eq!(out, lead_before, "every event reads as before");
    let (ok, _, err) = annals()
        .env("ANNALS_MASTER_KEY", old.trim())
        .args(["audit", "anchor", "--database-url", &url])
        .output()
        .map(|o| {
            (
                o.status.success(),
                String::new(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .unwrap();
    assert!(!ok);
    assert!(err.contains("not the master key"), "{err}");
}
