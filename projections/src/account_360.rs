//! `account_360`'s own rows: one per account with its profile (`domain.md`, read
//! models). The account's deals, won amounts and converted leads are read from the deal
//! and lead boards beside it.

use annals_domain::account::AccountEvent;
use annals_store::{LogFilter, RecordedEvent};

use crate::rows::{RowModel, row};
use crate::{ProjectionError, aggregate_id, decode, sql_int, time_text};

/// The projection's name, and its table's.
pub const NAME: &str = "account_360";

#[derive(Debug, Default)]
pub struct Account360;

row! {
    /// A row of `account_360`.
    pub struct AccountRow in table NAME, keyed by account_id {
        pub account_id: String,
        pub name: String,
        pub domain: Option<String>,
        pub industry: Option<String>,
        pub employees: Option<i64>,
        pub tier: String,
        pub opened_at: String,
        pub updated_position: i64,
    }
}

impl RowModel for Account360 {
    type Row = AccountRow;

    const NAME: &'static str = NAME;
    // Keyed by the aggregate id of the stream, from that stream's category only.
    const ROWS_FOLLOW_STREAMS: bool = true;

    fn filter(&self) -> LogFilter {
        LogFilter::categories(["account"])
    }

    fn key(&self, event: &RecordedEvent) -> Result<Option<String>, ProjectionError> {
        Ok(Some(aggregate_id(event)))
    }

    fn fold(
        &self,
        row: Option<AccountRow>,
        event: &RecordedEvent,
    ) -> Result<Option<AccountRow>, ProjectionError> {
        let position = sql_int(event.position);
        let decoded: AccountEvent = decode(event)?;
        if let AccountEvent::AccountOpened {
            name,
            domain,
            industry,
            employees,
            tier,
            ..
        } = decoded
        {
            return Ok(Some(AccountRow {
                account_id: aggregate_id(event),
                name: name.as_str().to_owned(),
                domain: domain.map(|d| d.as_str().to_owned()),
                industry: industry.map(|i| i.as_str().to_owned()),
                employees: employees.map(sql_int),
                tier: tier.as_str().to_owned(),
                opened_at: time_text(event),
                updated_position: position,
            }));
        }
        let mut row = row.ok_or_else(|| ProjectionError::Apply {
            position: event.position,
            event_type: event.event_type.clone(),
            reason: "the account was never opened".into(),
        })?;
        match decoded {
            AccountEvent::AccountOpened { .. } => {}
            AccountEvent::AccountRenamed { name, .. } => row.name = name.as_str().to_owned(),
            AccountEvent::AccountTierChanged { tier, .. } => row.tier = tier.as_str().to_owned(),
        }
        row.updated_position = position;
        Ok(Some(row))
    }
}
