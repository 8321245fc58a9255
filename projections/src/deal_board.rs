//! `deal_board`: one row per deal with its stage, status, amount, owner and account
//! (`domain.md`, read models); the pipeline's figures are aggregates of it.

use annals_domain::deal::DealEvent;
use annals_store::{LogFilter, RecordedEvent};

use crate::rows::{RowModel, column, integer, required};
use crate::{Param, ProjectionError, Table, aggregate_id, decode, sql_int, time_text};

#[derive(Debug, Default)]
pub struct DealBoard;

/// A row of `deal_board`.
#[derive(Debug, Clone, PartialEq)]
pub struct DealRow {
    pub deal_id: String,
    pub account_id: String,
    pub name: String,
    pub stage: String,
    pub status: String,
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

impl RowModel for DealBoard {
    type Row = DealRow;

    const NAME: &'static str = "deal_board";
    // Keyed by the aggregate id of the stream, from that stream's category only.
    const ROWS_FOLLOW_STREAMS: bool = true;
    const TABLE: Table = Table {
        name: "deal_board",
        columns: &[
            "deal_id",
            "account_id",
            "name",
            "stage",
            "status",
            "currency",
            "amount_minor",
            "owner",
            "expected_close",
            "opened_at",
            "opened_micros",
            "closed_at",
            "closed_micros",
            "lost_reason",
            "updated_position",
        ],
        key: "deal_id",
    };

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
                status: "open".into(),
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
        match decoded {
            DealEvent::DealOpened { .. } => {}
            DealEvent::DealStageChanged { to, .. } => row.stage = to.as_str().to_owned(),
            DealEvent::DealAmountChanged { to, .. } => row.amount_minor = to.amount_minor,
            DealEvent::DealWon { .. } | DealEvent::DealLost { .. } => {
                row.status = if matches!(decoded, DealEvent::DealWon { .. }) {
                    "won".into()
                } else {
                    "lost".into()
                };
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

    fn to_params(&self, row: &DealRow) -> Vec<Param<'static>> {
        vec![
            row.deal_id.clone().into(),
            row.account_id.clone().into(),
            row.name.clone().into(),
            row.stage.clone().into(),
            row.status.clone().into(),
            row.currency.clone().into(),
            row.amount_minor.into(),
            row.owner.clone().into(),
            row.expected_close.clone().into(),
            row.opened_at.clone().into(),
            row.opened_micros.into(),
            row.closed_at.clone().into(),
            Param::Int(row.closed_micros),
            row.lost_reason.clone().into(),
            row.updated_position.into(),
        ]
    }

    fn read_row(&self, v: &[Option<String>]) -> Result<DealRow, ProjectionError> {
        Ok(DealRow {
            deal_id: required(v, 0)?,
            account_id: required(v, 1)?,
            name: required(v, 2)?,
            stage: required(v, 3)?,
            status: required(v, 4)?,
            currency: required(v, 5)?,
            amount_minor: integer(v, 6)?.unwrap_or(0),
            owner: column(v, 7),
            expected_close: column(v, 8),
            opened_at: required(v, 9)?,
            opened_micros: integer(v, 10)?.unwrap_or(0),
            closed_at: column(v, 11),
            closed_micros: integer(v, 12)?,
            lost_reason: column(v, 13),
            updated_position: integer(v, 14)?.unwrap_or(0),
        })
    }
}
