//! The operator's commands on personal data (`domain.md`, Erasure): erase a lead, print
//! everything held about one, and the master key's life: make one, rotate it (every data
//! key wrapped anew, no event touched), and report what an older build stored in clear.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use annals_api::ApiError;
use annals_api::routes::leads::personal_data;
use annals_api::system::{master_key, master_key_file};
use annals_commands::{CommandContext, CommandHandler};
use annals_domain::lead::{Lead, LeadCommand};
use annals_store::StoreConfig;
use annals_store::vault::{MasterKey, Vault};
use anyhow::{Context, bail};
use clap::Subcommand;
use uuid::Uuid;

use super::Database;

#[derive(Debug, Subcommand)]
pub enum LeadData {
    /// Erase a lead's personal data: its key is destroyed with `LeadErased`, and its
    /// email and name read as null everywhere from then on.
    Erase {
        #[command(flatten)]
        database: Database,
        #[arg(long)]
        id: Uuid,
        /// Who erases it, for the record.
        #[arg(long, env = "USER", default_value = "cli")]
        actor: String,
    },
    /// Print everything held about the person behind a lead, decrypted, as JSON (the
    /// right of access); exits 1 once the lead is erased.
    PersonalData {
        #[command(flatten)]
        database: Database,
        #[arg(long)]
        id: Uuid,
    },
}

#[derive(Debug, Subcommand)]
pub enum Keys {
    /// Make a new master key: written to --out (readable by its owner only), or printed.
    Generate {
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Wrap every data key anew under the key in --new-key-file; the events are not
    /// touched. Stop the servers first, and start them with the new key after.
    Rotate {
        #[command(flatten)]
        database: Database,
        #[arg(long)]
        new_key_file: PathBuf,
    },
    /// Report the events an older build stored with personal data in clear: they cannot
    /// be rewritten without breaking the hash chain.
    Migrate {
        #[command(flatten)]
        database: Database,
    },
}

pub async fn lead(action: LeadData) -> anyhow::Result<ExitCode> {
    match action {
        LeadData::Erase {
            database,
            id,
            actor,
        } => {
            let system = database.open().await?;
            let context = CommandContext {
                actor,
                ..CommandContext::default()
            };
            let outcome = system
                .handler::<Lead>()
                .execute(id, LeadCommand::Erase {}, &context)
                .await
                .map_err(ApiError::from)
                .with_context(|| format!("erasing lead {id}"))?;
            system.forget_erased(outcome.position).await;
            println!("lead {id}: erased at position {}", outcome.position);
            let in_clear = system
                .personal
                .events_in_clear(&CommandHandler::<Lead>::stream(id)?)
                .await?;
            if in_clear > 0 {
                println!(
                    "{in_clear} of its events were written before personal data was \
                     encrypted: the log keeps their email and name in clear (rewriting them \
                     would break the hash chain); every answer shows them as erased"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        LeadData::PersonalData { database, id } => {
            let system = database.open().await?;
            match personal_data(&system, id).await {
                Ok(document) => {
                    println!("{}", serde_json::to_string_pretty(&document)?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(ApiError::Gone) => {
                    eprintln!("lead {id}: its personal data was erased");
                    Ok(ExitCode::FAILURE)
                }
                Err(error) => Err(error).with_context(|| format!("lead {id}")),
            }
        }
    }
}

pub async fn keys(action: Keys) -> anyhow::Result<ExitCode> {
    match action {
        Keys::Generate { out: None } => {
            println!("{}", MasterKey::generate().to_hex());
            Ok(ExitCode::SUCCESS)
        }
        Keys::Generate { out: Some(file) } => {
            write_key(&file, &MasterKey::generate())?;
            println!("a new master key is in {}", file.display());
            Ok(ExitCode::SUCCESS)
        }
        Keys::Rotate {
            database,
            new_key_file,
        } => rotate(&database.database_url, &new_key_file).await,
        Keys::Migrate { database } => migrate(&database).await,
    }
}

/// Every data key unwrapped with the current master key and wrapped with the new one, in
/// one transaction with the new key's check (no key is stored meanwhile). The key file,
/// when the key comes from one, is written beside the old first and renamed over it only
/// once the database is on the new key.
async fn rotate(url: &str, new_key_file: &Path) -> anyhow::Result<ExitCode> {
    let old = master_key(url)?;
    let new_text = std::fs::read_to_string(new_key_file)
        .with_context(|| format!("reading {}", new_key_file.display()))?;
    let new = MasterKey::from_hex(&new_text)
        .with_context(|| format!("the new key in {}", new_key_file.display()))?;
    if new == old {
        bail!("the new key is the current one");
    }
    let key_file = master_key_file(url);
    let staged = match &key_file {
        Some(file) => Some(stage_key(file, &new)?),
        None => None,
    };
    let backend = annals_store::open(url, StoreConfig::default()).await?;
    let (old_vault, new_vault) = (Vault::new(&old), Vault::new(&new));
    let rotated = backend
        .data_keys()
        .rotate(
            old_vault.check_value(),
            new_vault.check_value(),
            &|subject, wrapped| Ok(new_vault.wrap(subject, &old_vault.unwrap(subject, wrapped)?)),
        )
        .await;
    let rotated = match rotated {
        Ok(rotated) => rotated,
        Err(error) => {
            if let Some(staged) = &staged {
                let _ = std::fs::remove_file(staged);
            }
            return Err(error).context("rotating the master key; nothing was changed");
        }
    };
    println!("{rotated} data keys wrapped with the new master key; no event was touched");
    match (key_file, staged) {
        (Some(file), Some(staged)) => {
            std::fs::rename(&staged, &file).with_context(|| {
                format!(
                    "the database is on the new key, which is in {}; move it over {} by hand",
                    staged.display(),
                    file.display()
                )
            })?;
            if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::File::open(dir)?.sync_all()?;
            }
            println!("the new key replaced the old in {}", file.display());
        }
        _ => println!(
            "start every server with the new key (ANNALS_MASTER_KEY or ANNALS_MASTER_KEY_FILE)"
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// The report on personal data an older build stored in clear. (Its claims become keyed
/// hashes when the store opens, and its snapshots of leads went with a migration.)
async fn migrate(database: &Database) -> anyhow::Result<ExitCode> {
    let system = database.open().await?;
    let clear = system.personal.log_in_clear().await?;
    let mut leads: Vec<&str> = clear.iter().map(|(_, stream)| stream.as_str()).collect();
    leads.sort_unstable();
    leads.dedup();
    if clear.is_empty() {
        println!("every event holds its personal data encrypted: nothing to migrate");
    } else {
        println!(
            "{} events of {} leads hold an email and a name in clear: an older build wrote \
             them before personal data was encrypted. They cannot be rewritten: the hash \
             chains cover what is stored, and `audit verify` would find them broken. \
             Erasing such a lead still shows its data as erased in every answer, and \
             `lead erase` says how many of its events keep it in clear in the log (and \
             in any backup). New events are always encrypted; the older build's email \
             claims are keyed hashes now, and its snapshots of leads are gone.",
            clear.len(),
            leads.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `key` to a file beside `file` (`<file>.new`, replacing a stale one), readable
/// by its owner only and flushed; its path.
fn stage_key(file: &Path, key: &MasterKey) -> anyhow::Result<PathBuf> {
    let mut name = file.as_os_str().to_owned();
    name.push(".new");
    let staged = PathBuf::from(name);
    let _ = std::fs::remove_file(&staged);
    write_key(&staged, key)?;
    Ok(staged)
}

/// Writes a key to a new file, readable by its owner only, flushed.
fn write_key(file: &Path, key: &MasterKey) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut out = options
        .open(file)
        .with_context(|| format!("writing {}", file.display()))?;
    writeln!(out, "{}", key.to_hex())?;
    out.sync_all()?;
    Ok(())
}
