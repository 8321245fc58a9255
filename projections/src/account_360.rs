//! `account_360`'s own rows: one per account with its profile (`domain.md`, read
//! models). The account's deals, won amounts and converted leads are read from the deal
//! and lead boards beside it.

use annals_domain::account::AccountEvent;
use annals_domain::deal::DealStatus;
use annals_store::{LogFilter, RecordedEvent};
use serde::Serialize;

use crate::queries::{Snapshot, in_snapshot, live, number, text};
use crate::rows::{RowModel, row};
use crate::{
    Param, ProjectionError, ReadDatabase, aggregate_id, deal_board, decode, lead_board, time_text,
    to_sql_int,
};

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
        let position = to_sql_int(event.position);
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
                employees: employees.map(to_sql_int),
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

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccountView {
    pub account_id: String,
    pub name: String,
    pub domain: Option<String>,
    pub industry: Option<String>,
    pub employees: Option<i64>,
    pub tier: String,
    /// (deal id, name, stage, status, currency, amount in minor units)
    pub deals: Vec<AccountDeal>,
    /// Ids of the leads converted into this account.
    pub converted_leads: Vec<String>,
    /// (currency, amount in minor units) won, per currency.
    pub won: Vec<(String, i64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccountDeal {
    pub deal_id: String,
    pub name: String,
    pub stage: String,
    pub status: String,
    pub currency: String,
    pub amount_minor: i64,
}

/// One account with its deals, converted leads and won amounts; `None` when unknown.
pub async fn account_360(
    db: &ReadDatabase,
    account_id: &str,
) -> Result<Option<AccountView>, ProjectionError> {
    in_snapshot!(db, |snapshot| snapshot.account_360(account_id))
}

impl Snapshot {
    /// One account with its deals, converted leads and won amounts; `None` when unknown.
    pub async fn account_360(
        &mut self,
        account_id: &str,
    ) -> Result<Option<AccountView>, ProjectionError> {
        let id: Param = account_id.into();
        let account = self
            .rows(
                &format!(
                    "SELECT account_id, name, domain, industry, CAST(employees AS TEXT), tier \
               FROM account_360 WHERE generation = {} AND account_id = $1",
                    live(NAME)
                ),
                std::slice::from_ref(&id),
            )
            .await?;
        let Some(row) = account.first() else {
            return Ok(None);
        };
        let deals = self
            .rows(
                &format!(
                    "SELECT deal_id, name, stage, status, currency, CAST(amount_minor AS TEXT) \
               FROM deal_board WHERE generation = {} AND account_id = $1 \
              ORDER BY opened_micros, deal_id",
                    live(deal_board::NAME)
                ),
                std::slice::from_ref(&id),
            )
            .await?
            .iter()
            .map(|d| AccountDeal {
                deal_id: text(d, 0),
                name: text(d, 1),
                stage: text(d, 2),
                status: text(d, 3),
                currency: text(d, 4),
                amount_minor: number(d, 5),
            })
            .collect::<Vec<_>>();
        let converted_leads = self.rows(
        &format!(
            "SELECT lead_id FROM lead_board WHERE generation = {} AND converted_account_id = $1 \
              ORDER BY converted_at, lead_id",
            live(lead_board::NAME)
        ),
        std::slice::from_ref(&id),
    )
    .await?
    .iter()
    .map(|l| text(l, 0))
    .collect();
        let mut won: Vec<(String, i64)> = Vec::new();
        for deal in deals
            .iter()
            .filter(|d| d.status == DealStatus::Won.as_str())
        {
            match won.iter_mut().find(|(c, _)| *c == deal.currency) {
                Some((_, sum)) => *sum = sum.saturating_add(deal.amount_minor),
                None => won.push((deal.currency.clone(), deal.amount_minor)),
            }
        }
        won.sort();
        Ok(Some(AccountView {
            account_id: text(row, 0),
            name: text(row, 1),
            domain: row[2].clone(),
            industry: row[3].clone(),
            employees: row[4].as_deref().and_then(|e| e.parse().ok()),
            tier: text(row, 5),
            deals,
            converted_leads,
            won,
        }))
    }
}
