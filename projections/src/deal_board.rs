//! `deal_board`: one row per deal with its stage, status, amount, owner and account
//! (`domain.md`, read models); the pipeline's figures are aggregates of it.

use annals_domain::deal::{DealEvent, DealStatus};
use annals_store::{LogFilter, RecordedEvent};

use crate::rows::{RowModel, row};
use crate::{ProjectionError, aggregate_id, decode, sql_int, time_text};

/// The projection's name, and its table's.
pub const NAME: &str = "deal_board";

#[derive(Debug, Default)]
pub struct DealBoard;

row! {
    /// A row of `deal_board`.
    pub struct DealRow in table NAME, keyed by deal_id {
        pub deal_id: String,
        pub account_id: String,
        pub name: String,
        pub stage: String,
        pub status: DealStatus,
        pub currency: String,
        pub amount_minor: i64,
        pub owner: Option<String>,
        pub expected_close: Option<String>,
        pub opened_at: String,
        pub opened_micros: i64,
        pub closed_at: Option<String>,
        pub closed_micros: Option<i64>,
        pub lost_reason: Option<String>,
        pub updated_position: i64,
    }
}

impl RowModel for DealBoard {
    type Row = DealRow;

    const NAME: &'static str = NAME;
    // Keyed by the aggregate id of the stream, from that stream's category only.
    const ROWS_FOLLOW_STREAMS: bool = true;

    fn filter(&self) -> LogFilter {
        LogFilter::categories(["deal"])
    }

    fn key(&self, event: &RecordedEvent) -> Result<Option<String>, ProjectionError> {
        Ok(Some(aggregate_id(event)))
    }

    fn fold(
        &self,
        row: Option<DealRow>,
        event: &RecordedEvent,
    ) -> Result<Option<DealRow>, ProjectionError> {
        let position = sql_int(event.position);
        let decoded: DealEvent = decode(event)?;
        if let DealEvent::DealOpened {
            account_id,
            name,
            amount,
            owner,
            expected_close,
            stage,
            ..
        } = decoded
        {
            return Ok(Some(DealRow {
                deal_id: aggregate_id(event),
                account_id: account_id.to_string(),
                name: name.as_str().to_owned(),
                stage: stage.as_str().to_owned(),
                status: DealStatus::Open,
                currency: amount.currency.as_str().to_owned(),
                amount_minor: amount.amount_minor,
                owner: owner.map(|o| o.as_str().to_owned()),
                expected_close: expected_close.map(|d| d.to_string()),
                opened_at: time_text(event),
                opened_micros: event.recorded_at.timestamp_micros(),
                closed_at: None,
                closed_micros: None,
                lost_reason: None,
                updated_position: position,
            }));
        }
        let mut row = row.ok_or_else(|| ProjectionError::Apply {
            position: event.position,
            event_type: event.event_type.clone(),
            reason: "the deal was never opened".into(),
        })?;
        row.status = row.status.after(&decoded);
        match decoded {
            DealEvent::DealOpened { .. } => {}
            DealEvent::DealStageChanged { to, .. } => row.stage = to.as_str().to_owned(),
            DealEvent::DealAmountChanged { to, .. } => row.amount_minor = to.amount_minor,
            DealEvent::DealWon { .. } | DealEvent::DealLost { .. } => {
                if let DealEvent::DealLost { reason } = &decoded {
                    row.lost_reason = Some(reason.as_str().to_owned());
                }
                row.closed_at = Some(time_text(event));
                row.closed_micros = Some(event.recorded_at.timestamp_micros());
            }
        }
        row.updated_position = position;
        Ok(Some(row))
    }
}
