//! The operator's commands: replay and verify projections (with progress bars), audit
//! the hash chains, read or tail the log, list, retry or skip the events a consumer
//! parked, erase a lead or print what is held about one, the master key's life, and
//! fill a store with a demo history.

mod demo;
mod personal;

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use annals_api::System;
use annals_engine::{ConsumerRunner, DifferenceKind};
use annals_store::{Direction, LogFilter, RecordedEvent, StreamName};
use anyhow::{Context, bail};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

/// The database every command works on.
#[derive(Debug, clap::Args)]
pub struct Database {
    /// `sqlite://annals.db` (the embedded default, created when missing) or
    /// `postgres://…`.
    // The URL may hold a password: `--help` never shows the variable's value.
    #[arg(
        long,
        env = "ANNALS_DATABASE_URL",
        default_value = "sqlite://annals.db",
        hide_env_values = true
    )]
    pub database_url: String,
}

impl Database {
    async fn open(&self) -> anyhow::Result<System> {
        System::open(&self.database_url)
            .await
            .context("opening the database")
    }
}

#[derive(Debug, Subcommand)]
pub enum Operator {
    /// Rebuild read models from position 0 beside the live ones and swap them in.
    Replay {
        #[command(flatten)]
        database: Database,
        /// Only this projection (all of them otherwise).
        #[arg(long)]
        projection: Option<String>,
    },
    /// Rebuild read models in a scratch space and compare them with the live rows; exits
    /// 1 when any differs.
    Verify {
        #[command(flatten)]
        database: Database,
        /// Only this projection (all of them otherwise).
        #[arg(long)]
        projection: Option<String>,
    },
    /// The audit of the log's hash chains.
    Audit {
        #[command(subcommand)]
        action: Audit,
    },
    /// Print the log (or one stream), and with --follow keep printing new events.
    Events {
        #[command(flatten)]
        database: Database,
        /// The first position to print (the first version with --stream).
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Keep printing events as they are appended, until Ctrl-C.
        #[arg(long)]
        follow: bool,
        /// Only this stream (`lead-<id>`, …).
        #[arg(long)]
        stream: Option<String>,
        /// One JSON object per line instead of columns.
        #[arg(long)]
        json: bool,
    },
    /// The events a consumer of the log parked: list them, retry or skip one.
    Parked {
        #[command(subcommand)]
        action: Parked,
    },
    /// A lead's personal data: erase it, or print everything held about the person.
    Lead {
        #[command(subcommand)]
        action: personal::LeadData,
    },
    /// The master key: make one, rotate it, report what an older build stored in clear.
    Keys {
        #[command(subcommand)]
        action: personal::Keys,
    },
    /// Fill the store, through the command layer, with a reproducible revenue history.
    Demo {
        #[command(flatten)]
        database: Database,
        /// How many leads to capture.
        #[arg(long, default_value_t = 200)]
        leads: usize,
        /// The random seed: the same seed gives the same history.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum Parked {
    /// The consumer's parked events, oldest first, with their errors.
    List {
        #[command(flatten)]
        database: Database,
        /// The consumer (`lead_board`, `deal_board`, `account_360`).
        #[arg(long)]
        consumer: String,
    },
    /// Apply one parked event now, in its place in the log; exits 1 when it fails again.
    Retry {
        #[command(flatten)]
        database: Database,
        #[arg(long)]
        consumer: String,
        /// The parked event's position in the log.
        #[arg(long)]
        position: u64,
    },
    /// Leave one parked event unapplied for good (recorded with the actor and the time).
    Skip {
        #[command(flatten)]
        database: Database,
        #[arg(long)]
        consumer: String,
        #[arg(long)]
        position: u64,
        /// Who skips it, for the record.
        #[arg(long, env = "USER", default_value = "cli")]
        actor: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum Audit {
    /// Check every stream's hash chain and the whole log's from the stored rows; exits 1
    /// on a broken link, or when the log no longer holds the --anchor given.
    Verify {
        #[command(flatten)]
        database: Database,
        /// A log hash printed by `audit anchor` earlier: the log must still hold it. This
        /// is what shows a rewrite by someone who recomputed every hash.
        #[arg(long, value_name = "HASH")]
        anchor: Option<String>,
    },
    /// Print the log's head as `<hash> <position>`: keep the hash somewhere the
    /// database's writers cannot reach, and give it to `audit verify --anchor` later.
    Anchor {
        #[command(flatten)]
        database: Database,
    },
}

pub async fn run(command: Operator) -> anyhow::Result<ExitCode> {
    match command {
        Operator::Replay {
            database,
            projection,
        } => replay(database, projection).await,
        Operator::Verify {
            database,
            projection,
        } => verify(database, projection).await,
        Operator::Audit {
            action: Audit::Verify { database, anchor },
        } => audit_verify(database, anchor).await,
        Operator::Audit {
            action: Audit::Anchor { database },
        } => {
            let system = database.open().await?;
            let anchor = system.store.anchor().await?;
            println!("{} {}", anchor.hash, anchor.position);
            Ok(ExitCode::SUCCESS)
        }
        Operator::Events {
            database,
            from,
            follow,
            stream,
            json,
        } => {
            let system = database.open().await?;
            events(&system, from, follow, stream, json).await?;
            Ok(ExitCode::SUCCESS)
        }
        Operator::Parked { action } => parked(action).await,
        Operator::Lead { action } => personal::lead(action).await,
        Operator::Keys { action } => personal::keys(action).await,
        Operator::Demo {
            database,
            leads,
            seed,
        } => {
            // The demo runs the consumers and the timer scheduler as a server does: each
            // under its lease, on the real clock. Beside a running server, that server
            // holds the leases, and the demo waits for its consumers instead.
            let system = Arc::new(database.open().await?);
            let background = system.start();
            let told = demo::run(&system, leads, seed).await;
            // The leases are given back, so a server standing by takes them at once.
            background.stop().await;
            told?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `replay`: each chosen projection rebuilt from position 0 and swapped in.
async fn replay(database: Database, projection: Option<String>) -> anyhow::Result<ExitCode> {
    let system = database.open().await?;
    for runner in chosen(&system, projection.as_deref())? {
        let head = system.store.head().await?;
        let bar = progress(&runner, head, "replaying");
        with_progress(&runner, &bar, runner.rebuild()).await?;
        bar.finish_and_clear();
        // On stdout, as verify reports: the bar is drawn only on a terminal.
        println!(
            "{}: rebuilt from position 0 to {}, now live",
            runner.name(),
            runner.checkpoint().await?
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `verify`: each chosen projection compared with a rebuild; fails when one differs.
async fn verify(database: Database, projection: Option<String>) -> anyhow::Result<ExitCode> {
    let system = database.open().await?;
    let mut all_equal = true;
    for runner in chosen(&system, projection.as_deref())? {
        let head = system.store.head().await?;
        let bar = progress(&runner, head, "verifying");
        let report = with_progress(&runner, &bar, runner.verify()).await?;
        bar.finish_and_clear();
        if report.equal {
            println!(
                "{}: equal to a rebuild at position {}",
                runner.name(),
                report.position
            );
        } else {
            all_equal = false;
            println!(
                "{}: DIFFERS from a rebuild at position {}; first differences:",
                runner.name(),
                report.position
            );
            for d in &report.differences {
                let value = |v: &Option<String>| v.as_deref().unwrap_or("NULL").to_owned();
                match d.kind {
                    DifferenceKind::Missing => {
                        println!("  {} {}: missing from the live rows", d.table, d.key)
                    }
                    DifferenceKind::Extra => {
                        println!(
                            "  {} {}: in the live rows, not in a rebuild",
                            d.table, d.key
                        )
                    }
                    DifferenceKind::Changed => println!(
                        "  {} {}: {} is {} live, {} rebuilt",
                        d.table,
                        d.key,
                        d.column.as_deref().unwrap_or("?"),
                        value(&d.live),
                        value(&d.rebuilt)
                    ),
                }
            }
        }
    }
    Ok(exit(all_equal))
}

/// `audit verify`: the hash chains walked, and the anchor looked for when given.
async fn audit_verify(database: Database, anchor: Option<String>) -> anyhow::Result<ExitCode> {
    let anchor = anchor.map(|a| a.trim().to_ascii_lowercase());
    if let Some(anchor) = &anchor
        && (anchor.len() != 64 || !anchor.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        bail!("--anchor takes the 64 hex digits `annals audit anchor` printed");
    }
    let system = database.open().await?;
    let spinner = ProgressBar::new_spinner().with_message("walking the hash chains");
    spinner.enable_steady_tick(Duration::from_millis(120));
    let report = system.store.verify().await?;
    let found = match (&anchor, report.ok()) {
        (Some(anchor), true) => Some(system.store.find_anchor(anchor).await?),
        _ => None,
    };
    spinner.finish_and_clear();
    match &report.first_broken_link {
        None => println!(
            "ok: {} streams, {} events, every hash chain intact up to position {}",
            report.streams, report.events, report.head.position
        ),
        Some(link) => println!(
            "BROKEN: stream {} at version {} (position {}): {}; stored hash {}, \
             expected {} ({} streams, {} events checked)",
            link.stream,
            link.version,
            link.position,
            link.reason,
            link.found,
            link.expected,
            report.streams,
            report.events
        ),
    }
    match (anchor, found) {
        (Some(anchor), Some(Some(position))) => {
            println!("anchor {anchor} found at position {position}");
        }
        (Some(anchor), Some(None)) => {
            println!(
                "ANCHOR MISSING: the log no longer holds {anchor}; it was rewritten at \
                 or before the anchor's position since the anchor was taken"
            );
            return Ok(exit(false));
        }
        _ => {}
    }
    Ok(exit(report.ok()))
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn chosen(system: &System, name: Option<&str>) -> anyhow::Result<Vec<Arc<ConsumerRunner>>> {
    match name {
        None => Ok(system.projections().cloned().collect()),
        Some(name) => match system.projection(name) {
            Some(runner) => Ok(vec![runner.clone()]),
            None => bail!(
                "no projection is named {name:?}; there are: {}",
                system.projection_names().join(", ")
            ),
        },
    }
}

fn consumer(system: &System, name: &str) -> anyhow::Result<Arc<ConsumerRunner>> {
    match system.consumer(name) {
        Some(runner) => Ok(runner.clone()),
        None => bail!(
            "no consumer is named {name:?}; there are: {}",
            system.consumer_names().join(", ")
        ),
    }
}

async fn parked(action: Parked) -> anyhow::Result<ExitCode> {
    match action {
        Parked::List {
            database,
            consumer: name,
        } => {
            let system = database.open().await?;
            let runner = consumer(&system, &name)?;
            let parked = runner.parked().await?;
            if parked.is_empty() {
                println!("{name}: no parked events");
            }
            for event in parked {
                println!(
                    "{:>8}  {}  {}  {}  {} attempts  {}",
                    event.position,
                    event.event_id.as_deref().unwrap_or("-"),
                    event.event_type,
                    event.parked_at.as_deref().unwrap_or("-"),
                    event.attempts,
                    event.error
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Parked::Retry {
            database,
            consumer: name,
            position,
        } => {
            let system = database.open().await?;
            let runner = consumer(&system, &name)?;
            runner
                .retry_parked_event(position)
                .await
                .with_context(|| format!("retrying {name}'s event at position {position}"))?;
            println!("{name}: the event at position {position} is applied");
            Ok(ExitCode::SUCCESS)
        }
        Parked::Skip {
            database,
            consumer: name,
            position,
            actor,
        } => {
            let system = database.open().await?;
            let runner = consumer(&system, &name)?;
            let skipped = runner
                .skip_parked_event(position, &actor)
                .await
                .with_context(|| format!("skipping {name}'s event at position {position}"))?;
            println!(
                "{name}: the event at position {position} is skipped by {} at {}",
                skipped.skipped_by.as_deref().unwrap_or(&actor),
                skipped.skipped_at.as_deref().unwrap_or("-")
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn progress(runner: &ConsumerRunner, head: u64, doing: &str) -> ProgressBar {
    let bar = ProgressBar::new(head);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>24} [{bar:32}] {pos}/{len} events  {per_sec}  {eta} left",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(format!("{doing} {}", runner.name()));
    bar
}

/// Drives a rebuild or verify, moving the bar as the runner reports progress.
async fn with_progress<T>(
    runner: &ConsumerRunner,
    bar: &ProgressBar,
    job: impl std::future::Future<Output = Result<T, annals_engine::ConsumerError>>,
) -> anyhow::Result<T> {
    let mut reached = runner.progress();
    tokio::pin!(job);
    loop {
        tokio::select! {
            done = &mut job => {
                bar.set_position(bar.length().unwrap_or(0));
                return done.with_context(|| format!("projection {}", runner.name()));
            }
            changed = reached.changed() => {
                if changed.is_ok() {
                    let position = *reached.borrow_and_update();
                    if position > bar.length().unwrap_or(0) {
                        bar.set_length(position);
                    }
                    bar.set_position(position);
                }
            }
        }
    }
}

/// Prints events from `from`, and with `follow` waits for more until Ctrl-C. A closed
/// stdout (`annals events | head`) ends it quietly.
async fn events(
    system: &System,
    from: u64,
    follow: bool,
    stream: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let stream = stream.map(StreamName::parse).transpose()?;
    let store = &system.store;
    let mut next = from.max(1);
    let mut out = std::io::stdout().lock();
    loop {
        let (batch, after) = match &stream {
            Some(stream) => {
                let events = store
                    .read_stream(stream, next, Direction::Forwards, 500)
                    .await?;
                let after = events.last().map_or(next, |e| e.version + 1);
                (events, after)
            }
            None => {
                let page = store.read_all(next, 500, &LogFilter::all()).await?;
                (page.events, page.next_position)
            }
        };
        for event in &batch {
            let line = if json {
                serde_json::to_string(event)?
            } else {
                columns(event)
            };
            match writeln!(out, "{line}") {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                Err(error) => return Err(error.into()),
            }
        }
        let _ = out.flush();
        next = after;
        if !batch.is_empty() {
            continue;
        }
        if !follow {
            return Ok(());
        }
        let head = store.head().await?;
        tokio::select! {
            waited = store.wait_for_events(head, Duration::from_secs(5)) => { waited?; }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

fn columns(event: &RecordedEvent) -> String {
    format!(
        "{:>8}  {}  {}@{}  {}  {}",
        event.position,
        event
            .recorded_at
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        event.stream,
        event.version,
        event.event_type,
        event.data
    )
}
