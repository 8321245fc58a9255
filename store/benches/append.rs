//! Append throughput of the event store on both backends, beside raw sqlx inserts of
//! equivalent rows into a bare table (no indexes, no checks, no hashing): the physical
//! limit of the database on this machine. Prints a Markdown table for BENCHMARKS.md.
//!
//! `cargo bench -p annals-store --bench append` (PostgreSQL at
//! `ANNALS_TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`).
//! `ANNALS_BENCH_SECONDS` sets the length of one measurement (default 3) and
//! `ANNALS_BENCH_RUNS` the number of runs whose median is reported (default 3).
//! `ANNALS_BENCH_ONLY=sqlite|postgres` and `ANNALS_BENCH_WORKLOAD=<start of a workload
//! name>` narrow the run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use annals_store::{
    AppendRequest, EventStore, ExpectedVersion, NewEvent, PostgresStore, SqliteStore, StoreConfig,
    StreamName,
};
use anyhow::Context;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, SqliteConnection};

const WRITERS: usize = 16;
const BATCH: usize = 100;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Sqlite,
    Postgres,
}

fn payload(i: usize) -> Value {
    json!({
        "email": format!("lead{i}@example.com"),
        "name": "Ada Lovelace",
        "company": "Analytical Engines Ltd",
        "source": "web",
        "score": i % 100,
    })
}

fn metadata() -> Value {
    json!({"actor": "bench", "correlation_id": "0190f0e4-7d2a-7c4e-9d59-2f1c7e3b5a10"})
}

struct Database {
    backend: Backend,
    url: String,
    admin_url: String,
    name: String,
    _dir: Option<tempfile::TempDir>,
}

impl Database {
    async fn create(backend: Backend, admin_url: &str) -> anyhow::Result<Database> {
        let name = format!("annals_bench_{}", uuid::Uuid::new_v4().simple());
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir()?;
                let url = format!("sqlite://{}", dir.path().join("bench.db").display());
                Ok(Database {
                    backend,
                    url,
                    admin_url: admin_url.to_owned(),
                    name,
                    _dir: Some(dir),
                })
            }
            Backend::Postgres => {
                let mut admin = PgConnection::connect(admin_url)
                    .await
                    .context("PostgreSQL must be running")?;
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut admin)
                    .await?;
                let (server, _) = admin_url
                    .rsplit_once('/')
                    .context("database URL without a path")?;
                Ok(Database {
                    backend,
                    url: format!("{server}/{name}"),
                    admin_url: admin_url.to_owned(),
                    name,
                    _dir: None,
                })
            }
        }
    }

    async fn drop(self) -> anyhow::Result<()> {
        if self.backend == Backend::Postgres {
            let mut admin = PgConnection::connect(&self.admin_url).await?;
            sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut admin)
            .await?;
        }
        Ok(())
    }

    async fn store(&self) -> anyhow::Result<Arc<dyn EventStore>> {
        let config = StoreConfig::default();
        Ok(match self.backend {
            Backend::Sqlite => Arc::new(SqliteStore::open(&self.url, config).await?),
            Backend::Postgres => Arc::new(PostgresStore::open(&self.url, config).await?),
        })
    }
}

/// A connection for the raw baseline: PostgreSQL with `synchronous_commit=on`, SQLite
/// in WAL with `synchronous=FULL`, as the store runs.
enum Raw {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

impl Raw {
    async fn connect(db: &Database) -> anyhow::Result<Raw> {
        Ok(match db.backend {
            Backend::Sqlite => {
                let options: sqlx::sqlite::SqliteConnectOptions = db.url.parse()?;
                let options = options
                    .create_if_missing(true)
                    .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sqlx::sqlite::SqliteSynchronous::Full)
                    .busy_timeout(Duration::from_secs(30));
                Raw::Sqlite(SqliteConnection::connect_with(&options).await?)
            }
            Backend::Postgres => Raw::Postgres(PgConnection::connect(&db.url).await?),
        })
    }

    async fn create_table(&mut self) -> anyhow::Result<()> {
        match self {
            Raw::Sqlite(c) => {
                sqlx::raw_sql(
                    "CREATE TABLE IF NOT EXISTS raw_events (position INTEGER, stream TEXT, \
                     version INTEGER, event_id TEXT, event_type TEXT, data TEXT, \
                     metadata TEXT, recorded_at INTEGER, hash BLOB)",
                )
                .execute(c)
                .await?;
            }
            Raw::Postgres(c) => {
                sqlx::raw_sql(
                    "CREATE TABLE IF NOT EXISTS raw_events (position BIGINT, stream TEXT, \
                     version BIGINT, event_id UUID, event_type TEXT, data JSONB, \
                     metadata JSONB, recorded_at TIMESTAMPTZ, hash BYTEA)",
                )
                .execute(c)
                .await?;
            }
        }
        Ok(())
    }

    /// One transaction inserting `rows` rows, the way an application would without an
    /// event store: one multi-row statement on PostgreSQL, prepared inserts on SQLite.
    async fn insert(&mut self, first: usize, rows: usize) -> anyhow::Result<()> {
        let data: Vec<String> = (first..first + rows)
            .map(|i| payload(i).to_string())
            .collect();
        let meta = metadata().to_string();
        let hash = [7u8; 32];
        match self {
            Raw::Sqlite(c) => {
                let mut tx = c.begin_with("BEGIN IMMEDIATE").await?;
                for (i, d) in data.iter().enumerate() {
                    sqlx::query(
                        "INSERT INTO raw_events VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    )
                    .bind((first + i) as i64)
                    .bind(format!("raw-{first}"))
                    .bind(i as i64 + 1)
                    .bind(uuid::Uuid::now_v7().to_string())
                    .bind("LeadCaptured")
                    .bind(d)
                    .bind(&meta)
                    .bind(chrono::Utc::now().timestamp_micros())
                    .bind(hash.as_slice())
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
            }
            Raw::Postgres(c) => {
                let mut tx = c.begin().await?;
                let n = rows as i64;
                let positions: Vec<i64> = (0..n).map(|i| first as i64 + i).collect();
                let streams = vec![format!("raw-{first}"); rows];
                let versions: Vec<i64> = (1..=n).collect();
                let ids: Vec<uuid::Uuid> = (0..rows).map(|_| uuid::Uuid::now_v7()).collect();
                let types = vec!["LeadCaptured"; rows];
                let metas = vec![meta.as_str(); rows];
                let times = vec![chrono::Utc::now(); rows];
                let hashes = vec![hash.as_slice(); rows];
                sqlx::query(
                    "INSERT INTO raw_events SELECT p, s, v, i, t, d::jsonb, m::jsonb, r, h \
                     FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::uuid[], \
                                 $5::text[], $6::text[], $7::text[], $8::timestamptz[], \
                                 $9::bytea[]) AS u(p, s, v, i, t, d, m, r, h)",
                )
                .bind(&positions)
                .bind(&streams)
                .bind(&versions)
                .bind(&ids)
                .bind(&types)
                .bind(&data)
                .bind(&metas)
                .bind(&times)
                .bind(&hashes)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }
}

/// Runs `workers` loops for `seconds` and returns events per second.
async fn measure<F, Fut>(
    workers: usize,
    seconds: f64,
    events_per_op: usize,
    op: F,
) -> anyhow::Result<f64>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0usize;
            while Instant::now() < deadline {
                op(w, done).await?;
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let mut ops = 0;
    for task in tasks {
        ops += task.await??;
    }
    Ok((ops * events_per_op) as f64 / started.elapsed().as_secs_f64())
}

async fn raw_rate(db: &Database, workers: usize, rows: usize, seconds: f64) -> anyhow::Result<f64> {
    let mut connections = Vec::new();
    for _ in 0..workers {
        let mut raw = Raw::connect(db).await?;
        raw.create_table().await?;
        connections.push(tokio::sync::Mutex::new(raw));
    }
    let connections = Arc::new(connections);
    measure(workers, seconds, rows, move |w, n| {
        let connections = connections.clone();
        async move {
            let mut raw = connections[w].lock().await;
            raw.insert(w * 10_000_000 + n * rows, rows).await
        }
    })
    .await
}

async fn store_rate(
    store: Arc<dyn EventStore>,
    label: &str,
    workers: usize,
    events: usize,
    seconds: f64,
) -> anyhow::Result<f64> {
    let label = label.to_owned();
    measure(workers, seconds, events, move |w, n| {
        let store = store.clone();
        let label = label.clone();
        async move {
            // Each writer has a stream of its own; a new stream every 1,000 appends keeps
            // streams of realistic length.
            let stream = StreamName::parse(format!("lead-{label}w{w}s{}", n / 1000))?;
            let batch = (0..events)
                .map(|i| {
                    NewEvent::new("LeadCaptured", payload(n * events + i))
                        .with_metadata(serde_json::from_value(metadata()).unwrap_or_default())
                })
                .collect();
            store
                .append(AppendRequest::new(stream, ExpectedVersion::Any, batch))
                .await?;
            Ok(())
        }
    })
    .await
}

fn median(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    (xs[xs.len() / 2], xs[0], xs[xs.len() - 1])
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing to do.
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let admin_url = std::env::var("ANNALS_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let seconds: f64 = std::env::var("ANNALS_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let runs: usize = std::env::var("ANNALS_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);

    println!(
        "| backend | workload | store events/s (median, min–max) | raw events/s (median, min–max) | ratio | target |"
    );
    println!("|---|---|---|---|---|---|");
    let only = std::env::var("ANNALS_BENCH_ONLY").unwrap_or_default();
    for backend in [Backend::Sqlite, Backend::Postgres] {
        if !only.is_empty() && !format!("{backend:?}").eq_ignore_ascii_case(&only) {
            continue;
        }
        let db = Database::create(backend, &admin_url).await?;
        let store = db.store().await?;
        let workloads: [(&str, usize, usize, usize, f64, &str); 3] = [
            (
                "1 event/append, 1 writer",
                1,
                1,
                1,
                0.8,
                "≥ 0.8× raw 1-row tx, 1 conn",
            ),
            (
                "1 event/append, 16 writers",
                WRITERS,
                1,
                WRITERS,
                if backend == Backend::Postgres {
                    2.0
                } else {
                    0.0
                },
                if backend == Backend::Postgres {
                    "≥ 2× raw 1-row tx, 16 conns"
                } else {
                    "(none; raw: 16 conns)"
                },
            ),
            (
                "100 events/append, 1 writer",
                1,
                BATCH,
                1,
                0.5,
                "≥ 0.5× raw 100-row tx",
            ),
        ];
        let workload = std::env::var("ANNALS_BENCH_WORKLOAD").unwrap_or_default();
        for (i, (name, workers, events, raw_workers, target, target_text)) in
            workloads.into_iter().enumerate()
        {
            if !workload.is_empty() && !name.starts_with(&workload) {
                continue;
            }
            let mut ours = Vec::new();
            let mut raw = Vec::new();
            for run in 0..runs {
                // Alternate which goes first, so neither always meets a warmer cache.
                let label = format!("b{i}r{run}");
                if run % 2 == 0 {
                    ours.push(store_rate(store.clone(), &label, workers, events, seconds).await?);
                    raw.push(raw_rate(&db, raw_workers, events, seconds).await?);
                } else {
                    raw.push(raw_rate(&db, raw_workers, events, seconds).await?);
                    ours.push(store_rate(store.clone(), &label, workers, events, seconds).await?);
                }
            }
            let (o, o_min, o_max) = median(ours);
            let (r, r_min, r_max) = median(raw);
            let ratio = o / r;
            let verdict = if target == 0.0 {
                String::new()
            } else if ratio >= target {
                " — met".to_owned()
            } else {
                " — NOT met".to_owned()
            };
            println!(
                "| {backend:?} | {name} | {o:.0} ({o_min:.0}–{o_max:.0}) | {r:.0} ({r_min:.0}–{r_max:.0}) | {ratio:.2}× | {target_text}{verdict} |"
            );
        }
        drop(store);
        db.drop().await?;
    }
    Ok(())
}
