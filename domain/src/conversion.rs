//! The lead-conversion process, as decisions: what a `LeadConverted` leads to. Opening
//! the account (when the conversion named no existing one) and the deal is business
//! logic, so it lives here; carrying it out (following the log, issuing the commands
//! idempotently) is the command layer's.

use crate::account::AccountCommand;
use crate::deal::DealCommand;
use crate::lead::LeadEvent;
use crate::values::Tier;

/// The account a conversion opens, when it opens one.
pub fn account_to_open(event: &LeadEvent) -> Option<AccountCommand> {
    match event {
        LeadEvent::LeadConverted {
            account_id,
            account_name: Some(name),
            ..
        } => Some(AccountCommand::Open {
            account_id: *account_id,
            name: name.clone(),
            domain: None,
            industry: None,
            employees: None,
            tier: Tier::Standard,
        }),
        _ => None,
    }
}

/// The deal a conversion opens; `account_exists` is the fact the deal's rule needs.
pub fn deal_to_open(event: &LeadEvent, account_exists: bool) -> Option<DealCommand> {
    match event {
        LeadEvent::LeadConverted {
            account_id,
            deal_id,
            deal_name,
            amount,
            ..
        } => Some(DealCommand::Open {
            deal_id: *deal_id,
            account_id: *account_id,
            account_exists,
            name: deal_name.clone(),
            amount: amount.clone(),
            owner: None,
            expected_close: None,
        }),
        _ => None,
    }
}
