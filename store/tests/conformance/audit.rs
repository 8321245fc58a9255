//! The audit covers the whole log, not only each stream: deleted tails and streams,
//! reordered positions and edited categories are caught, a deleted position is never
//! handed out again, an anchor kept elsewhere shows a rewrite that recomputed every hash,
//! and numbers are hashed and compared as stored, whatever a database makes of them.

use std::sync::Arc;

use std::str::FromStr;

use annals_store::{
    AppendRequest, BrokenLink, Direction, EventStore, ExpectedVersion, NewEvent, PostgresStore,
    SqliteStore,
};
use serde_json::{Value, json};
use sqlx::Connection;
use sqlx::sqlite::SqliteConnectOptions;

use crate::database::{Backend, Fixture, append, event, stream};

on_both_backends!(
    verify_catches_a_deleted_tail,
    verify_catches_a_deleted_stream,
    verify_catches_swapped_positions,
    verify_catches_an_edited_category,
    a_deleted_tail_position_is_never_reused,
    an_anchor_shows_a_rewrite_that_recomputed_every_hash,
    floats_verify_and_retry_as_stored,
    a_log_written_before_the_log_chain_opens_and_verifies,
    verify_says_a_deleted_event_left_its_stream_a_version_short,
    verify_says_an_edited_event_no_longer_hashes_to_its_stored_hash,
    verify_says_which_positions_a_deleted_stream_left_missing,
    verify_says_an_edited_category_breaks_the_log_hash,
    verify_says_a_deleted_tail_leaves_the_head_row_ahead,
    verify_catches_a_head_row_with_only_its_hash_changed,
    verify_catches_a_head_row_with_only_its_position_moved_back,
);

/// Three streams of two events each: positions 1–2, 3–4 and 5–6.
async fn three_streams(db: &Fixture) {
    three_streams_anchored(db).await;
    let report = db.store().verify().await.unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!((report.streams, report.events), (3, 6));
}

async fn verify_catches_a_deleted_tail(db: Arc<Fixture>) {
    three_streams(&db).await;
    let store = db.store();
    assert_eq!(db.execute("DELETE FROM events WHERE position = 6").await, 1);
    let report = store.verify().await.unwrap();
    assert!(!report.ok(), "a deleted last event goes unnoticed");
    // The whole last stream gone: nothing of it is left to walk.
    db.execute("DELETE FROM events WHERE stream = 'lead-c'")
        .await;
    let report = store.verify().await.unwrap();
    assert!(!report.ok(), "a deleted last stream goes unnoticed");
    assert_eq!((report.streams, report.events), (2, 4));
}

async fn verify_catches_a_deleted_stream(db: Arc<Fixture>) {
    three_streams(&db).await;
    assert_eq!(
        db.execute("DELETE FROM events WHERE stream = 'deal-b'")
            .await,
        2
    );
    let report = db.store().verify().await.unwrap();
    let broken = report
        .first_broken_link
        .expect("a deleted stream is caught");
    assert_eq!(broken.position, 5, "{broken:?}");
}

async fn verify_catches_swapped_positions(db: Arc<Fixture>) {
    three_streams(&db).await;
    // Events 2 (lead-a) and 3 (deal-b) trade places; each stream keeps its order.
    db.execute("UPDATE events SET position = 100 WHERE position = 2")
        .await;
    db.execute("UPDATE events SET position = 2 WHERE position = 3")
        .await;
    db.execute("UPDATE events SET position = 3 WHERE position = 100")
        .await;
    let report = db.store().verify().await.unwrap();
    let broken = report.first_broken_link.expect("a swap is caught");
    assert_eq!(broken.position, 2, "{broken:?}");
}

async fn verify_catches_an_edited_category(db: Arc<Fixture>) {
    three_streams(&db).await;
    db.execute("UPDATE events SET category = 'deal' WHERE position = 2")
        .await;
    let report = db.store().verify().await.unwrap();
    let broken = report
        .first_broken_link
        .expect("an edited category is caught");
    assert_eq!(
        (broken.stream.as_str(), broken.version, broken.position),
        ("lead-a", 2, 2)
    );
}

async fn a_deleted_tail_position_is_never_reused(db: Arc<Fixture>) {
    three_streams(&db).await;
    db.execute("DELETE FROM events WHERE position = 6").await;
    // Another process, which remembers nothing of the log, appends next.
    let other = db.open_again().await;
    let outcome = other
        .append(append(
            "lead-new",
            ExpectedVersion::NoStream,
            vec![event("E", 1)],
        ))
        .await
        .unwrap();
    assert_eq!(
        outcome.positions,
        vec![7],
        "position 6 was handed out again"
    );
    // And so does this one, whose writer remembers the log as it left it.
    let outcome = db
        .store()
        .append(append(
            "lead-newer",
            ExpectedVersion::NoStream,
            vec![event("E", 1)],
        ))
        .await
        .unwrap();
    assert_eq!(outcome.positions, vec![8]);
}

async fn an_anchor_shows_a_rewrite_that_recomputed_every_hash(db: Arc<Fixture>) {
    three_streams(&db).await;
    let store = db.store();
    let anchor = store.anchor().await.unwrap();
    assert_eq!(anchor.position, 6);
    assert_eq!(anchor.hash.len(), 64);
    assert_eq!(store.find_anchor(&anchor.hash).await.unwrap(), Some(6));
    // An older anchor stays in the log as it grows.
    store
        .append(append("lead-d", ExpectedVersion::Any, vec![event("E", 1)]))
        .await
        .unwrap();
    assert_eq!(store.find_anchor(&anchor.hash).await.unwrap(), Some(6));
    assert_ne!(store.anchor().await.unwrap(), anchor);
    assert_eq!(store.find_anchor(&"1".repeat(64)).await.unwrap(), None);
    // The empty log's anchor is in every log.
    assert_eq!(store.find_anchor(&"0".repeat(64)).await.unwrap(), Some(0));

    // Someone with write access cuts the log at position 4, moves the head row back to
    // match, and lets the store write a new tail: every hash is right again.
    db.execute("DELETE FROM events WHERE position > 4").await;
    db.execute(
        "UPDATE log_head SET position = 4, hash = (SELECT log_hash FROM events WHERE position = 4)",
    )
    .await;
    let reopened = db.open_again().await;
    reopened
        .append(append(
            "lead-c",
            ExpectedVersion::Any,
            vec![event("Forged", 1), event("Forged", 2)],
        ))
        .await
        .unwrap();
    let report = reopened.verify().await.unwrap();
    assert!(
        report.ok(),
        "a recomputed rewrite is beyond the chain: {report:?}"
    );
    // Only the anchor kept elsewhere shows it.
    assert_eq!(reopened.find_anchor(&anchor.hash).await.unwrap(), None);
}

/// Numbers that no database or JSON library agrees on by default.
fn awkward_numbers() -> Vec<f64> {
    vec![
        -0.0,
        1e16,
        0.1 + 0.2,
        1e-7,
        123_456_789.123_456_79,
        f64::MAX,
        f64::MIN_POSITIVE,
        5e-324,
        9_007_199_254_740_993.0,
        2.0_f64.powi(70),
        -1.5e300,
        0.000_1,
    ]
}

fn float_append(name: &str, numbers: &[f64]) -> AppendRequest {
    let data: Value = json!({
        "numbers": numbers,
        "nested": {"x": numbers.first().copied().unwrap_or(-0.0), "n": 1e16},
    });
    let mut with_metadata = NewEvent::new("Measured", data.clone());
    with_metadata
        .metadata
        .extra
        .insert("ratio".into(), json!(0.1 + 0.2));
    append(
        name,
        ExpectedVersion::NoStream,
        vec![NewEvent::new("Measured", data), with_metadata],
    )
}

/// Appends the numbers, then: the audit finds nothing, and a retry of the same append is
/// recognised as the same (its first answer), from this store and from a fresh one.
pub(super) async fn numbers_survive_the_database(db: Arc<Fixture>, numbers: Vec<f64>) {
    let store = db.store();
    let request = float_append("lead-floats", &numbers);
    let first = store.append(request.clone()).await.unwrap();
    // They read back (PostgreSQL's `jsonb` writes 1e308 with 309 digits, which serde_json
    // cannot read), as numbers, not rendered away: 1e16 stays a float.
    let stored = store
        .read_stream(&stream("lead-floats"), 1, Direction::Forwards, 10)
        .await
        .unwrap();
    assert_eq!(stored.len(), 2);
    for (event, appended) in stored.iter().zip(&request.events) {
        assert_eq!(event.data["nested"]["n"], json!(1e16));
        // Exactly the floats written (serde_json's `float_roundtrip`).
        assert_eq!(event.data, appended.data);
        assert_eq!(event.metadata, appended.metadata);
    }
    let report = store.verify().await.unwrap();
    assert!(report.ok(), "untouched rows reported: {report:?}");
    assert_eq!(store.append(request.clone()).await.unwrap(), first);
    let other = db.open_again().await;
    assert_eq!(other.append(request).await.unwrap(), first);
    assert!(other.verify().await.unwrap().ok());
}

async fn floats_verify_and_retry_as_stored(db: Arc<Fixture>) {
    numbers_survive_the_database(db, awkward_numbers()).await;
}

/// A log as the store wrote it before the log chain (per-stream hashes only), taken from
/// the SQLite file of that version: the rows of `v1_log.json`, inserted with the first
/// five migrations applied, must open, be upgraded and verify.
async fn a_log_written_before_the_log_chain_opens_and_verifies(db: Arc<Fixture>) {
    let old = OldDatabase::new(db.backend()).await;
    let rows: Vec<Value> = serde_json::from_str(include_str!("v1_log.json")).unwrap();
    assert!(rows.len() >= 5);
    for row in &rows {
        old.insert_event(row).await;
    }
    let store = old.open().await;
    let report = store.verify().await.unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.events, rows.len() as u64);
    let anchor = store.anchor().await.unwrap();
    assert_eq!(anchor.position, rows.len() as u64);
    // It goes on from there.
    let next = store
        .append(append(
            "lead-after",
            ExpectedVersion::NoStream,
            vec![event("E", 1)],
        ))
        .await
        .unwrap();
    assert_eq!(next.positions, vec![rows.len() as u64 + 1]);
    assert!(store.verify().await.unwrap().ok());
    // Opening it again does not redo the upgrade.
    let again = old.open().await;
    assert_eq!(
        again.anchor().await.unwrap().position,
        rows.len() as u64 + 1
    );
    assert!(again.verify().await.unwrap().ok());
    // The old per-stream chains are still checked: an edited old row is caught.
    old.execute("UPDATE events SET event_type = 'Edited' WHERE position = 2")
        .await;
    let broken = again.verify().await.unwrap().first_broken_link.unwrap();
    assert_eq!(broken.position, 2);
    old.drop().await;
}

pub(super) mod properties {
    use proptest::prelude::*;

    use crate::database::{Backend, run};

    fn check(backend: Backend, numbers: Vec<f64>) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run(backend, move |db| {
            super::numbers_survive_the_database(db, numbers)
        }));
    }

    fn finite() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<f64>().prop_filter("JSON has no NaN or infinity", |f| f.is_finite()),
            (-1_000_000i64..1_000_000, 0u32..12)
                .prop_map(|(n, digits)| n as f64 / 10f64.powi(digits as i32)),
        ]
    }

    proptest! {
        // Each case makes a database of its own.
        #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

        #[test]
        fn sqlite_random_floats_verify_and_retry(numbers in proptest::collection::vec(finite(), 1..40)) {
            check(Backend::Sqlite, numbers);
        }

        #[test]
        fn postgres_random_floats_verify_and_retry(numbers in proptest::collection::vec(finite(), 1..40)) {
            check(Backend::Postgres, numbers);
        }
    }
}

/// A database with only the migrations of the version before the log chain applied.
struct OldDatabase {
    backend: Backend,
    url: String,
    pool: OldPool,
    _dir: tempfile::TempDir,
}

enum OldPool {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool, String),
}

/// The migrations that version had.
const OLD_MIGRATIONS: usize = 5;

impl OldDatabase {
    async fn new(backend: Backend) -> OldDatabase {
        let dir = tempfile::tempdir().unwrap();
        let (source, url) = match backend {
            Backend::Sqlite => (
                "sqlite",
                format!("sqlite://{}", dir.path().join("old.db").display()),
            ),
            Backend::Postgres => {
                let name = format!("annals_test_{}", uuid::Uuid::new_v4().simple());
                let mut admin = sqlx::PgConnection::connect(&crate::database::admin_url())
                    .await
                    .unwrap();
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut admin)
                    .await
                    .unwrap();
                let admin = crate::database::admin_url();
                let (server, _) = admin.rsplit_once('/').unwrap();
                ("postgres", format!("{server}/{name}"))
            }
        };
        let migrations = dir.path().join("migrations");
        std::fs::create_dir(&migrations).unwrap();
        let all = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../migrations")
            .join(source);
        let mut files: Vec<_> = std::fs::read_dir(&all)
            .unwrap()
            .map(|f| f.unwrap().path())
            .collect();
        files.sort();
        for file in &files[..OLD_MIGRATIONS] {
            std::fs::copy(file, migrations.join(file.file_name().unwrap())).unwrap();
        }
        let migrator = sqlx::migrate::Migrator::new(migrations.as_path())
            .await
            .unwrap();
        let pool = match backend {
            Backend::Sqlite => {
                let options = SqliteConnectOptions::from_str(&url)
                    .unwrap()
                    .create_if_missing(true);
                let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
                migrator.run(&pool).await.unwrap();
                OldPool::Sqlite(pool)
            }
            Backend::Postgres => {
                let pool = sqlx::PgPool::connect(&url).await.unwrap();
                migrator.run(&pool).await.unwrap();
                let name = url.rsplit_once('/').unwrap().1.to_owned();
                OldPool::Postgres(pool, name)
            }
        };
        OldDatabase {
            backend,
            url,
            pool,
            _dir: dir,
        }
    }

    /// Inserts one row of `v1_log.json` as that version stored it.
    async fn insert_event(&self, row: &Value) {
        let text = |k: &str| row[k].as_str().unwrap().to_owned();
        let int = |k: &str| row[k].as_i64().unwrap();
        let hash = hex::decode(text("hash")).unwrap();
        match &self.pool {
            OldPool::Sqlite(pool) => {
                sqlx::query(
                    "INSERT INTO events (position, stream, category, version, event_id, \
                     event_type, schema_version, data, metadata, recorded_at, hash) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )
                .bind(int("position"))
                .bind(text("stream"))
                .bind(text("category"))
                .bind(int("version"))
                .bind(text("event_id"))
                .bind(text("event_type"))
                .bind(int("schema_version"))
                .bind(text("data"))
                .bind(text("metadata"))
                .bind(int("recorded_at"))
                .bind(hash)
                .execute(pool)
                .await
                .unwrap();
            }
            OldPool::Postgres(pool, _) => {
                sqlx::query(
                    "INSERT INTO events (position, stream, category, version, event_id, \
                     event_type, schema_version, data, metadata, recorded_at, hash) \
                     VALUES ($1, $2, $3, $4, $5::uuid, $6, $7, $8::jsonb, $9::jsonb, \
                             'epoch'::timestamptz + ($10 / 1000000) * interval '1 second' \
                             + ($10 % 1000000) * interval '1 microsecond', $11)",
                )
                .bind(int("position"))
                .bind(text("stream"))
                .bind(text("category"))
                .bind(int("version"))
                .bind(text("event_id"))
                .bind(text("event_type"))
                .bind(int("schema_version"))
                .bind(text("data"))
                .bind(text("metadata"))
                .bind(int("recorded_at"))
                .bind(hash)
                .execute(pool)
                .await
                .unwrap();
            }
        }
    }

    async fn execute(&self, sql: &str) -> u64 {
        match &self.pool {
            OldPool::Sqlite(pool) => sqlx::query(sql)
                .execute(pool)
                .await
                .unwrap()
                .rows_affected(),
            OldPool::Postgres(pool, _) => sqlx::query(sql)
                .execute(pool)
                .await
                .unwrap()
                .rows_affected(),
        }
    }

    async fn open(&self) -> Arc<dyn EventStore> {
        let config = crate::database::config();
        match self.backend {
            Backend::Sqlite => Arc::new(SqliteStore::open(&self.url, config).await.unwrap()),
            Backend::Postgres => Arc::new(PostgresStore::open(&self.url, config).await.unwrap()),
        }
    }

    async fn drop(self) {
        match self.pool {
            OldPool::Sqlite(pool) => pool.close().await,
            OldPool::Postgres(pool, name) => {
                pool.close().await;
                let mut admin = sqlx::PgConnection::connect(&crate::database::admin_url())
                    .await
                    .unwrap();
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await;
            }
        }
    }
}

/// `three_streams`, and the anchor after each stream's append: the log hashes at
/// positions 2, 4 and 6, as the head row recorded them.
async fn three_streams_anchored(db: &Fixture) -> Vec<String> {
    let store = db.store();
    let mut anchors = Vec::new();
    for name in ["lead-a", "deal-b", "lead-c"] {
        store
            .append(append(
                name,
                ExpectedVersion::NoStream,
                vec![event("E", 1), event("E", 2)],
            ))
            .await
            .unwrap();
        let anchor = store.anchor().await.unwrap();
        assert_eq!(anchor.position, 2 * (anchors.len() as u64 + 1));
        anchors.push(anchor.hash);
    }
    assert!(store.verify().await.unwrap().ok());
    anchors
}

/// The stored hash of one event, as hex.
async fn stored_hash(store: &dyn EventStore, name: &str, version: u64) -> String {
    let events = store
        .read_stream(&stream(name), version, Direction::Forwards, 1)
        .await
        .unwrap();
    assert_eq!(events[0].version, version);
    hex::encode(events[0].hash)
}

/// The audit's first broken link, required at `(stream, version, position)` for `reason`.
async fn first_break(
    store: &dyn EventStore,
    (stream, version, position): (&str, u64, u64),
    reason: &str,
) -> BrokenLink {
    let broken = store.verify().await.unwrap().first_broken_link.unwrap();
    assert_eq!(
        (broken.stream.as_str(), broken.version, broken.position),
        (stream, version, position)
    );
    assert_eq!(broken.reason, reason);
    broken
}

/// A store holding one stream, `deal-d`, of three events (positions 1 to 3).
async fn deal_of_three_events(db: &Fixture) -> Arc<dyn EventStore> {
    let store = db.store();
    store
        .append(append(
            "deal-d",
            ExpectedVersion::NoStream,
            vec![event("E", 1), event("E", 2), event("E", 3)],
        ))
        .await
        .unwrap();
    store
}

async fn verify_says_a_deleted_event_left_its_stream_a_version_short(db: Arc<Fixture>) {
    let store = deal_of_three_events(&db).await;
    let third = stored_hash(&*store, "deal-d", 3).await;
    assert_eq!(
        db.execute("DELETE FROM events WHERE stream = 'deal-d' AND version = 2")
            .await,
        1
    );
    let broken = first_break(
        &*store,
        ("deal-d", 3, 3),
        "the stream's version 2 is missing: the next event stored is version 3",
    )
    .await;
    assert_eq!(broken.found, third);
    assert_ne!(broken.expected, broken.found);
}

async fn verify_says_an_edited_event_no_longer_hashes_to_its_stored_hash(db: Arc<Fixture>) {
    let store = deal_of_three_events(&db).await;
    let second = stored_hash(&*store, "deal-d", 2).await;
    assert_eq!(
        db.execute(
            "UPDATE events SET event_type = 'Edited' WHERE stream = 'deal-d' AND version = 2"
        )
        .await,
        1
    );
    let broken = first_break(
        &*store,
        ("deal-d", 2, 2),
        "the stored hash is not the one recomputed from the event and its predecessor in the \
         stream",
    )
    .await;
    assert_eq!(broken.found, second);
    assert_ne!(broken.expected, broken.found);
}

async fn verify_says_which_positions_a_deleted_stream_left_missing(db: Arc<Fixture>) {
    three_streams_anchored(&db).await;
    // Every stream left is whole: only the log's chain can show the hole.
    assert_eq!(
        db.execute("DELETE FROM events WHERE stream = 'deal-b'")
            .await,
        2
    );
    let broken = db
        .store()
        .verify()
        .await
        .unwrap()
        .first_broken_link
        .unwrap();
    assert_eq!(
        (broken.stream.as_str(), broken.version, broken.position),
        ("lead-c", 1, 5)
    );
    assert_eq!(broken.reason, "positions 3 to 4 are missing from the log");
    assert_ne!(broken.expected, broken.found);
}

async fn verify_says_an_edited_category_breaks_the_log_hash(db: Arc<Fixture>) {
    let anchors = three_streams_anchored(&db).await;
    db.execute("UPDATE events SET category = 'deal' WHERE position = 2")
        .await;
    let broken = db
        .store()
        .verify()
        .await
        .unwrap()
        .first_broken_link
        .unwrap();
    assert_eq!(
        (broken.stream.as_str(), broken.version, broken.position),
        ("lead-a", 2, 2)
    );
    assert_eq!(
        broken.reason,
        "the stored log hash is not the one recomputed from the event's position, category \
         and hash and its predecessor in the log"
    );
    assert_eq!(
        broken.found, anchors[0],
        "the log hash stored at position 2"
    );
    assert_ne!(broken.expected, broken.found);
}

async fn verify_says_a_deleted_tail_leaves_the_head_row_ahead(db: Arc<Fixture>) {
    let anchors = three_streams_anchored(&db).await;
    assert_eq!(db.execute("DELETE FROM events WHERE position = 6").await, 1);
    let report = db.store().verify().await.unwrap();
    // The chains are whole up to position 5; the head row still records position 6.
    assert_eq!(report.head.position, 5);
    let broken = report.first_broken_link.unwrap();
    assert_eq!(
        (broken.stream.as_str(), broken.version, broken.position),
        ("lead-c", 1, 6),
        "the last event left, at the position the head row records"
    );
    assert_eq!(
        broken.reason,
        "the log ends at position 5, but its head row records position 6: events at the end \
         of the log were deleted"
    );
    assert_eq!(broken.expected, anchors[2], "the head row's hash");
    assert_eq!(broken.found, report.head.hash, "the log hash at position 5");
}

async fn verify_catches_a_head_row_with_only_its_hash_changed(db: Arc<Fixture>) {
    let anchors = three_streams_anchored(&db).await;
    // The head row keeps position 6 but records the log hash of position 4.
    db.execute("UPDATE log_head SET hash = (SELECT log_hash FROM events WHERE position = 4)")
        .await;
    let report = db.store().verify().await.unwrap();
    assert_eq!(report.head.position, 6);
    assert_eq!(report.head.hash, anchors[2]);
    let broken = report
        .first_broken_link
        .expect("a head row whose hash is not the log's is caught");
    assert_eq!(
        (broken.stream.as_str(), broken.version, broken.position),
        ("lead-c", 2, 6)
    );
    assert_eq!(
        broken.reason,
        "the log's head row records position 6 with a hash that is not the log hash of \
         the last event"
    );
    assert_eq!(broken.expected, anchors[1], "the head row's hash");
    assert_eq!(broken.found, anchors[2], "the log hash at position 6");
}

async fn verify_catches_a_head_row_with_only_its_position_moved_back(db: Arc<Fixture>) {
    let anchors = three_streams_anchored(&db).await;
    // The head row keeps the last event's log hash but records position 4.
    db.execute("UPDATE log_head SET position = 4").await;
    let report = db.store().verify().await.unwrap();
    assert_eq!(report.head.position, 6);
    let broken = report
        .first_broken_link
        .expect("a head row behind the log is caught");
    assert_eq!(
        (broken.stream.as_str(), broken.version, broken.position),
        ("lead-c", 2, 4)
    );
    assert_eq!(
        broken.reason,
        "the log's head row records position 4, which does not match the last event \
         (position 6)"
    );
    assert_eq!(
        (broken.expected.as_str(), broken.found.as_str()),
        (anchors[2].as_str(), anchors[2].as_str()),
        "the head row's hash is the log's"
    );
}
