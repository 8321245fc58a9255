//! `account_360`: one row per account with its profile (`domain.md`, read models). The
//! account's view adds, read in the same snapshot from the boards that own them, its
//! deals and won amounts (`deal_board`), its converted leads (`lead_board`), its orders
//! (`order_board`) and its MRR now (`subscription_board`). Each of those is rebuilt and
//! verified on its own, so the view is as replayable as its parts, and no fact is kept
//! twice.

use annals_domain::account::AccountEvent;
use annals_domain::deal::DealStatus;
use annals_domain::subscription::SubscriptionStatus;
use annals_store::{LogFilter, RecordedEvent};
use serde::Serialize;

use crate::queries::{Snapshot, in_snapshot, live, number, text};
use crate::read_models::{deal_board, lead_board, order_board, subscription_board};
use crate::{aggregate_id, decode, time_text};
use annals_engine::row;
use annals_engine::rows::RowModel;
use annals_engine::{ConsumerError, Param, ReadDatabase};
use annals_store::to_sql_int;

/// The most orders an account's view lists, the first placed (`GET /orders?account_id=`
/// pages through all of them).
pub const ACCOUNT_ORDERS: usize = 100;

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

    fn key(&self, event: &RecordedEvent) -> Result<Option<String>, ConsumerError> {
        Ok(Some(aggregate_id(event)))
    }

    fn fold(
        &self,
        row: Option<AccountRow>,
        event: &RecordedEvent,
    ) -> Result<Option<AccountRow>, ConsumerError> {
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
        let mut row = row.ok_or_else(|| ConsumerError::Apply {
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
    /// Its first `ACCOUNT_ORDERS` orders, in the order they were placed.
    pub orders: Vec<AccountOrder>,
    /// (currency, MRR in minor units) of its active subscriptions now, per currency.
    pub mrr: Vec<(String, i64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccountOrder {
    pub order_id: String,
    pub status: String,
    pub currency: String,
    pub total_minor: i64,
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

/// One account with its deals, converted leads, won amounts, orders and MRR; `None`
/// when unknown.
pub async fn account_360(
    db: &ReadDatabase,
    account_id: &str,
) -> Result<Option<AccountView>, ConsumerError> {
    in_snapshot!(db, |snapshot| snapshot.account_360(account_id))
}

impl Snapshot {
    /// One account with its deals, converted leads, won amounts, orders and MRR; `None`
    /// when unknown.
    pub async fn account_360(
        &mut self,
        account_id: &str,
    ) -> Result<Option<AccountView>, ConsumerError> {
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
        let won = per_currency(
            deals
                .iter()
                .filter(|d| d.status == DealStatus::Won.as_str())
                .map(|d| (d.currency.clone(), d.amount_minor)),
        );
        let orders = self
            .rows(
                &format!(
                    "SELECT order_id, status, currency, CAST(total_minor AS TEXT) \
               FROM order_board WHERE generation = {} AND account_id = $1 \
              ORDER BY placed_micros, order_id LIMIT {ACCOUNT_ORDERS}",
                    live(order_board::NAME)
                ),
                std::slice::from_ref(&id),
            )
            .await?
            .iter()
            .map(|o| AccountOrder {
                order_id: text(o, 0),
                status: text(o, 1),
                currency: text(o, 2),
                total_minor: number(o, 3),
            })
            .collect();
        let active = self
            .rows(
                &format!(
                    "SELECT currency, CAST(mrr_minor AS TEXT) FROM subscription_board \
               WHERE generation = {} AND account_id = $1 AND status = $2",
                    live(subscription_board::NAME)
                ),
                &[id.clone(), SubscriptionStatus::Active.as_str().into()],
            )
            .await?;
        let mrr = per_currency(active.iter().map(|s| (text(s, 0), number(s, 1))));
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
            orders,
            mrr,
        }))
    }
}

/// Amounts summed per currency, in currency order.
fn per_currency(amounts: impl Iterator<Item = (String, i64)>) -> Vec<(String, i64)> {
    let mut sums = std::collections::BTreeMap::<String, i64>::new();
    for (currency, amount) in amounts {
        let sum = sums.entry(currency).or_default();
        *sum = sum.saturating_add(amount);
    }
    sums.into_iter().collect()
}
