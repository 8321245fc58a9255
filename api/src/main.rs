//! The `annals` binary: the operator's command line (and, with the API issue, the HTTP
//! server). Every failure ends in one clear line on stderr and a non-zero exit.

use std::process::ExitCode;

use annals_store::StoreConfig;
use clap::{Parser, Subcommand};

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
    /// Apply pending database migrations (creating the SQLite file when missing).
    Migrate {
        /// `sqlite://annals.db` (the embedded default) or `postgres://…`.
        #[arg(
            long,
            env = "ANNALS_DATABASE_URL",
            default_value = "sqlite://annals.db"
        )]
        database_url: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("annals: {}", one_line(&error));
            ExitCode::FAILURE
        }
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

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Migrate { database_url } => {
            let store = annals_store::open(&database_url, StoreConfig::default()).await?;
            let head = store.head().await?;
            println!("migrations applied; the log holds {head} events");
            Ok(())
        }
    }
}
