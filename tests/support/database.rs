//! A fresh database per test, on either backend: a temporary SQLite file, or a PostgreSQL
//! database created for the test and dropped after it (even when the test fails).
//!
//! Shared by the test binaries of several crates (`#[path]` modules); each uses a part.
#![allow(dead_code)]

/// Generates, for each named test body `async fn case(db: Arc<Fixture>)`, one test on
/// SQLite (`sqlite::case`) and one on PostgreSQL (`postgres::case`). Include this module
/// as `#[macro_use] mod database;` at the test crate's root.
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    crate::database::run(crate::database::Backend::Sqlite, super::$case).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    crate::database::run(crate::database::Backend::Postgres, super::$case).await;
                }
            )*
        }
    };
}

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use annals_store::{
    AppendOutcome, AppendRequest, EventStore, ExpectedVersion, NewEvent, PostgresStore,
    SqliteStore, StoreConfig, StoreError, StreamName, WriterProbe, postgres, sqlite,
};
use futures::future::BoxFuture;
use serde_json::json;
use sqlx::{Connection, Row};

/// The server every developer and CI machine runs; `ANNALS_TEST_DATABASE_URL` overrides.
pub fn admin_url() -> String {
    std::env::var("ANNALS_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The `application_name` of the PostgreSQL sessions of the stores a test opens itself.
/// A server under test keeps the store's default (`annals`), so a test can end the
/// server's sessions and only those.
pub const TEST_APPLICATION: &str = "annals-test";

/// The URL for a store the test opens itself: its sessions named `TEST_APPLICATION`.
fn own(url: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}application_name={TEST_APPLICATION}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug)]
pub enum Fixture {
    Sqlite {
        store: SqliteStore,
        url: String,
        _dir: tempfile::TempDir,
    },
    Postgres {
        store: PostgresStore,
        url: String,
        database: String,
    },
}

/// A store of either backend, with the test support each offers.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

impl Store {
    pub fn dyn_store(&self) -> Arc<dyn EventStore> {
        match self {
            Store::Sqlite(store) => Arc::new(store.clone()),
            Store::Postgres(store) => Arc::new(store.clone()),
        }
    }

    pub fn probe(&self) -> &WriterProbe {
        match self {
            Store::Sqlite(store) => store.writer_probe(),
            Store::Postgres(store) => store.writer_probe(),
        }
    }

    pub fn hold_append(&self, request: AppendRequest) -> BoxFuture<'_, Result<Held, StoreError>> {
        Box::pin(async move {
            Ok(match self {
                Store::Sqlite(store) => Held::Sqlite(store.hold_append(request).await?),
                Store::Postgres(store) => Held::Postgres(store.hold_append(request).await?),
            })
        })
    }
}

/// Polls a condition on the writer's probe until it holds, for at most 10 s: how a test
/// waits for the writer to reach a state it forced (a paused queue filling up).
pub async fn until(probe: &WriterProbe, what: &str, condition: impl Fn(&WriterProbe) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !condition(probe) {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub enum Held {
    Sqlite(sqlite::HeldAppend),
    Postgres(postgres::HeldAppend),
}

impl Held {
    pub async fn commit(self) -> Result<AppendOutcome, StoreError> {
        match self {
            Held::Sqlite(held) => held.commit().await,
            Held::Postgres(held) => held.commit().await,
        }
    }
}

pub fn config() -> StoreConfig {
    StoreConfig {
        max_connections: 8,
        // Long, so that a test which wakes up quickly proves the notification path.
        poll_interval: Duration::from_secs(60),
        ..StoreConfig::default()
    }
}

impl Fixture {
    pub async fn new(backend: Backend) -> Fixture {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temporary directory");
                let url = format!("sqlite://{}", dir.path().join("annals.db").display());
                let store = SqliteStore::open(&url, config())
                    .await
                    .expect("open sqlite");
                Fixture::Sqlite {
                    store,
                    url,
                    _dir: dir,
                }
            }
            Backend::Postgres => {
                let database = format!("annals_test_{}", uuid::Uuid::new_v4().simple());
                let mut admin = sqlx::PgConnection::connect(&admin_url())
                    .await
                    .expect("PostgreSQL must be running (see README)");
                sqlx::query(&format!("CREATE DATABASE {database}"))
                    .execute(&mut admin)
                    .await
                    .expect("create test database");
                let url = database_url(&database);
                let store = PostgresStore::open(&own(&url), config())
                    .await
                    .expect("open postgres");
                Fixture::Postgres {
                    store,
                    url,
                    database,
                }
            }
        }
    }

    /// The PostgreSQL database's name (`None` on SQLite).
    pub fn database_name(&self) -> Option<&str> {
        match self {
            Fixture::Postgres { database, .. } => Some(database),
            Fixture::Sqlite { .. } => None,
        }
    }

    /// The database URL, as `annals --database-url` takes it.
    pub fn url(&self) -> &str {
        match self {
            Fixture::Sqlite { url, .. } | Fixture::Postgres { url, .. } => url,
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Fixture::Sqlite { .. } => Backend::Sqlite,
            Fixture::Postgres { .. } => Backend::Postgres,
        }
    }

    pub fn store(&self) -> Arc<dyn EventStore> {
        match self {
            Fixture::Sqlite { store, .. } => Arc::new(store.clone()),
            Fixture::Postgres { store, .. } => Arc::new(store.clone()),
        }
    }

    /// The tables beside the log (read models, checkpoints, leases).
    pub fn tables(&self) -> Arc<dyn annals_store::Tables> {
        match self {
            Fixture::Sqlite { store, .. } => Arc::new(store.clone()),
            Fixture::Postgres { store, .. } => Arc::new(store.clone()),
        }
    }

    /// The data keys beside the log (crypto-shredding).
    pub fn keys(&self) -> Arc<dyn annals_store::DataKeys> {
        match self {
            Fixture::Sqlite { store, .. } => Arc::new(store.clone()),
            Fixture::Postgres { store, .. } => Arc::new(store.clone()),
        }
    }

    /// A second, independent store on the same database, as another process would open.
    pub async fn open_again(&self) -> Arc<dyn EventStore> {
        match self {
            Fixture::Sqlite { url, .. } => {
                Arc::new(SqliteStore::open(url, config()).await.expect("reopen"))
            }
            Fixture::Postgres { url, .. } => Arc::new(
                PostgresStore::open(&own(url), config())
                    .await
                    .expect("reopen"),
            ),
        }
    }

    /// The tables of a second, independent store on the same database.
    pub async fn open_again_tables(&self) -> Arc<dyn annals_store::Tables> {
        match self {
            Fixture::Sqlite { url, .. } => {
                Arc::new(SqliteStore::open(url, config()).await.expect("reopen"))
            }
            Fixture::Postgres { url, .. } => Arc::new(
                PostgresStore::open(&own(url), config())
                    .await
                    .expect("reopen"),
            ),
        }
    }

    /// A second, independent store on the same database with other settings.
    pub async fn open_with(&self, config: StoreConfig) -> Store {
        match self {
            Fixture::Sqlite { url, .. } => {
                Store::Sqlite(SqliteStore::open(url, config).await.expect("reopen"))
            }
            Fixture::Postgres { url, .. } => Store::Postgres(
                PostgresStore::open(&own(url), config)
                    .await
                    .expect("reopen"),
            ),
        }
    }

    /// The fixture's store with its backend's test support.
    pub fn concrete(&self) -> Store {
        match self {
            Fixture::Sqlite { store, .. } => Store::Sqlite(store.clone()),
            Fixture::Postgres { store, .. } => Store::Postgres(store.clone()),
        }
    }

    /// Runs SQL directly against the database, behind the store's back.
    // Boxed: sqlx's executor futures trip the compiler's higher-ranked `Send` check when
    // they sit inside a spawned test body.
    pub fn execute<'a>(&'a self, sql: &'a str) -> BoxFuture<'a, u64> {
        Box::pin(async move {
            match self {
                Fixture::Sqlite { store, .. } => sqlx::query(sql)
                    .execute(store.pool())
                    .await
                    .expect("execute")
                    .rows_affected(),
                Fixture::Postgres { store, .. } => sqlx::query(sql)
                    .execute(store.pool())
                    .await
                    .expect("execute")
                    .rows_affected(),
            }
        })
    }

    /// Reads one text setting (`PRAGMA x` or `SHOW x`) on the store's connections.
    pub fn setting<'a>(&'a self, query: &'a str) -> BoxFuture<'a, String> {
        Box::pin(async move {
            match self {
                Fixture::Sqlite { store, .. } => {
                    let row = sqlx::query(query)
                        .fetch_one(store.pool())
                        .await
                        .expect("setting");
                    row.try_get::<String, _>(0)
                        .or_else(|_| row.try_get::<i64, _>(0).map(|n| n.to_string()))
                        .expect("setting value")
                }
                Fixture::Postgres { store, .. } => sqlx::query_scalar(query)
                    .fetch_one(store.pool())
                    .await
                    .expect("setting"),
            }
        })
    }

    /// Every row of a query, each column read as text (cast the columns in the SQL).
    pub fn text_rows<'a>(&'a self, sql: &'a str) -> BoxFuture<'a, Vec<Vec<Option<String>>>> {
        fn texts<R: Row>(row: &R) -> Vec<Option<String>>
        where
            for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
            usize: sqlx::ColumnIndex<R>,
        {
            (0..row.len())
                .map(|i| row.try_get::<Option<String>, _>(i).expect("a text column"))
                .collect()
        }
        Box::pin(async move {
            match self {
                Fixture::Sqlite { store, .. } => sqlx::query(sql)
                    .fetch_all(store.pool())
                    .await
                    .expect("query")
                    .iter()
                    .map(texts)
                    .collect(),
                Fixture::Postgres { store, .. } => sqlx::query(sql)
                    .fetch_all(store.pool())
                    .await
                    .expect("query")
                    .iter()
                    .map(texts)
                    .collect(),
            }
        })
    }

    /// A table as the database describes it: each column's name, type (SQLite: its
    /// affinity) and nullability in order, and each index's definition, by name.
    pub async fn described(&self, table: &str) -> (Vec<String>, Vec<String>) {
        let (columns, indexes) = match self.backend() {
            Backend::Sqlite => (
                format!(
                    "SELECT name || ' ' || CASE WHEN type LIKE '%INT%' THEN 'INTEGER' ELSE type END \
                            || CASE \"notnull\" WHEN 1 THEN ' NOT NULL' ELSE '' END \
                       FROM pragma_table_info('{table}') ORDER BY cid"
                ),
                format!(
                    // The primary key's index has no SQL: its columns, in order.
                    "SELECT m.name || ': ' || COALESCE(m.sql, 'primary key (' || \
                            (SELECT group_concat(name, ', ') FROM \
                               (SELECT name FROM pragma_index_info(m.name) ORDER BY seqno)) || ')') \
                       FROM sqlite_master m \
                      WHERE m.type = 'index' AND m.tbl_name = '{table}' ORDER BY m.name"
                ),
            ),
            Backend::Postgres => (
                format!(
                    "SELECT column_name || ' ' || data_type \
                            || CASE is_nullable WHEN 'NO' THEN ' NOT NULL' ELSE '' END \
                       FROM information_schema.columns WHERE table_name = '{table}' \
                      ORDER BY ordinal_position"
                ),
                format!(
                    "SELECT indexname || ': ' || indexdef FROM pg_indexes \
                      WHERE tablename = '{table}' ORDER BY indexname"
                ),
            ),
        };
        let text = |rows: Vec<Vec<Option<String>>>| -> Vec<String> {
            rows.into_iter()
                .map(|row| {
                    // SQLite keeps an index's SQL as written: compare it by its words.
                    let words = row[0].clone().unwrap().replace("IF NOT EXISTS ", "");
                    words.split_whitespace().collect::<Vec<_>>().join(" ")
                })
                .collect()
        };
        (
            text(self.text_rows(&columns).await),
            text(self.text_rows(&indexes).await),
        )
    }

    pub fn hold_append(&self, request: AppendRequest) -> BoxFuture<'_, Held> {
        Box::pin(async move {
            match self {
                Fixture::Sqlite { store, .. } => {
                    Held::Sqlite(store.hold_append(request).await.expect("held append"))
                }
                Fixture::Postgres { store, .. } => {
                    Held::Postgres(store.hold_append(request).await.expect("held append"))
                }
            }
        })
    }

    async fn drop_database(&self) {
        // FORCE ends the connections the store and its clones still hold.
        if let Fixture::Postgres { database, .. } = self
            && let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url()).await
        {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
                .execute(&mut admin)
                .await;
        }
    }
}

fn database_url(database: &str) -> String {
    let admin = admin_url();
    match admin.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{database}"),
        None => format!("{admin}/{database}"),
    }
}

/// Runs one test body against a fresh database of the backend, then removes the database
/// whether the body passed or panicked.
pub async fn run<F, Fut>(backend: Backend, body: F)
where
    F: FnOnce(Arc<Fixture>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let fixture = Arc::new(Fixture::new(backend).await);
    let outcome = tokio::spawn(body(fixture.clone())).await;
    fixture.drop_database().await;
    if let Err(error) = outcome {
        if error.is_panic() {
            std::panic::resume_unwind(error.into_panic());
        }
        panic!("test task failed: {error}");
    }
}

pub fn stream(name: &str) -> StreamName {
    StreamName::parse(name).expect("valid stream name")
}

pub fn event(event_type: &str, n: i64) -> NewEvent {
    NewEvent::new(event_type, json!({ "n": n }))
}

pub fn append(name: &str, expected: ExpectedVersion, events: Vec<NewEvent>) -> AppendRequest {
    AppendRequest::new(stream(name), expected, events)
}
