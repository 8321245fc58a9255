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

use crate::queries::{Snapshot, in_snapshot};
use crate::read_models::deal_board::DealRow;
use crate::read_models::lead_board::LeadRow;
use crate::read_models::order_board::OrderRow;
use crate::read_models::subscription_board::SubscriptionRow;
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
        let id = [Param::from(account_id)];
        let Some(account) = self
            .rows_of::<AccountRow>("account_id = $1", "", &id)
            .await?
            .pop()
        else {
            return Ok(None);
        };
        let deals: Vec<AccountDeal> = self
            .rows_of::<DealRow>("account_id = $1", "ORDER BY opened_micros, deal_id", &id)
            .await?
            .into_iter()
            .map(|deal| AccountDeal {
                deal_id: deal.deal_id,
                name: deal.name,
                stage: deal.stage,
                status: deal.status.as_str().to_owned(),
                currency: deal.currency,
                amount_minor: deal.amount_minor,
            })
            .collect();
        let converted_leads = self
            .rows_of::<LeadRow>(
                "converted_account_id = $1",
                "ORDER BY converted_at, lead_id",
                &id,
            )
            .await?
            .into_iter()
            .map(|lead| lead.lead_id)
            .collect();
        let won = per_currency(
            deals
                .iter()
                .filter(|d| d.status == DealStatus::Won.as_str())
                .map(|d| (d.currency.clone(), d.amount_minor)),
        );
        let orders = self
            .rows_of::<OrderRow>(
                "account_id = $1",
                &format!("ORDER BY placed_micros, order_id LIMIT {ACCOUNT_ORDERS}"),
                &id,
            )
            .await?
            .into_iter()
            .map(|order| AccountOrder {
                order_id: order.order_id,
                status: order.status.as_str().to_owned(),
                currency: order.currency,
                total_minor: order.total_minor,
            })
            .collect();
        let active = self
            .rows_of::<SubscriptionRow>(
                "account_id = $1 AND status = $2",
                "",
                &[id[0].clone(), SubscriptionStatus::Active.as_str().into()],
            )
            .await?;
        let mrr = per_currency(active.into_iter().map(|s| (s.currency, s.mrr_minor)));
        Ok(Some(AccountView {
            account_id: account.account_id,
            name: account.name,
            domain: account.domain,
            industry: account.industry,
            employees: account.employees,
            tier: account.tier,
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
