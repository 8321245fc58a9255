//! `lead_board`: one row per lead with its status, score, owner, source, and capture and
//! qualification times (`domain.md`, read models). Filtered and sorted by score.

use annals_domain::lead::LeadEvent;
use annals_store::{LogFilter, RecordedEvent};
use async_trait::async_trait;

use crate::{
    Param, ProjectionError, Projector, ReadTx, Table, aggregate_id, decode, sql_int, time_text,
};

#[derive(Debug, Default)]
pub struct LeadBoard;

#[async_trait]
impl Projector for LeadBoard {
    fn name(&self) -> &'static str {
        "lead_board"
    }

    fn filter(&self) -> LogFilter {
        LogFilter::categories(["lead"])
    }

    fn tables(&self) -> &'static [Table] {
        &[Table {
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
        }]
    }

    async fn apply(&self, tx: &mut ReadTx, event: &RecordedEvent) -> Result<(), ProjectionError> {
        let decoded: LeadEvent = decode(event)?;
        let lead = aggregate_id(event);
        let at = time_text(event);
        let position = sql_int(event.position);
        let generation = tx.generation();
        let (sql, params): (&str, Vec<Param>) = match decoded {
            LeadEvent::LeadCaptured {
                email,
                name,
                company,
                source,
                ..
            } => (
                "INSERT INTO lead_board (generation, lead_id, email, name, company, source, \
                                         status, score, owner, captured_at, qualified_at, \
                                         converted_deal_id, updated_position) \
                 VALUES ($8, $1, $2, $3, $4, $5, 'new', 0, NULL, $6, NULL, NULL, $7)",
                vec![
                    lead.into(),
                    email.as_str().into(),
                    name.as_str().into(),
                    company.map(|c| c.as_str().to_owned()).into(),
                    source.as_str().into(),
                    at.into(),
                    position.into(),
                    generation.into(),
                ],
            ),
            LeadEvent::SignalRecorded { points, .. } => (
                "UPDATE lead_board SET score = score + $2, updated_position = $3 \
                  WHERE generation = $4 AND lead_id = $1",
                vec![
                    lead.into(),
                    i64::from(points).into(),
                    position.into(),
                    generation.into(),
                ],
            ),
            LeadEvent::LeadQualified { .. } => (
                "UPDATE lead_board SET status = 'qualified', qualified_at = $2, \
                        updated_position = $3 WHERE generation = $4 AND lead_id = $1",
                vec![lead.into(), at.into(), position.into(), generation.into()],
            ),
            LeadEvent::LeadAssigned { owner, .. } => (
                "UPDATE lead_board SET owner = $2, \
                        status = CASE WHEN status = 'new' THEN 'working' ELSE status END, \
                        updated_position = $3 WHERE generation = $4 AND lead_id = $1",
                vec![
                    lead.into(),
                    owner.as_str().into(),
                    position.into(),
                    generation.into(),
                ],
            ),
            LeadEvent::LeadDisqualified { .. } => (
                "UPDATE lead_board SET status = 'disqualified', updated_position = $2 \
                  WHERE generation = $3 AND lead_id = $1",
                vec![lead.into(), position.into(), generation.into()],
            ),
            LeadEvent::LeadConverted {
                deal_id,
                account_id,
                ..
            } => (
                "UPDATE lead_board SET status = 'converted', converted_deal_id = $2, \
                        converted_account_id = $5, converted_at = $6, updated_position = $3 \
                  WHERE generation = $4 AND lead_id = $1",
                vec![
                    lead.into(),
                    deal_id.to_string().into(),
                    position.into(),
                    generation.into(),
                    account_id.to_string().into(),
                    at.into(),
                ],
            ),
        };
        tx.execute(sql, &params).await?;
        Ok(())
    }
}
