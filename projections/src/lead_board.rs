//! `lead_board`: one row per lead with its status, score, owner, source, and capture,
//! qualification and conversion times (`domain.md`, read models).

use annals_domain::lead::LeadEvent;
use annals_store::{LogFilter, RecordedEvent};

use crate::rows::{RowModel, column, integer, required};
use crate::{Param, ProjectionError, Table, aggregate_id, decode, sql_int, time_text};

#[derive(Debug, Default)]
pub struct LeadBoard;

/// A row of `lead_board`.
#[derive(Debug, Clone, PartialEq)]
pub struct LeadRow {
    pub lead_id: String,
    pub email: String,
    pub name: String,
    pub company: Option<String>,
    pub source: String,
    pub status: String,
    pub score: i64,
    pub owner: Option<String>,
    pub captured_at: String,
    pub qualified_at: Option<String>,
    pub converted_deal_id: Option<String>,
    pub converted_account_id: Option<String>,
    pub converted_at: Option<String>,
    pub updated_position: i64,
}

impl RowModel for LeadBoard {
    type Row = LeadRow;

    const NAME: &'static str = "lead_board";
    // Keyed by the aggregate id of the stream, from that stream's category only.
    const ROWS_FOLLOW_STREAMS: bool = true;
    const TABLE: Table = Table {
        name: "lead_board",
        columns: &[
            "lead_id",
            "email",
            "name",
            "company",
            "source",
            "status",
            "score",
            "owner",
            "captured_at",
            "qualified_at",
            "converted_deal_id",
            "converted_account_id",
            "converted_at",
            "updated_position",
        ],
        key: "lead_id",
    };

    fn filter(&self) -> LogFilter {
        LogFilter::categories(["lead"])
    }

    fn key(&self, event: &RecordedEvent) -> Result<Option<String>, ProjectionError> {
        Ok(Some(aggregate_id(event)))
    }

    fn fold(
        &self,
        row: Option<LeadRow>,
        event: &RecordedEvent,
    ) -> Result<Option<LeadRow>, ProjectionError> {
        let position = sql_int(event.position);
        let decoded: LeadEvent = decode(event)?;
        if let LeadEvent::LeadCaptured {
            email,
            name,
            company,
            source,
            ..
        } = decoded
        {
            return Ok(Some(LeadRow {
                lead_id: aggregate_id(event),
                email: email.as_str().to_owned(),
                name: name.as_str().to_owned(),
                company: company.map(|c| c.as_str().to_owned()),
                source: source.as_str().to_owned(),
                status: "new".into(),
                score: 0,
                owner: None,
                captured_at: time_text(event),
                qualified_at: None,
                converted_deal_id: None,
                converted_account_id: None,
                converted_at: None,
                updated_position: position,
            }));
        }
        // Every other event follows a capture; one without it is a broken stream.
        let mut row = row.ok_or_else(|| ProjectionError::Apply {
            position: event.position,
            event_type: event.event_type.clone(),
            reason: "the lead was never captured".into(),
        })?;
        match decoded {
            LeadEvent::LeadCaptured { .. } => {}
            LeadEvent::SignalRecorded { points, .. } => row.score += i64::from(points),
            LeadEvent::LeadQualified { .. } => {
                row.status = "qualified".into();
                row.qualified_at = Some(time_text(event));
            }
            LeadEvent::LeadAssigned { owner, .. } => {
                row.owner = Some(owner.as_str().to_owned());
                if row.status == "new" {
                    row.status = "working".into();
                }
            }
            LeadEvent::LeadDisqualified { .. } => row.status = "disqualified".into(),
            LeadEvent::LeadConverted {
                deal_id,
                account_id,
                ..
            } => {
                row.status = "converted".into();
                row.converted_deal_id = Some(deal_id.to_string());
                row.converted_account_id = Some(account_id.to_string());
                row.converted_at = Some(time_text(event));
            }
        }
        row.updated_position = position;
        Ok(Some(row))
    }

    fn to_params(&self, row: &LeadRow) -> Vec<Param<'static>> {
        vec![
            row.lead_id.clone().into(),
            row.email.clone().into(),
            row.name.clone().into(),
            row.company.clone().into(),
            row.source.clone().into(),
            row.status.clone().into(),
            row.score.into(),
            row.owner.clone().into(),
            row.captured_at.clone().into(),
            row.qualified_at.clone().into(),
            row.converted_deal_id.clone().into(),
            row.converted_account_id.clone().into(),
            row.converted_at.clone().into(),
            row.updated_position.into(),
        ]
    }

    fn read_row(&self, v: &[Option<String>]) -> Result<LeadRow, ProjectionError> {
        Ok(LeadRow {
            lead_id: required(v, 0)?,
            email: required(v, 1)?,
            name: required(v, 2)?,
            company: column(v, 3),
            source: required(v, 4)?,
            status: required(v, 5)?,
            score: integer(v, 6)?.unwrap_or(0),
            owner: column(v, 7),
            captured_at: required(v, 8)?,
            qualified_at: column(v, 9),
            converted_deal_id: column(v, 10),
            converted_account_id: column(v, 11),
            converted_at: column(v, 12),
            updated_position: integer(v, 13)?.unwrap_or(0),
        })
    }
}
