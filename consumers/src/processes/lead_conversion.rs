//! The lead conversion process: on `LeadConverted` it opens the account (when new) and
//! the deal, through the command handlers.
//!
//! Exactly-once effect without a shared transaction: every command carries an
//! idempotency key derived from the causing event's id, so acting on one conversion
//! again (after a crash, or by a straggler) opens nothing twice. Rebuilding read models
//! never re-runs it: a process has no generations.

use std::sync::Arc;

use annals_commands::{CommandError, CommandHandler, Handlers};
use annals_domain::account::Account;
use annals_domain::conversion::{account_to_open, deal_to_open};
use annals_domain::deal::Deal;
use annals_domain::lead::LeadEvent;
use annals_domain::{DomainError, Event, StoredForm};
use annals_store::{LogFilter, RecordedEvent};
use async_trait::async_trait;

use annals_engine::{ActionError, Process};

use super::{action_error, caused_by};

/// The process's name: its checkpoint's key and the actor of its commands.
pub const NAME: &str = "lead_conversion";

#[derive(Debug)]
pub struct LeadConversion {
    accounts: Arc<CommandHandler<Account>>,
    deals: Arc<CommandHandler<Deal>>,
}

impl LeadConversion {
    pub fn new(handlers: &Handlers) -> Self {
        LeadConversion {
            accounts: handlers.of::<Account>(),
            deals: handlers.of::<Deal>(),
        }
    }

    /// Acts on one event it follows.
    async fn act(&self, recorded: &RecordedEvent) -> Result<(), CommandError> {
        let event = LeadEvent::decode(&StoredForm {
            event_type: recorded.event_type.clone(),
            schema_version: recorded.schema_version,
            data: recorded.data.clone(),
        })?;
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
                .execute(account_id, open, &caused_by(NAME, recorded, "account"))
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
        match self
            .deals
            .execute(deal_id, open, &caused_by(NAME, recorded, "deal"))
            .await
        {
            Ok(_) | Err(CommandError::Domain(DomainError::DealExists(_))) => Ok(()),
            // The business refuses the deal (its account is gone): nothing to retry.
            Err(CommandError::Domain(refusal)) => {
                tracing::warn!(
                    process = NAME,
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

#[async_trait]
impl Process for LeadConversion {
    fn name(&self) -> &'static str {
        NAME
    }

    fn filter(&self) -> LogFilter {
        LogFilter::event_types(["LeadConverted"])
    }

    async fn handle(&self, recorded: &RecordedEvent) -> Result<(), ActionError> {
        self.act(recorded).await.map_err(action_error)
    }
}
