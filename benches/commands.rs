//! Command handling throughput and aggregate load time, beside cqrs-es with postgres-es.
//!
//! `cargo bench -p annals-benches --bench commands` (PostgreSQL at
//! `ANNALS_TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`).
//! `ANNALS_BENCH_SECONDS` (default 5) sets the length of a throughput run,
//! `ANNALS_BENCH_RUNS` (default 3) how many runs, each on fresh databases.
//!
//! Throughput: 1,000 leads, then 16 tasks send `RecordSignal` to leads picked by a
//! seeded generator, for a fixed time; commands/s and latency percentiles. The peer runs
//! the same workload with a lead-scoring aggregate written the same way, through
//! cqrs-es's `CqrsFramework` on postgres-es, on the same PostgreSQL server (in a
//! database of its own with the schema postgres-es publishes), once with its plain event
//! store and once with its snapshot store.
//!
//! Load time: one lead with 10, 1,000 and 10,000 events; Annals's handler cold (a new
//! handler: latest snapshot plus the events after it) and warm (cached), beside a plain
//! replay of every event.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use annals_commands::{CommandContext, CommandError, CommandHandler, HandlerConfig};
use annals_domain::lead::{Lead, LeadCommand};
use annals_domain::values::{Email, PersonName, SignalKind, Source};
use annals_store::{EventStore, PostgresStore, SqliteStore, StoreConfig};
use uuid::Uuid;

mod support;
use support::{Seeded, drop_pg_database, fresh_pg_database, percentile, spread};

const LEADS: usize = 1_000;
const TASKS: usize = 16;

fn signal_kind(random: &mut Seeded) -> SignalKind {
    SignalKind::ALL[random.below(SignalKind::ALL.len())]
}

struct Rate {
    per_second: f64,
    p50: Duration,
    p99: Duration,
    failed: u64,
}

/// Runs `TASKS` loops of `op(task, lead index, kind)` for `seconds` and measures them.
async fn run_load<F, Fut>(seconds: f64, op: F) -> anyhow::Result<Rate>
where
    F: Fn(usize, SignalKind) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<bool>> + Send,
{
    let op = Arc::new(op);
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let op = op.clone();
        let failed = failed.clone();
        tasks.push(tokio::spawn(async move {
            let mut random = Seeded(0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1));
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let lead = random.below(LEADS);
                let kind = signal_kind(&mut random);
                let start = Instant::now();
                if op(lead, kind).await? {
                    latencies.push(start.elapsed());
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    Ok(Rate {
        per_second: latencies.len() as f64 / elapsed,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        failed: failed.load(Ordering::Relaxed),
    })
}

fn capture(id: Uuid, i: usize) -> anyhow::Result<LeadCommand> {
    Ok(LeadCommand::Capture {
        lead_id: id,
        email: Email::parse(&format!("lead{i}@example.com"))?,
        name: PersonName::parse("Ada Lovelace")?,
        company: None,
        source: Source::Web,
    })
}

fn context() -> CommandContext {
    CommandContext {
        actor: "bench".into(),
        ..CommandContext::default()
    }
}

async fn annals_rate(store: Arc<dyn EventStore>, seconds: f64) -> anyhow::Result<Rate> {
    let handler = Arc::new(CommandHandler::<Lead>::new(store, HandlerConfig::default()));
    let ids: Arc<Vec<Uuid>> = Arc::new((0..LEADS).map(|_| Uuid::now_v7()).collect());
    for (i, id) in ids.iter().enumerate() {
        handler.execute(*id, capture(*id, i)?, &context()).await?;
    }
    run_load(seconds, move |lead, kind| {
        let handler = handler.clone();
        let id = ids[lead];
        async move {
            let command = LeadCommand::RecordSignal {
                kind,
                occurred_at: None,
            };
            match handler.execute(id, command, &context()).await {
                Ok(_) => Ok(true),
                Err(CommandError::ConcurrencyConflict { .. }) => Ok(false),
                Err(error) => Err(error.into()),
            }
        }
    })
    .await
}

/// The same lead-scoring aggregate, written for cqrs-es.
mod peer {
    use cqrs_es::event_sink::EventSink;
    use cqrs_es::{Aggregate, DomainEvent};
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Default, Serialize, Deserialize)]
    pub struct LeadScore {
        captured: bool,
        score: u32,
        qualified: bool,
    }

    #[derive(Debug)]
    pub enum ScoreCommand {
        Capture { email: String, name: String },
        RecordSignal { points: u32 },
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub enum ScoreEvent {
        LeadCaptured { email: String, name: String },
        SignalRecorded { points: u32 },
        LeadQualified { score: u32 },
    }

    impl DomainEvent for ScoreEvent {
        fn event_type(&self) -> String {
            match self {
                ScoreEvent::LeadCaptured { .. } => "LeadCaptured".into(),
                ScoreEvent::SignalRecorded { .. } => "SignalRecorded".into(),
                ScoreEvent::LeadQualified { .. } => "LeadQualified".into(),
            }
        }

        fn event_version(&self) -> String {
            "1".into()
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    pub struct ScoreError(&'static str);

    impl Aggregate for LeadScore {
        const TYPE: &'static str = "lead";
        type Command = ScoreCommand;
        type Event = ScoreEvent;
        type Error = ScoreError;
        type Services = ();

        async fn handle(
            &mut self,
            command: ScoreCommand,
            _services: &(),
            sink: &EventSink<Self>,
        ) -> Result<(), ScoreError> {
            match command {
                ScoreCommand::Capture { email, name } => {
                    if self.captured {
                        return Err(ScoreError("lead exists"));
                    }
                    sink.write(ScoreEvent::LeadCaptured { email, name }, self)
                        .await;
                }
                ScoreCommand::RecordSignal { points } => {
                    if !self.captured {
                        return Err(ScoreError("no such lead"));
                    }
                    let score = self.score + points;
                    let qualifies = !self.qualified && score >= 50;
                    sink.write(ScoreEvent::SignalRecorded { points }, self)
                        .await;
                    if qualifies {
                        sink.write(ScoreEvent::LeadQualified { score }, self).await;
                    }
                }
            }
            Ok(())
        }

        fn apply(&mut self, event: ScoreEvent) {
            match event {
                ScoreEvent::LeadCaptured { .. } => self.captured = true,
                ScoreEvent::SignalRecorded { points } => self.score += points,
                ScoreEvent::LeadQualified { .. } => self.qualified = true,
            }
        }
    }
}

const PEER_SCHEMA: &str = "
CREATE TABLE events (
    aggregate_type text NOT NULL, aggregate_id text NOT NULL,
    sequence bigint CHECK (sequence >= 0) NOT NULL, event_type text NOT NULL,
    event_version text NOT NULL, payload json NOT NULL, metadata json NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence));
CREATE TABLE snapshots (
    aggregate_type text NOT NULL, aggregate_id text NOT NULL,
    last_sequence bigint CHECK (last_sequence >= 0) NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload json NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence));";

async fn peer_rate(url: &str, snapshots: bool, seconds: f64) -> anyhow::Result<Rate> {
    use cqrs_es::AggregateError;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(TASKS as u32)
        .connect(url)
        .await?;
    sqlx::raw_sql(PEER_SCHEMA).execute(&pool).await?;
    let cqrs = Arc::new(if snapshots {
        postgres_es::postgres_snapshot_cqrs::<peer::LeadScore>(pool, vec![], 100, ())
    } else {
        postgres_es::postgres_cqrs::<peer::LeadScore>(pool, vec![], ())
    });
    let ids: Arc<Vec<String>> = Arc::new((0..LEADS).map(|_| Uuid::now_v7().to_string()).collect());
    for (i, id) in ids.iter().enumerate() {
        let command = peer::ScoreCommand::Capture {
            email: format!("lead{i}@example.com"),
            name: "Ada Lovelace".into(),
        };
        cqrs.execute(id, command)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    run_load(seconds, move |lead, kind| {
        let cqrs = cqrs.clone();
        let ids = ids.clone();
        async move {
            // Retried on a conflict like Annals's handler does (up to 5 attempts).
            for _ in 0..5 {
                let command = peer::ScoreCommand::RecordSignal {
                    points: kind.points(),
                };
                match cqrs.execute(&ids[lead], command).await {
                    Ok(()) => return Ok(true),
                    Err(AggregateError::AggregateConflict) => continue,
                    Err(error) => return Err(anyhow::anyhow!("{error}")),
                }
            }
            Ok(false)
        }
    })
    .await
}

struct LoadTimes {
    events: usize,
    cold: Duration,
    warm: Duration,
    replay: Duration,
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

async fn load_times(store: Arc<dyn EventStore>) -> anyhow::Result<Vec<LoadTimes>> {
    let mut results = Vec::new();
    for events in [10usize, 1_000, 10_000] {
        let writer = CommandHandler::<Lead>::new(store.clone(), HandlerConfig::default());
        let id = Uuid::now_v7();
        writer
            .execute(id, capture(id, 1_000_000 + events)?, &context())
            .await?;
        let mut version = 1;
        while version < events as u64 {
            let command = LeadCommand::RecordSignal {
                kind: SignalKind::PageView,
                occurred_at: None,
            };
            version = writer.execute(id, command, &context()).await?.version;
        }
        let mut cold = Vec::new();
        let mut warm = Vec::new();
        let mut replay = Vec::new();
        let warm_handler = CommandHandler::<Lead>::new(store.clone(), HandlerConfig::default());
        warm_handler.load(id).await?;
        for _ in 0..9 {
            let handler = CommandHandler::<Lead>::new(store.clone(), HandlerConfig::default());
            let start = Instant::now();
            let loaded = handler.load(id).await?;
            cold.push(start.elapsed());
            anyhow::ensure!(loaded.version == version, "cold load saw the whole stream");

            let start = Instant::now();
            warm_handler.load(id).await?;
            warm.push(start.elapsed());

            let start = Instant::now();
            let loaded = handler.load_as_of(id, None, None).await?;
            replay.push(start.elapsed());
            anyhow::ensure!(loaded.version == version, "replay saw the whole stream");
        }
        results.push(LoadTimes {
            events: version as usize,
            cold: median(cold),
            warm: median(warm),
            replay: median(replay),
        });
    }
    Ok(results)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
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

    // Every run starts from fresh databases, so runs do not inherit each other's logs.
    let names = [
        "Annals, PostgreSQL",
        "Annals, SQLite",
        "cqrs-es + postgres-es (event store)",
        "cqrs-es + postgres-es (snapshot store, every 100)",
    ];
    let mut runs_rates: Vec<[Rate; 4]> = Vec::new();
    for run in 1..=runs {
        let (_dir, sqlite, postgres, pg_name) = fresh_stores(&admin).await?;
        let (peer_url, peer_name) = fresh_pg_database(&admin, "peer").await?;
        let (peer_snap_url, peer_snap_name) = fresh_pg_database(&admin, "peersnap").await?;
        let ours_pg = annals_rate(postgres.clone(), seconds).await?;
        let peer = peer_rate(&peer_url, false, seconds).await?;
        let peer_snap = peer_rate(&peer_snap_url, true, seconds).await?;
        let ours_sqlite = annals_rate(sqlite, seconds).await?;
        eprintln!(
            "run {run}/{runs}: {:.0} / {:.0} / {:.0} / {:.0} commands/s",
            ours_pg.per_second, ours_sqlite.per_second, peer.per_second, peer_snap.per_second
        );
        runs_rates.push([ours_pg, ours_sqlite, peer, peer_snap]);
        drop(postgres);
        for name in [pg_name, peer_name, peer_snap_name] {
            drop_pg_database(&admin, &name).await?;
        }
    }

    println!(
        "RecordSignal on {LEADS} leads from {TASKS} tasks, {seconds} s each, {runs} runs \
         (median, min–max):\n"
    );
    println!("| system | commands/s | p50 | p99 | gave up |");
    println!("|---|---|---|---|---|");
    for (i, name) in names.iter().enumerate() {
        let rates: Vec<f64> = runs_rates.iter().map(|r| r[i].per_second).collect();
        let p50s: Vec<f64> = runs_rates.iter().map(|r| r[i].p50.as_secs_f64()).collect();
        let p99s: Vec<f64> = runs_rates.iter().map(|r| r[i].p99.as_secs_f64()).collect();
        let gave_up: u64 = runs_rates.iter().map(|r| r[i].failed).sum();
        println!(
            "| {name} | {} | {} | {} | {gave_up} |",
            spread(&rates, |v| format!("{v:.0}")),
            spread(&p50s, |v| format!("{:.2} ms", v * 1000.0)),
            spread(&p99s, |v| format!("{:.2} ms", v * 1000.0)),
        );
    }
    let ratios: Vec<f64> = runs_rates
        .iter()
        .map(|r| r[0].per_second / r[2].per_second.max(r[3].per_second))
        .collect();
    println!(
        "\nAnnals on PostgreSQL ÷ the better cqrs-es configuration, per run: {} (target ≥ 10×)\n",
        spread(&ratios, |v| format!("{v:.1}×"))
    );

    let (_dir, sqlite, postgres, pg_name) = fresh_stores(&admin).await?;
    println!(
        "| backend | events in the stream | cold load (snapshot + tail) | warm load (cache) | plain replay |"
    );
    println!("|---|---|---|---|---|");
    for (name, store) in [("PostgreSQL", postgres.clone()), ("SQLite", sqlite.clone())] {
        for t in load_times(store).await? {
            println!(
                "| {name} | {} | {} | {} | {} |",
                t.events,
                ms(t.cold),
                ms(t.warm),
                ms(t.replay)
            );
        }
    }

    drop(postgres);
    drop_pg_database(&admin, &pg_name).await?;
    Ok(())
}

/// A fresh SQLite store (in the returned directory) and a fresh PostgreSQL one (in the
/// named database, for the caller to drop).
async fn fresh_stores(
    admin: &str,
) -> anyhow::Result<(
    tempfile::TempDir,
    Arc<dyn EventStore>,
    Arc<dyn EventStore>,
    String,
)> {
    let dir = tempfile::tempdir()?;
    let sqlite_url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let sqlite: Arc<dyn EventStore> =
        Arc::new(SqliteStore::open(&sqlite_url, StoreConfig::default()).await?);
    let (pg_url, pg_name) = fresh_pg_database(admin, "ours").await?;
    let postgres: Arc<dyn EventStore> =
        Arc::new(PostgresStore::open(&pg_url, StoreConfig::default()).await?);
    Ok((dir, sqlite, postgres, pg_name))
}
