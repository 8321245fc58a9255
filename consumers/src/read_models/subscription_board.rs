//! `subscription_board`: one row per subscription with its account, order, status, MRR
//! now, and when it started and churned (`api.md`, `GET /subscriptions`). Folded from
//! the subscription's stream alone.

use annals_domain::subscription::{SubscriptionEvent, SubscriptionStatus};
use annals_store::{LogFilter, RecordedEvent};

use crate::queries::{Conditions, Page, Snapshot, encode_cursor, live, page};
use crate::{aggregate_id, decode, time_text};
use annals_engine::ConsumerError;
use annals_engine::row;
use annals_engine::rows::{Row, RowModel, text_columns};
use annals_store::to_sql_int;

/// The projection's name, and its table's.
pub const NAME: &str = "subscription_board";

#[derive(Debug, Default)]
pub struct SubscriptionBoard;

row! {
    /// A row of `subscription_board`.
    pub struct SubscriptionRow in table NAME, keyed by subscription_id {
        pub subscription_id: String,
        pub account_id: String,
        pub order_id: String,
        pub status: SubscriptionStatus as word,
        pub currency: String,
        /// The MRR now (the MRR lost, once churned).
        pub mrr_minor: i64,
        pub started_at: String,
        pub started_micros: i64,
        pub churned_at: Option<String>,
        pub updated_position: i64,
    }
    indexes {
        subscription_board_started on ("started_micros, subscription_id"),
        subscription_board_account on ("account_id, started_micros, subscription_id"),
        subscription_board_status on ("status, started_micros, subscription_id"),
    }
}

impl RowModel for SubscriptionBoard {
    type Row = SubscriptionRow;

    const NAME: &'static str = NAME;
    const ROWS_FOLLOW_STREAMS: bool = true;

    fn filter(&self) -> LogFilter {
        LogFilter::categories(["subscription"])
    }

    fn key(&self, event: &RecordedEvent) -> Result<Option<String>, ConsumerError> {
        Ok(Some(aggregate_id(event)))
    }

    fn fold(
        &self,
        row: Option<SubscriptionRow>,
        event: &RecordedEvent,
    ) -> Result<Option<SubscriptionRow>, ConsumerError> {
        let decoded: SubscriptionEvent = decode(event)?;
        if let SubscriptionEvent::SubscriptionStarted {
            subscription_id,
            account_id,
            order_id,
            mrr,
        } = &decoded
        {
            return Ok(Some(SubscriptionRow {
                subscription_id: subscription_id.to_string(),
                account_id: account_id.to_string(),
                order_id: order_id.to_string(),
                status: SubscriptionStatus::Active,
                currency: mrr.currency.as_str().to_owned(),
                mrr_minor: mrr.amount_minor,
                started_at: time_text(event),
                started_micros: event.recorded_at.timestamp_micros(),
                churned_at: None,
                updated_position: to_sql_int(event.position),
            }));
        }
        let mut row = row.ok_or_else(|| ConsumerError::Apply {
            position: event.position,
            event_type: event.event_type.clone(),
            reason: "the subscription never started".into(),
        })?;
        match &decoded {
            SubscriptionEvent::SubscriptionStarted { .. } => {}
            SubscriptionEvent::SubscriptionExpanded { to, .. }
            | SubscriptionEvent::SubscriptionContracted { to, .. } => {
                row.mrr_minor = to.amount_minor;
            }
            SubscriptionEvent::SubscriptionChurned { .. } => {
                row.churned_at = Some(time_text(event));
            }
        }
        row.status = row.status.after(&decoded);
        row.updated_position = to_sql_int(event.position);
        Ok(Some(row))
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubscriptionFilter {
    pub status: Option<String>,
    pub account_id: Option<String>,
}

fn select_subscriptions() -> String {
    format!(
        "SELECT {} FROM {NAME} WHERE generation = {}",
        text_columns(&SubscriptionRow::TABLE),
        live(NAME)
    )
}

impl Snapshot {
    /// Subscriptions matching the filter, in the order they started (then by id); keyset
    /// pagination.
    pub async fn subscriptions(
        &mut self,
        filter: &SubscriptionFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<SubscriptionRow>, ConsumerError> {
        let mut conditions = Conditions::default();
        conditions.equal("status", filter.status.as_ref());
        conditions.equal("account_id", filter.account_id.as_ref());
        conditions.after(cursor, "started_micros", "subscription_id")?;
        page(
            self,
            &select_subscriptions(),
            conditions,
            "started_micros, subscription_id",
            limit,
            SubscriptionRow::read,
            |last| encode_cursor(last.started_micros, &[&last.subscription_id]),
        )
        .await
    }

    /// One subscription of the live board; `None` when unknown.
    pub async fn subscription(
        &mut self,
        subscription_id: &str,
    ) -> Result<Option<SubscriptionRow>, ConsumerError> {
        let sql = format!("{} AND subscription_id = $1", select_subscriptions());
        self.rows(&sql, &[subscription_id.into()])
            .await?
            .first()
            .map(|row| SubscriptionRow::read(row))
            .transpose()
    }
}
