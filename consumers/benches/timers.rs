//! Durable timers on both backends: how many due timers the scheduler fires per second,
//! and the delay from a timer's due time to its `TimerFired` at p50 and p99.
//!
//! `cargo bench -p annals-consumers --bench timers` (PostgreSQL at
//! `ANNALS_TEST_DATABASE_URL`). `ANNALS_BENCH_TIMERS` sets how many timers each figure
//! uses (default 5,000), `ANNALS_BENCH_SECONDS` the window the delay run's due times are
//! spread over (default 5), `ANNALS_BENCH_RUNS` (default 3) how often each is measured.
//!
//! Fired/s: timers already due, the due-timers read model caught up, one scheduler
//! firing them all (`fire_due`); each firing is a command appending `TimerFired` to the
//! timer's stream. Baseline, in the same run: the same number of `Schedule` commands
//! (one append to a new timer stream each) sent by 256 writers, as many as the
//! scheduler fires at once; the ratio says what firing costs beyond the append itself. Delay: timers due at a steady rate over the
//! window while the read model's runner and the scheduler run as a server runs them;
//! each timer's delay is its `TimerFired`'s `recorded_at` minus its due time.

use std::sync::Arc;
use std::time::Instant;

use annals_commands::{CommandContext, CommandHandler, HandlerConfig, Handlers};
use annals_consumers::read_models::due_timers::DueTimers;
use annals_consumers::timers::{SystemClock, TimerScheduler, schedule};
use annals_domain::timer::Timer;
use annals_engine::{Consumer, ConsumerRunner, ReadDatabase};
use annals_store::{EventStore, LogFilter, PostgresStore, SqliteStore, StoreConfig};
use anyhow::Context;
use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn context() -> CommandContext {
    CommandContext {
        actor: "bench".into(),
        ..CommandContext::default()
    }
}

/// Writers that schedule at once: as many as timers the scheduler fires at once (its
/// page), so the baseline and the firing append with the same concurrency.
const WRITERS: usize = 256;

/// Schedules `due.len()` timers from `WRITERS` writers; returns the wall time.
async fn schedule_all(
    timers: Arc<CommandHandler<Timer>>,
    run: &str,
    due: Vec<DateTime<Utc>>,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let due = Arc::new(due);
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let (timers, due, run) = (timers.clone(), due.clone(), run.to_owned());
        tasks.push(tokio::spawn(async move {
            for n in (writer..due.len()).step_by(WRITERS) {
                let key = format!("{run}-{n}");
                let payload = json!({"n": n});
                schedule(&timers, "bench", &key, due[n], payload, &context()).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// The delays (seconds) of the timers fired after `after`: `recorded_at` − due time.
async fn delays(store: &Arc<dyn EventStore>, after: u64) -> anyhow::Result<Vec<f64>> {
    let mut delays = Vec::new();
    let mut next = after + 1;
    loop {
        let page = store
            .read_all(next, 10_000, &LogFilter::event_types(["TimerFired"]))
            .await?;
        for event in &page.events {
            let due: DateTime<Utc> = serde_json::from_value(event.data["due_at"].clone())?;
            delays.push((event.recorded_at - due).as_seconds_f64());
        }
        if page.next_position <= next {
            break;
        }
        next = page.next_position;
    }
    delays.sort_by(f64::total_cmp);
    Ok(delays)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

fn spread(values: &[f64], show: impl Fn(f64) -> String) -> String {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    format!(
        "{} ({}–{})",
        show(sorted[sorted.len() / 2]),
        show(sorted[0]),
        show(sorted[sorted.len() - 1])
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let admin = std::env::var("ANNALS_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let count: usize = setting("ANNALS_BENCH_TIMERS", 5_000);
    let seconds: f64 = setting("ANNALS_BENCH_SECONDS", 5.0);
    let runs: usize = setting("ANNALS_BENCH_RUNS", 3usize).max(1);
    println!("{runs} runs of each figure, {count} timers each: median (min–max)\n");
    println!("| backend | fired/s | scheduled/s (baseline) | ratio | delay p50 | delay p99 |");
    println!("|---|---|---|---|---|---|");
    for backend in ["sqlite", "postgres"] {
        let dir = tempfile::tempdir()?;
        let mut pg_name = None;
        let (store, db): (Arc<dyn EventStore>, ReadDatabase) = if backend == "sqlite" {
            let url = format!("sqlite://{}", dir.path().join("bench.db").display());
            let store = SqliteStore::open(&url, StoreConfig::default()).await?;
            (Arc::new(store.clone()), ReadDatabase::new(Arc::new(store)))
        } else {
            let name = format!("annals_bench_{}", Uuid::new_v4().simple());
            let mut connection = PgConnection::connect(&admin)
                .await
                .context("PostgreSQL must be running")?;
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut connection)
                .await?;
            let (server, _) = admin.rsplit_once('/').context("a URL with a path")?;
            let store =
                PostgresStore::open(&format!("{server}/{name}"), StoreConfig::default()).await?;
            pg_name = Some(name);
            (Arc::new(store.clone()), ReadDatabase::new(Arc::new(store)))
        };
        let handlers = Handlers::new(store.clone(), HandlerConfig::default());
        let timers = handlers.of::<Timer>();
        let board = Arc::new(ConsumerRunner::new(
            store.clone(),
            db.clone(),
            Consumer::ReadModel(Arc::new(DueTimers)),
        ));
        board.register().await?;
        let scheduler = Arc::new(TimerScheduler::new(
            db.clone(),
            &handlers,
            Arc::new(SystemClock),
        ));
        let (mut fired, mut scheduled, mut ratios, mut p50s, mut p99s) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for run in 0..runs {
            // Fired/s, beside the baseline of scheduling as many.
            let past = Utc::now() - chrono::Duration::hours(1);
            let took =
                schedule_all(timers.clone(), &format!("past{run}"), vec![past; count]).await?;
            board.catch_up().await?;
            let started = Instant::now();
            let done = scheduler.fire_due().await?;
            let firing = started.elapsed().as_secs_f64();
            anyhow::ensure!(done == count, "fired {done} of {count}");
            board.catch_up().await?;
            fired.push(count as f64 / firing);
            scheduled.push(count as f64 / took);
            ratios.push((count as f64 / firing) / (count as f64 / took));

            // Delay: due over the window, while the read model and the scheduler run.
            let after = store.head().await?;
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let running = {
                let (board, stopped) = (board.clone(), stopped.clone());
                tokio::spawn(async move { board.run_until_stopped(stopped).await })
            };
            let firing = {
                let (scheduler, woken) = (scheduler.clone(), board.applied_changes());
                tokio::spawn(async move { scheduler.run_until_stopped(stopped, woken).await })
            };
            let start = Utc::now() + chrono::Duration::seconds(2);
            let step = seconds / count as f64;
            let due: Vec<DateTime<Utc>> = (0..count)
                .map(|n| start + chrono::Duration::microseconds((n as f64 * step * 1e6) as i64))
                .collect();
            schedule_all(timers.clone(), &format!("window{run}"), due).await?;
            let deadline = Instant::now() + std::time::Duration::from_secs_f64(seconds + 60.0);
            let measured = loop {
                let seen = delays(&store, after).await?;
                if seen.len() >= count {
                    break seen;
                }
                anyhow::ensure!(Instant::now() < deadline, "only {} fired", seen.len());
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            };
            stop.send(true)?;
            running.await?;
            firing.await?;
            p50s.push(quantile(&measured, 0.5));
            p99s.push(quantile(&measured, 0.99));
        }
        let millis = |v: f64| format!("{:.0} ms", v * 1000.0);
        println!(
            "| {backend} | {} | {} | {} | {} | {} |",
            spread(&fired, |v| format!("{v:.0}")),
            spread(&scheduled, |v| format!("{v:.0}")),
            spread(&ratios, |v| format!("{v:.2}")),
            spread(&p50s, millis),
            spread(&p99s, millis),
        );
        drop(store);
        drop(db);
        if let Some(name) = pg_name {
            let mut connection = PgConnection::connect(&admin).await?;
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut connection)
                .await?;
        }
    }
    Ok(())
}
