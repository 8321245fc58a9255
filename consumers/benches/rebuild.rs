//! Rebuild throughput of every read model together, and live lag, on both backends.
//!
//! `cargo bench -p annals-consumers --bench rebuild` (PostgreSQL at
//! `ANNALS_TEST_DATABASE_URL`). `ANNALS_BENCH_EVENTS` sets the size of the log (default
//! 1,000,000), `ANNALS_BENCH_SECONDS` the length of the live-lag run (default 10),
//! `ANNALS_BENCH_RUNS` (default 3) how many times each is measured.
//!
//! The log is a realistic revenue history written straight to the store: leads with
//! their signals and owners (about 70% of the events), accounts, and deals moving
//! through stages to won or lost. Rebuild: all projectors rebuild at once, from position
//! 0; events/s = log length ÷ wall time. Baseline: the same number of rows inserted by
//! raw sqlx in 1,000-row transactions into a bare table. Live lag: `RecordSignal`
//! commands at a steady half of the peak command rate while the lead board runs; the
//! time from a command's acknowledgement to the board having applied it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use annals_consumers::read_models::account_360::Account360;
use annals_consumers::read_models::deal_board::DealBoard;
use annals_consumers::read_models::lead_board::LeadBoard;
use annals_domain::Event;
use annals_domain::deal::DealEvent;
use annals_domain::lead::LeadEvent;
use annals_domain::values::*;
use annals_engine::{Consumer, ConsumerRunner, Projector, ReadDatabase};
use annals_store::{
    AppendRequest, EventStore, ExpectedVersion, NewEvent, PostgresStore, SqliteStore, StoreConfig,
    StreamName,
};
use anyhow::Context;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

fn new_event<E: Event>(event: &E) -> NewEvent {
    let stored = event.encode();
    NewEvent::new(stored.event_type, stored.data).with_schema_version(stored.schema_version)
}

/// One lead's history (10 events), and every fifth lead a deal's (6 events).
fn history(n: u64) -> anyhow::Result<Vec<AppendRequest>> {
    let lead = Uuid::now_v7();
    let mut events = vec![new_event(&LeadEvent::LeadCaptured {
        lead_id: lead,
        email: Some(Email::parse(&format!("lead{n}@example.com"))?),
        name: Some(PersonName::parse("Ada Lovelace")?),
        company: Some(Label::parse("Acme")?),
        source: Source::ALL[(n % 5) as usize],
    })];
    for i in 0..8 {
        let kind = SignalKind::ALL[((n + i) % 7) as usize];
        events.push(new_event(&LeadEvent::SignalRecorded {
            kind,
            points: kind.points(),
            occurred_at: None,
        }));
    }
    events.push(new_event(&LeadEvent::LeadAssigned {
        owner: Owner::parse(["ann", "bob", "cy"][(n % 3) as usize])?,
        previous_owner: None,
    }));
    let mut appends = vec![AppendRequest::new(
        StreamName::parse(format!("lead-{lead}"))?,
        ExpectedVersion::Any,
        events,
    )];
    if n.is_multiple_of(5) {
        let deal = Uuid::now_v7();
        let amount = Money::parse("EUR", 10_000 + (n as i64 % 97) * 100)?;
        let mut events = vec![new_event(&DealEvent::DealOpened {
            deal_id: deal,
            account_id: Uuid::now_v7(),
            name: Name::parse("Engines")?,
            amount: amount.clone(),
            owner: Some(Owner::parse("bob")?),
            expected_close: None,
            stage: Stage::Prospecting,
        })];
        for (from, to) in [
            (Stage::Prospecting, Stage::Qualification),
            (Stage::Qualification, Stage::Demo),
            (Stage::Demo, Stage::Proposal),
            (Stage::Proposal, Stage::Negotiation),
        ] {
            events.push(new_event(&DealEvent::DealStageChanged { from, to }));
        }
        events.push(new_event(&if n.is_multiple_of(2) {
            DealEvent::DealWon { amount }
        } else {
            DealEvent::DealLost {
                reason: Reason::parse("price")?,
            }
        }));
        appends.push(AppendRequest::new(
            StreamName::parse(format!("deal-{deal}"))?,
            ExpectedVersion::Any,
            events,
        ));
    }
    Ok(appends)
}

async fn fill_log(store: Arc<dyn EventStore>, events: u64) -> anyhow::Result<u64> {
    let writers = 16u64;
    let mut tasks = Vec::new();
    let per_writer = events / writers;
    for w in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut written = 0u64;
            let mut n = w;
            while written < per_writer {
                for append in history(n)? {
                    written += append.events.len() as u64;
                    store.append(append).await?;
                }
                n += writers;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(store.head().await?)
}

fn projectors() -> Vec<Arc<dyn Projector>> {
    vec![
        Arc::new(LeadBoard),
        Arc::new(DealBoard),
        Arc::new(Account360),
    ]
}

async fn rebuild_all(store: Arc<dyn EventStore>, db: ReadDatabase) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for projector in projectors() {
        let runner = ConsumerRunner::new(store.clone(), db.clone(), Consumer::ReadModel(projector));
        tasks.push(tokio::spawn(async move { runner.rebuild().await }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(started.elapsed())
}

/// A store of either backend, for the raw baseline's own SQL.
enum Backend {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

async fn raw_rate(backend: &Backend, rows: u64) -> anyhow::Result<f64> {
    let payload = r#"{"kind":"page_view","points":1}"#;
    let started = Instant::now();
    match backend {
        Backend::Sqlite(store) => {
            let pool = store.pool();
            sqlx::raw_sql(
                "DROP TABLE IF EXISTS raw_rows; \
                 CREATE TABLE raw_rows (position INTEGER, stream TEXT, data TEXT)",
            )
            .execute(pool)
            .await?;
            let mut written = 0;
            while written < rows {
                let mut tx = pool.begin().await?;
                for i in 0..1_000 {
                    sqlx::query("INSERT INTO raw_rows VALUES ($1, $2, $3)")
                        .bind((written + i) as i64)
                        .bind("lead-x")
                        .bind(payload)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                written += 1_000;
            }
        }
        Backend::Postgres(store) => {
            let pool = store.pool();
            sqlx::raw_sql(
                "DROP TABLE IF EXISTS raw_rows; \
                 CREATE TABLE raw_rows (position BIGINT, stream TEXT, data JSONB)",
            )
            .execute(pool)
            .await?;
            let mut written = 0;
            while written < rows {
                let positions: Vec<i64> = (0..1_000).map(|i| (written + i) as i64).collect();
                sqlx::query(
                    "INSERT INTO raw_rows SELECT p, 'lead-x', $2::jsonb FROM unnest($1::bigint[]) p",
                )
                .bind(&positions)
                .bind(payload)
                .execute(pool)
                .await?;
                written += 1_000;
            }
        }
    }
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

/// `RecordSignal` commands on 1,000 leads at a steady `rate` per second for `seconds`,
/// with the lead board running; returns the lag from each command's acknowledgement to
/// the board having applied it.
async fn live_lag(
    store: Arc<dyn EventStore>,
    db: ReadDatabase,
    rate: f64,
    seconds: f64,
) -> anyhow::Result<Vec<Duration>> {
    use annals_commands::{CommandContext, CommandHandler, HandlerConfig};
    use annals_domain::lead::{Lead, LeadCommand};
    let leads = Arc::new(CommandHandler::<Lead>::new(
        store.clone(),
        HandlerConfig::default(),
    ));
    let context = CommandContext {
        actor: "bench".into(),
        ..CommandContext::default()
    };
    let mut ids = Vec::new();
    for n in 0..1_000u64 {
        let id = Uuid::now_v7();
        let capture = LeadCommand::Capture {
            lead_id: id,
            email: Email::parse(&format!("live{n}-{}@example.com", id.simple()))?,
            name: PersonName::parse("Ada")?,
            company: None,
            source: Source::Web,
        };
        leads.execute(id, capture, &context).await?;
        ids.push(id);
    }
    let ids = Arc::new(ids);
    let board = Arc::new(ConsumerRunner::new(
        store.clone(),
        db.clone(),
        Consumer::ReadModel(Arc::new(LeadBoard)),
    ));
    board.catch_up().await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = {
        let board = board.clone();
        tokio::spawn(async move { board.run_until_stopped(stopped).await })
    };
    // Commands go out in 1 ms ticks, as many per tick as the rate asks.
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    let started = Instant::now();
    let mut sent = 0u64;
    let mut samples = Vec::new();
    while started.elapsed().as_secs_f64() < seconds {
        ticker.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            sent += 1;
            let (leads, board, ids, context) =
                (leads.clone(), board.clone(), ids.clone(), context.clone());
            samples.push(tokio::spawn(async move {
                let kind = SignalKind::ALL[(sent % 7) as usize];
                let command = LeadCommand::RecordSignal {
                    kind,
                    occurred_at: None,
                };
                let id = ids[(sent % 1_000) as usize];
                let outcome = match leads.execute(id, command, &context).await {
                    Ok(outcome) => outcome,
                    // A lost race decided again too often: not a lag sample.
                    Err(annals_commands::CommandError::ConcurrencyConflict { .. }) => {
                        return Ok(None);
                    }
                    Err(error) => return Err(anyhow::Error::from(error)),
                };
                let acknowledged = Instant::now();
                anyhow::ensure!(
                    board
                        .wait_for(outcome.position, Duration::from_secs(30))
                        .await,
                    "not applied within 30 s"
                );
                Ok(Some(acknowledged.elapsed()))
            }));
        }
    }
    let mut lags = Vec::new();
    for sample in samples {
        lags.extend(sample.await??);
    }
    let achieved = lags.len() as f64 / seconds;
    stop.send(true)?;
    running.await?;
    lags.sort_unstable();
    tracing_rate(rate, achieved);
    Ok(lags)
}

fn tracing_rate(asked: f64, achieved: f64) {
    eprintln!("live lag: {asked:.0} commands/s asked, {achieved:.0}/s acknowledged");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let admin = std::env::var("ANNALS_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let events: u64 = std::env::var("ANNALS_BENCH_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let seconds: f64 = std::env::var("ANNALS_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    let runs: usize = std::env::var("ANNALS_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);

    println!("{runs} runs of each figure: median (min–max)\n");
    println!(
        "| backend | log | rebuild of all read models | events/s | raw batched insert rows/s | ratio | target |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut lag_lines = Vec::new();
    let only = std::env::var("ANNALS_BENCH_ONLY").unwrap_or_default();
    for backend in ["sqlite", "postgres"] {
        if !only.is_empty() && only != backend {
            continue;
        }
        let dir = tempfile::tempdir()?;
        let mut pg_name = None;
        let opened = if backend == "sqlite" {
            let url = format!("sqlite://{}", dir.path().join("bench.db").display());
            Backend::Sqlite(SqliteStore::open(&url, StoreConfig::default()).await?)
        } else {
            let name = format!("annals_bench_{}", Uuid::new_v4().simple());
            let mut admin_connection = PgConnection::connect(&admin)
                .await
                .context("PostgreSQL must be running")?;
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut admin_connection)
                .await?;
            let (server, _) = admin
                .rsplit_once('/')
                .context("database URL without a path")?;
            let store =
                PostgresStore::open(&format!("{server}/{name}"), StoreConfig::default()).await?;
            pg_name = Some(name);
            Backend::Postgres(store)
        };
        let (store, db): (Arc<dyn EventStore>, ReadDatabase) = match &opened {
            Backend::Sqlite(store) => (
                Arc::new(store.clone()),
                ReadDatabase::new(Arc::new(store.clone())),
            ),
            Backend::Postgres(store) => (
                Arc::new(store.clone()),
                ReadDatabase::new(Arc::new(store.clone())),
            ),
        };
        // Live lag first, on the fresh database: steady operation, apart from the
        // maintenance (autovacuum, checkpoints) that writing a million rows sets off.
        // Half the peak command rate of `benches/commands.rs` on this machine
        // (12,475/s on PostgreSQL, 9,696/s on SQLite); `ANNALS_BENCH_LAG_RATE` overrides.
        let rate = std::env::var("ANNALS_BENCH_LAG_RATE")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(if backend == "sqlite" {
                4_850.0
            } else {
                6_250.0
            });
        let (mut commands, mut p50s, mut p99s) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let lags = live_lag(store.clone(), db.clone(), rate, seconds).await?;
            let p = |q: f64| lags[((lags.len() as f64 - 1.0) * q) as usize].as_secs_f64();
            commands.push(lags.len() as f64);
            p50s.push(p(0.5));
            p99s.push(p(0.99));
        }
        let worst_p99 = p99s.iter().copied().fold(0.0, f64::max);
        let millis = |v: f64| format!("{:.1} ms", v * 1000.0);
        lag_lines.push(format!(
            "| {backend} | {} | {} | {} | {} |",
            spread(&commands, |v| format!("{v:.0}")),
            spread(&p50s, millis),
            spread(&p99s, millis),
            if worst_p99 <= 0.050 {
                "met in every run"
            } else {
                "NOT met in every run"
            }
        ));
        let log = fill_log(store.clone(), events).await?;
        let (mut took, mut rates, mut raws, mut ratios) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let elapsed = rebuild_all(store.clone(), db.clone()).await?.as_secs_f64();
            let raw = raw_rate(&opened, log).await?;
            took.push(elapsed);
            rates.push(log as f64 / elapsed);
            raws.push(raw);
            ratios.push(log as f64 / elapsed / raw);
        }
        let target = if backend == "sqlite" {
            100_000.0
        } else {
            50_000.0
        };
        let slowest = rates.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "| {backend} | {log} events | {} | {} | {} | {} | ≥ {target:.0}/s — {} |",
            spread(&took, |v| format!("{v:.1} s")),
            spread(&rates, |v| format!("{v:.0}")),
            spread(&raws, |v| format!("{v:.0}")),
            spread(&ratios, |v| format!("{v:.2}×")),
            if slowest >= target {
                "met in every run"
            } else {
                "NOT met in every run"
            }
        );

        drop(store);
        if let Some(name) = pg_name {
            let mut admin_connection = PgConnection::connect(&admin).await?;
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut admin_connection)
                .await?;
        }
    }
    println!("\n| backend | commands | lag p50 | lag p99 | target p99 ≤ 50 ms |");
    println!("|---|---|---|---|---|");
    for line in lag_lines {
        println!("{line}");
    }
    Ok(())
}

/// The median of some figures and their range, as `median (min–max)`.
fn spread(values: &[f64], show: impl Fn(f64) -> String) -> String {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match (sorted.first(), sorted.last()) {
        (Some(min), Some(max)) => format!(
            "{} ({}–{})",
            show(sorted[sorted.len() / 2]),
            show(*min),
            show(*max)
        ),
        _ => "–".to_owned(),
    }
}
