//! Lead conversion: the command's answer (`CommandHandler::<Lead>::convert`), and the
//! process that follows the log for `LeadConverted` and opens the account (when new)
//! and the deal through the command handlers.
//!
//! Exactly-once effect without a shared transaction: every command carries an
//! idempotency key derived from the causing event's id, so a crash anywhere, or a replay
//! of the log, opens nothing twice. The checkpoint is the process's own (a store
//! checkpoint, not a projection's): rebuilding read models never re-runs a side effect.

use std::sync::Arc;
use std::time::Duration;

use annals_domain::account::Account;
use annals_domain::conversion::{account_to_open, deal_to_open};
use annals_domain::deal::Deal;
use annals_domain::lead::{Lead, LeadCommand, LeadEvent};
use annals_domain::{DomainError, Event, StoredForm};
use annals_store::{Direction, EventStore, LogFilter, RecordedEvent};
use tokio::sync::watch;
use uuid::Uuid;

use crate::{CommandContext, CommandError, CommandHandler, CommandOutcome, HandlerConfig};

/// What a conversion answers: the command's outcome, and the account and deal the lead
/// was converted into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversion {
    pub outcome: CommandOutcome,
    pub account_id: Option<Uuid>,
    pub deal_id: Option<Uuid>,
}

impl CommandHandler<Lead> {
    /// Converts a lead (`command` is a `LeadCommand::Convert`), answering also what it
    /// was converted into: the ids the first try decided, when this is a retry. (They
    /// are `None` only for a command that converts nothing.)
    pub async fn convert(
        &self,
        id: Uuid,
        command: LeadCommand,
        context: &CommandContext,
    ) -> Result<Conversion, CommandError> {
        let outcome = self.execute(id, command, context).await?;
        // Read from the conversion's own events, never from the cache: when the outcome
        // is a retry's, the first try may have been carried out by another process, and
        // this one's cache may still hold the lead as it was before.
        let stream = Self::stream(id)?;
        let events = self
            .store
            .read_stream(
                &stream,
                outcome.version,
                Direction::Backwards,
                outcome.events.len().max(1),
            )
            .await?;
        let mut conversion = Conversion {
            outcome,
            account_id: None,
            deal_id: None,
        };
        for recorded in events.iter().filter(|e| e.event_type == "LeadConverted") {
            if let LeadEvent::LeadConverted {
                account_id,
                deal_id,
                ..
            } = crate::decode::<Lead>(recorded)?
            {
                conversion.account_id = Some(account_id);
                conversion.deal_id = Some(deal_id);
            }
        }
        Ok(conversion)
    }
}

/// The process's name: its checkpoint's key and the actor of its commands.
pub const LEAD_CONVERSION: &str = "lead_conversion";

#[derive(Debug)]
pub struct LeadConversionProcess {
    store: Arc<dyn EventStore>,
    accounts: CommandHandler<Account>,
    deals: CommandHandler<Deal>,
    batch_size: usize,
}

impl LeadConversionProcess {
    pub fn new(store: Arc<dyn EventStore>, config: HandlerConfig) -> Self {
        LeadConversionProcess {
            accounts: CommandHandler::new(store.clone(), config.clone()),
            deals: CommandHandler::new(store.clone(), config),
            store,
            batch_size: 500,
        }
    }

    /// Handles the conversions after the checkpoint, one batch; returns how many
    /// conversions it handled (0 when caught up).
    pub async fn run_once(&self) -> Result<usize, CommandError> {
        let checkpoint = self.store.load_checkpoint(LEAD_CONVERSION).await?;
        let page = self
            .store
            .read_all(
                checkpoint + 1,
                self.batch_size,
                &LogFilter::event_types(["LeadConverted"]),
            )
            .await?;
        for event in &page.events {
            self.handle(event).await?;
            // Saved after each conversion: a crash repeats at most one, harmlessly.
            self.store
                .save_checkpoint(LEAD_CONVERSION, event.position)
                .await?;
        }
        let next = page.next_position.saturating_sub(1);
        if next > checkpoint {
            self.store.save_checkpoint(LEAD_CONVERSION, next).await?;
        }
        Ok(page.events.len())
    }

    /// Runs until `stop` turns true, woken by new events, backing off after failures.
    pub async fn run_until_stopped(&self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        while !*stop.borrow() {
            match self.run_once().await {
                Ok(0) => {
                    backoff = Duration::from_millis(100);
                    let after = self
                        .store
                        .load_checkpoint(LEAD_CONVERSION)
                        .await
                        .unwrap_or(0);
                    tokio::select! {
                        _ = stop.changed() => {}
                        _ = self.store.wait_for_events(after, Duration::from_secs(5)) => {}
                    }
                }
                Ok(_) => backoff = Duration::from_millis(100),
                Err(error) => {
                    tracing::warn!(process = LEAD_CONVERSION, %error, "conversion failed; retrying");
                    tokio::select! {
                        _ = stop.changed() => {}
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn handle(&self, recorded: &RecordedEvent) -> Result<(), CommandError> {
        let event = LeadEvent::decode(&StoredForm {
            event_type: recorded.event_type.clone(),
            schema_version: recorded.schema_version,
            data: recorded.data.clone(),
        })?;
        let context = |step: &str| CommandContext {
            actor: format!("process:{LEAD_CONVERSION}"),
            correlation_id: recorded.metadata.correlation_id.clone(),
            causation_id: Some(recorded.event_id.to_string()),
            expected_version: None,
            idempotency_key: Some(format!("{}/{step}", recorded.event_id)),
            request_hash: Some(format!("{}/{step}", recorded.event_id)),
        };
        let LeadEvent::LeadConverted {
            account_id,
            deal_id,
            ..
        } = event
        else {
            return Ok(());
        };
        if let Some(open) = account_to_open(&event) {
            match self
                .accounts
                .execute(account_id, open, &context("account"))
                .await
            {
                // Opened before this process's key was recorded (or after it expired).
                Ok(_) | Err(CommandError::Domain(DomainError::AccountExists(_))) => {}
                Err(error) => return Err(error),
            }
        }
        let account_exists = self.accounts.exists(account_id).await?;
        let Some(open) = deal_to_open(&event, account_exists) else {
            return Ok(());
        };
        match self.deals.execute(deal_id, open, &context("deal")).await {
            Ok(_) | Err(CommandError::Domain(DomainError::DealExists(_))) => Ok(()),
            // The business refuses the deal (its account is gone): nothing to retry.
            Err(CommandError::Domain(refusal)) => {
                tracing::warn!(
                    process = LEAD_CONVERSION,
                    position = recorded.position,
                    %refusal,
                    "the converted lead's deal cannot be opened"
                );
                Ok(())
            }
            Err(error) => Err(error),
        }
    }
}
