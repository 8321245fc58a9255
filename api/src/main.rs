//! The `annals` binary: the HTTP server and the operator's command line. Every failure
//! ends in one clear line on stderr and a non-zero exit.

mod cli;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use annals_api::edge::Bounds;
use annals_api::{Settings, System, Tokens};
use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use cli::Database;
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(
    name = "annals",
    version,
    about = "Annals: an event-sourced revenue backend"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP server (applying pending migrations first).
    Serve {
        #[command(flatten)]
        database: Database,
        /// The address to listen on; anonymous access (no ANNALS_API_TOKENS) is allowed
        /// on loopback addresses only.
        #[arg(long, env = "ANNALS_LISTEN", default_value = "127.0.0.1:8080")]
        listen: String,
        /// How long a query waits for `min_position`, in milliseconds.
        #[arg(long, env = "ANNALS_CONSISTENCY_WAIT_MS", default_value_t = 5000)]
        consistency_wait_ms: u64,
        /// How long a request may take (operator jobs under /admin excepted), in
        /// milliseconds.
        #[arg(long, env = "ANNALS_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
        request_timeout_ms: u64,
        /// Host names the server answers to besides its listen address, comma-separated
        /// (`*` for any, behind a proxy that checks them).
        #[arg(long, env = "ANNALS_ALLOWED_HOSTS", value_delimiter = ',')]
        allowed_hosts: Vec<String>,
        /// Browser origins besides the server's own whose pages may change state,
        /// comma-separated (`https://crm.example.com`).
        #[arg(long, env = "ANNALS_ALLOWED_ORIGINS", value_delimiter = ',')]
        allowed_origins: Vec<String>,
        /// How long a client may take to send a request's headers, and how long a
        /// keep-alive connection may stay idle.
        #[arg(long, env = "ANNALS_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = duration)]
        header_read_timeout: Duration,
        /// How many connections may be open at once; more wait to be accepted.
        #[arg(long, env = "ANNALS_MAX_CONNECTIONS", default_value_t = 1024,
              value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        max_connections: u32,
        /// At shutdown, how long requests in flight may take before their connections
        /// are closed.
        #[arg(long, env = "ANNALS_SHUTDOWN_GRACE", default_value = "10s", value_parser = duration)]
        shutdown_grace: Duration,
    },
    /// Apply pending database migrations (creating the SQLite file when missing).
    Migrate {
        #[command(flatten)]
        database: Database,
    },
    #[command(flatten)]
    Operator(cli::Operator),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve { .. });
    init_logs(if serving { "info,sqlx=warn" } else { "warn" });
    match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("annals: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}

/// Human-readable logs on stderr, or JSON lines with `ANNALS_LOG_FORMAT=json`; `RUST_LOG`
/// overrides the level.
fn init_logs(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("ANNALS_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().with_current_span(true).init();
    } else {
        builder.init();
    }
}

/// The error and its causes on one line, leaving out a cause whose text the line already
/// holds (sqlx repeats its source in its own message).
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line.replace('\n', " ")
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve {
            database,
            listen,
            consistency_wait_ms,
            request_timeout_ms,
            allowed_hosts,
            allowed_origins,
            header_read_timeout,
            max_connections,
            shutdown_grace,
        } => {
            let settings = Settings {
                consistency_wait: Duration::from_millis(consistency_wait_ms),
                request_timeout: Duration::from_millis(request_timeout_ms),
                allowed_hosts,
                allowed_origins,
                bounds: Bounds {
                    header_read_timeout,
                    max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
                    shutdown_grace,
                },
            };
            serve(&database.database_url, &listen, settings).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate { database } => {
            let system = System::open(&database.database_url).await?;
            let head = system.store.head().await?;
            println!("migrations applied; the log holds {head} events");
            Ok(ExitCode::SUCCESS)
        }
        Command::Operator(operator) => cli::run(operator).await,
    }
}

async fn serve(database_url: &str, listen: &str, settings: Settings) -> anyhow::Result<()> {
    let address: SocketAddr = listen.parse().with_context(|| {
        format!("--listen {listen:?} is not an address and port like 127.0.0.1:8080")
    })?;
    let tokens = match std::env::var("ANNALS_API_TOKENS") {
        Ok(spec) if !spec.trim().is_empty() => Tokens::parse(&spec)?,
        _ => Tokens::anonymous(),
    };
    if tokens.is_anonymous() {
        if !address.ip().is_loopback() {
            bail!(
                "refusing to listen on {address} without ANNALS_API_TOKENS: anonymous access \
                 is allowed on loopback addresses only"
            );
        }
        tracing::warn!(
            "ANNALS_API_TOKENS is unset: every request is anonymous and has every role \
             (allowed because the server listens on a loopback address only)"
        );
    }
    let system = Arc::new(
        System::open(database_url)
            .await
            .context("opening the database")?,
    );
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("listening on {address}"))?;
    let local = listener.local_addr()?;
    tracing::info!(
        database = %annals_api::system::redacted(database_url),
        "annals is ready: listening on http://{local}"
    );
    annals_api::serve(listener, system, tokens, settings, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// A duration setting (`500ms`, `10s`, `5m`).
fn duration(text: &str) -> Result<Duration, String> {
    annals_api::system::duration(text)
        .and_then(|d| d.to_std().ok())
        .ok_or_else(|| {
            "a whole number and a unit, ms, s, m, h or d (say 10s), more than zero".to_owned()
        })
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("interrupted; shutting down"),
        () = terminate => tracing::info!("terminated; shutting down"),
    }
}
