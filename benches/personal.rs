//! Personal data encrypted (`domain.md`, Erasure): what sealing a lead's email and name
//! costs. On each backend, each workload runs on a fresh database with the plain store
//! and on one with the sealing store (`EncryptedStore`), in the same run; its commands/s,
//! then the lead board rebuilt from position 0 over what it wrote, in events/s:
//!
//! - captures: 16 tasks capture new leads (each capture seals two fields under a new
//!   data key, stored by its append); the rebuild's worst case, where every event is a
//!   new lead's (its key read, unwrapped, two fields decrypted);
//! - leads' lives: 16 tasks each capture a lead, then record four signals on it (each
//!   signal's command reads the lead's stream, so opens its capture).
//!
//! `cargo bench -p annals-benches --bench personal` (PostgreSQL at
//! `ANNALS_TEST_DATABASE_URL`); `ANNALS_BENCH_SECONDS` (default 5) and
//! `ANNALS_BENCH_RUNS` (default 3); `ANNALS_BENCH_ONLY=sqlite|postgresql` and
//! `ANNALS_BENCH_WORKLOAD=<start of a workload name>` narrow the run. The target is ≥ 0.8× the plain store on both.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use annals_api::system::personal_fields;
use annals_commands::{CommandContext, CommandHandler, HandlerConfig};
use annals_consumers::read_models::lead_board::LeadBoard;
use annals_domain::lead::{Lead, LeadCommand};
use annals_domain::values::{Email, PersonName, SignalKind, Source};
use annals_engine::{Consumer, ConsumerRunner, ReadDatabase};
use annals_store::vault::MasterKey;
use annals_store::{Backend, StoreConfig};
use uuid::Uuid;

// Shared with the other benches, which use the rest of it.
#[allow(dead_code)]
mod support;
use support::{drop_pg_database, fresh_pg_database, spread};

const TASKS: u64 = 16;

/// One run's (commands/s, rebuild events/s), plain then sealed.
type Figures = ((f64, f64), (f64, f64));

fn context() -> CommandContext {
    CommandContext {
        actor: "bench".into(),
        ..CommandContext::default()
    }
}

/// What each task does, over and over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// Capture a new lead.
    Captures,
    /// Capture a new lead, then record four signals on it.
    Lives,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Captures => "captures",
            Workload::Lives => "leads' lives (capture + 4 signals)",
        }
    }
}

/// Runs `workload` from `TASKS` tasks for `seconds`; commands per second.
async fn command_rate(backend: &Backend, workload: Workload, seconds: f64) -> anyhow::Result<f64> {
    let handler = Arc::new(CommandHandler::<Lead>::new(
        backend.event_store(),
        HandlerConfig::default(),
    ));
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let (handler, done) = (handler.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0_u64;
            while Instant::now() < deadline {
                let id = Uuid::now_v7();
                let command = LeadCommand::Capture {
                    lead_id: id,
                    email: Email::parse(&format!("lead.{task}.{n}@bench.example"))?,
                    name: PersonName::parse(&format!("Ada Lovelace {task} {n}"))?,
                    company: None,
                    source: Source::Web,
                };
                handler.execute(id, command, &context()).await?;
                done.fetch_add(1, Ordering::Relaxed);
                if workload == Workload::Lives {
                    for kind in SignalKind::ALL.iter().cycle().take(4) {
                        let signal = LeadCommand::RecordSignal {
                            kind: *kind,
                            occurred_at: None,
                        };
                        handler.execute(id, signal, &context()).await?;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                n += 1;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// The lead board rebuilt from position 0; events read per second.
async fn rebuild_rate(backend: &Backend) -> anyhow::Result<f64> {
    let store = backend.event_store();
    let head = store.head().await?;
    let runner = ConsumerRunner::new(
        store,
        ReadDatabase::of(backend),
        Consumer::ReadModel(Arc::new(LeadBoard)),
    );
    runner.register().await?;
    let started = Instant::now();
    runner.rebuild().await?;
    Ok(head as f64 / started.elapsed().as_secs_f64())
}

/// One configuration on a fresh database: the workload, then the rebuild.
async fn measure(
    url: &str,
    sealed: bool,
    workload: Workload,
    seconds: f64,
) -> anyhow::Result<(f64, f64)> {
    let mut backend = annals_store::open(url, StoreConfig::default()).await?;
    if sealed {
        backend = backend
            .with_personal_data(&MasterKey::generate(), personal_fields())
            .await?;
    }
    let commands = command_rate(&backend, workload, seconds).await?;
    let rebuild = rebuild_rate(&backend).await?;
    Ok((commands, rebuild))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let admin = std::env::var("ANNALS_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let seconds: f64 = std::env::var("ANNALS_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let runs: usize = std::env::var("ANNALS_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);

    println!(
        "Commands from {TASKS} tasks for {seconds} s, then the lead board rebuilt; \
         {runs} runs, each on fresh databases (median, min–max):\n"
    );
    println!(
        "| backend | workload | commands/s plain | commands/s sealed | ratio | rebuild events/s plain | rebuild events/s sealed | ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let only = std::env::var("ANNALS_BENCH_ONLY").unwrap_or_default();
    let workloads = std::env::var("ANNALS_BENCH_WORKLOAD").unwrap_or_default();
    for backend in ["SQLite", "PostgreSQL"] {
        if !only.is_empty() && !backend.eq_ignore_ascii_case(&only) {
            continue;
        }
        for workload in [Workload::Captures, Workload::Lives] {
            if !workload.name().starts_with(&workloads) {
                continue;
            }
            let mut figures = Vec::new();
            for run in 1..=runs {
                let mut pair = Vec::new();
                for sealed in [false, true] {
                    let dir = tempfile::tempdir()?;
                    let (url, database) = if backend == "SQLite" {
                        (
                            format!("sqlite://{}", dir.path().join("bench.db").display()),
                            None,
                        )
                    } else {
                        let (url, name) = fresh_pg_database(&admin, "personal").await?;
                        (url, Some(name))
                    };
                    pair.push(measure(&url, sealed, workload, seconds).await?);
                    if let Some(name) = database {
                        drop_pg_database(&admin, &name).await?;
                    }
                }
                eprintln!(
                    "{backend} {} run {run}/{runs}: commands {:.0} / {:.0}, rebuild {:.0} / {:.0}",
                    workload.name(),
                    pair[0].0,
                    pair[1].0,
                    pair[0].1,
                    pair[1].1
                );
                figures.push((pair[0], pair[1]));
            }
            let column = |f: fn(&Figures) -> f64| -> Vec<f64> { figures.iter().map(f).collect() };
            let whole = |v: f64| format!("{v:.0}");
            let ratio = |v: f64| format!("{v:.2}×");
            println!(
                "| {backend} | {} | {} | {} | {} | {} | {} | {} |",
                workload.name(),
                spread(&column(|f| f.0.0), whole),
                spread(&column(|f| f.1.0), whole),
                spread(&column(|f| f.1.0 / f.0.0), ratio),
                spread(&column(|f| f.0.1), whole),
                spread(&column(|f| f.1.1), whole),
                spread(&column(|f| f.1.1 / f.0.1), ratio),
            );
        }
    }
    Ok(())
}
