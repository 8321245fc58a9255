//! Black-box tests: the real `annals` binary, run as a user would run it, against a
//! temporary SQLite file or a PostgreSQL server.

// A test that cannot go on should stop loudly; `unwrap` says so shortest.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn annals() -> Command {
    Command::new(env!("CARGO_BIN_EXE_annals"))
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
