//! Lead conversion, the command's answer (`CommandHandler::<Lead>::convert`): what the
//! lead was converted into. The process that then opens the account and the deal is a
//! consumer of the log (`annals_projections::lead_conversion`).

use annals_domain::lead::{Lead, LeadCommand, LeadEvent};
use annals_store::Direction;
use uuid::Uuid;

use crate::{CommandContext, CommandError, CommandHandler, CommandOutcome};

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
