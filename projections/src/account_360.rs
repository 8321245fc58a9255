//! `account_360`'s own rows: one per account with its profile (`domain.md`, read
//! models). The account's deals, won amounts and converted leads are read from the deal
//! and lead boards beside it.

use annals_domain::account::AccountEvent;
use annals_store::{LogFilter, RecordedEvent};

use crate::rows::{RowModel, column, integer, required};
use crate::{Param, ProjectionError, Table, aggregate_id, decode, sql_int, time_text};

#[derive(Debug, Default)]
pub struct Account360;

/// A row of `account_360`.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountRow {
    pub account_id: String,
    pub name: String,
    pub domain: Option<String>,
    pub industry: Option<String>,
    pub employees: Option<i64>,
    pub tier: String,
    pub opened_at: String,
    pub updated_position: i64,
}

impl RowModel for Account360 {
    type Row = AccountRow;

    const NAME: &'static str = "account_360";
    // Keyed by the aggregate id of the stream, from that stream's category only.
    const ROWS_FOLLOW_STREAMS: bool = true;
    const TABLE: Table = Table {
        name: "account_360",
        columns: &[
            "account_id",
            "name",
            "domain",
            "industry",
            "employees",
            "tier",
            "opened_at",
            "updated_position",
        ],
        key: "account_id",
    };

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

    fn to_params(&self, row: &AccountRow) -> Vec<Param<'static>> {
        vec![
            row.account_id.clone().into(),
            row.name.clone().into(),
            row.domain.clone().into(),
            row.industry.clone().into(),
            Param::Int(row.employees),
            row.tier.clone().into(),
            row.opened_at.clone().into(),
            row.updated_position.into(),
        ]
    }

    fn read_row(&self, v: &[Option<String>]) -> Result<AccountRow, ProjectionError> {
        Ok(AccountRow {
            account_id: required(v, 0)?,
            name: required(v, 1)?,
            domain: column(v, 2),
            industry: column(v, 3),
            employees: integer(v, 4)?,
            tier: required(v, 5)?,
            opened_at: required(v, 6)?,
            updated_position: integer(v, 7)?.unwrap_or(0),
        })
    }
}
