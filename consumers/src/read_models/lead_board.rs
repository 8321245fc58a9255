//! `lead_board`: one row per lead with its status, score, owner, source, and capture,
//! qualification and conversion times (`domain.md`, read models). It keeps the lead's
//! email and name to show them, and forgets both when the lead is erased (a rebuild
//! after the erasure reads them as erased from the log, so it comes out the same).

use annals_domain::lead::{LeadEvent, LeadStatus};
use annals_store::{LogFilter, RecordedEvent};

use crate::queries::{
    Conditions, Page, Snapshot, decode_cursor, encode_cursor, in_snapshot, live, page,
};
use crate::{aggregate_id, decode, time_text};
use annals_engine::row;
use annals_engine::rows::{Row, RowModel, text_columns};
use annals_engine::{ConsumerError, ReadDatabase};
use annals_store::to_sql_int;

/// The projection's name, and its table's.
pub const NAME: &str = "lead_board";

#[derive(Debug, Default)]
pub struct LeadBoard;

row! {
    /// A row of `lead_board`.
    pub struct LeadRow in table NAME, keyed by lead_id {
        pub lead_id: String,
        /// `None` once the lead is erased.
        pub email: Option<String>,
        pub name: Option<String>,
        pub company: Option<String>,
        pub source: String,
        pub status: LeadStatus as word,
        pub score: i64,
        pub owner: Option<String>,
        pub captured_at: String,
        pub qualified_at: Option<String>,
        pub converted_deal_id: Option<String>,
        pub converted_account_id: Option<String>,
        pub converted_at: Option<String>,
        pub updated_position: i64,
    }
    indexes {
        lead_board_score on ("score DESC, captured_at, lead_id"),
        lead_board_owner on ("owner"),
        // Account 360: the leads converted into one account, in conversion order.
        lead_board_converted_account on ("converted_account_id, converted_at, lead_id")
            where "converted_account_id IS NOT NULL",
        // The lead list filtered by status, in the list's own order.
        lead_board_status on ("status, score DESC, captured_at, lead_id"),
        // The funnel's time window: each step counts the rows whose time for that step
        // falls in it, and the won step finds each won deal's lead by its deal.
        lead_board_captured on ("captured_at"),
        lead_board_qualified on ("qualified_at") where "qualified_at IS NOT NULL",
        lead_board_converted on ("converted_at") where "converted_at IS NOT NULL",
        lead_board_converted_deal on ("converted_deal_id") where "converted_deal_id IS NOT NULL",
    }
}

impl RowModel for LeadBoard {
    type Row = LeadRow;

    const NAME: &'static str = NAME;
    // Keyed by the aggregate id of the stream, from that stream's category only.
    const ROWS_FOLLOW_STREAMS: bool = true;

    fn filter(&self) -> LogFilter {
        LogFilter::categories(["lead"])
    }

    fn key(&self, event: &RecordedEvent) -> Result<Option<String>, ConsumerError> {
        Ok(Some(aggregate_id(event)))
    }

    fn fold(
        &self,
        row: Option<LeadRow>,
        event: &RecordedEvent,
    ) -> Result<Option<LeadRow>, ConsumerError> {
        let position = to_sql_int(event.position);
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
                email: email.map(|e| e.as_str().to_owned()),
                name: name.map(|n| n.as_str().to_owned()),
                company: company.map(|c| c.as_str().to_owned()),
                source: source.as_str().to_owned(),
                status: LeadStatus::New,
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
        let mut row = row.ok_or_else(|| ConsumerError::Apply {
            position: event.position,
            event_type: event.event_type.clone(),
            reason: "the lead was never captured".into(),
        })?;
        row.status = row.status.after(&decoded);
        match decoded {
            LeadEvent::LeadCaptured { .. } | LeadEvent::LeadDisqualified { .. } => {}
            LeadEvent::SignalRecorded { points, .. } => row.score += i64::from(points),
            LeadEvent::LeadQualified { .. } => row.qualified_at = Some(time_text(event)),
            LeadEvent::LeadAssigned { owner, .. } => row.owner = Some(owner.as_str().to_owned()),
            LeadEvent::LeadConverted {
                deal_id,
                account_id,
                ..
            } => {
                row.converted_deal_id = Some(deal_id.to_string());
                row.converted_account_id = Some(account_id.to_string());
                row.converted_at = Some(time_text(event));
            }
            LeadEvent::LeadErased {} => {
                row.email = None;
                row.name = None;
            }
        }
        row.updated_position = position;
        Ok(Some(row))
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct LeadFilter {
    pub status: Option<String>,
    pub owner: Option<String>,
    pub source: Option<String>,
    pub min_score: Option<i64>,
}

fn select_leads() -> String {
    format!(
        "SELECT {} FROM lead_board WHERE generation = {}",
        text_columns(&LeadRow::TABLE),
        live(NAME)
    )
}

fn lead_row(row: &[Option<String>]) -> Result<LeadRow, ConsumerError> {
    LeadRow::read(row)
}

/// Leads matching the filter, score descending, then capture time, then id (a stable total order); keyset pagination.
pub async fn leads(
    db: &ReadDatabase,
    filter: &LeadFilter,
    limit: usize,
    cursor: Option<&str>,
) -> Result<Page<LeadRow>, ConsumerError> {
    in_snapshot!(db, |snapshot| snapshot.leads(filter, limit, cursor))
}

/// One lead of the live lead board; `None` when unknown.
pub async fn lead(db: &ReadDatabase, lead_id: &str) -> Result<Option<LeadRow>, ConsumerError> {
    in_snapshot!(db, |snapshot| snapshot.lead(lead_id))
}

impl Snapshot {
    /// Leads matching the filter (see [`leads`]).
    pub async fn leads(
        &mut self,
        filter: &LeadFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<LeadRow>, ConsumerError> {
        let mut conditions = Conditions::default();
        for (name, value) in [
            ("status", &filter.status),
            ("owner", &filter.owner),
            ("source", &filter.source),
        ] {
            if let Some(value) = value {
                let placeholder = conditions.bind(value.clone());
                conditions.push(format!("{name} = {placeholder}"));
            }
        }
        if let Some(min_score) = filter.min_score {
            let placeholder = conditions.bind(min_score);
            conditions.push(format!("score >= {placeholder}"));
        }
        if let Some(cursor) = cursor {
            let (score, [captured_at, lead_id]) = decode_cursor(cursor)?;
            let score = conditions.bind(score);
            let captured_at = conditions.bind(captured_at);
            let lead_id = conditions.bind(lead_id);
            // After the last item in (score DESC, captured_at, lead_id) order; `score <= …`
            // alone bounds the scan of the score index.
            conditions.push(format!(
            "score <= {score} AND (score < {score} OR (score = {score} AND \
             (captured_at > {captured_at} OR (captured_at = {captured_at} AND lead_id > {lead_id}))))"
        ));
        }
        page(
            self,
            &select_leads(),
            conditions,
            "score DESC, captured_at, lead_id",
            limit,
            lead_row,
            |last| encode_cursor(last.score, &[&last.captured_at, &last.lead_id]),
        )
        .await
    }

    /// One lead of the live lead board; `None` when unknown.
    pub async fn lead(&mut self, lead_id: &str) -> Result<Option<LeadRow>, ConsumerError> {
        let sql = format!("{} AND lead_id = $1", select_leads());
        self.rows(&sql, &[lead_id.into()])
            .await?
            .first()
            .map(|row| lead_row(row))
            .transpose()
    }
}
