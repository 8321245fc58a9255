//! `deal_board`: one row per deal with its stage, status, amount, owner and account
//! (`domain.md`, read models); the pipeline's figures are aggregates of it.

use annals_domain::deal::DealEvent;
use annals_store::{LogFilter, RecordedEvent};
use async_trait::async_trait;

use crate::{
    Param, ProjectionError, Projector, ReadTx, Table, aggregate_id, decode, sql_int, time_text,
};

#[derive(Debug, Default)]
pub struct DealBoard;

#[async_trait]
impl Projector for DealBoard {
    fn name(&self) -> &'static str {
        "deal_board"
    }

    fn filter(&self) -> LogFilter {
        LogFilter::categories(["deal"])
    }

    fn tables(&self) -> &'static [Table] {
        &[Table {
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
        }]
    }

    async fn apply(&self, tx: &mut ReadTx, event: &RecordedEvent) -> Result<(), ProjectionError> {
        let decoded: DealEvent = decode(event)?;
        let deal = aggregate_id(event);
        let at = time_text(event);
        let micros = event.recorded_at.timestamp_micros();
        let position = sql_int(event.position);
        let generation = tx.generation();
        let (sql, params): (&str, Vec<Param>) = match decoded {
            DealEvent::DealOpened {
                account_id,
                name,
                amount,
                owner,
                expected_close,
                stage,
                ..
            } => (
                "INSERT INTO deal_board (generation, deal_id, account_id, name, stage, status, \
                                         currency, amount_minor, owner, expected_close, \
                                         opened_at, opened_micros, closed_at, closed_micros, \
                                         lost_reason, updated_position) \
                 VALUES ($1, $2, $3, $4, $5, 'open', $6, $7, $8, $9, $10, $11, NULL, NULL, \
                         NULL, $12)",
                vec![
                    generation.into(),
                    deal.into(),
                    account_id.to_string().into(),
                    name.as_str().into(),
                    stage.as_str().into(),
                    amount.currency.as_str().into(),
                    amount.amount_minor.into(),
                    owner.map(|o| o.as_str().to_owned()).into(),
                    expected_close.map(|d| d.to_string()).into(),
                    at.into(),
                    micros.into(),
                    position.into(),
                ],
            ),
            DealEvent::DealStageChanged { to, .. } => (
                "UPDATE deal_board SET stage = $3, updated_position = $4 \
                  WHERE generation = $1 AND deal_id = $2",
                vec![
                    generation.into(),
                    deal.into(),
                    to.as_str().into(),
                    position.into(),
                ],
            ),
            DealEvent::DealAmountChanged { to, .. } => (
                "UPDATE deal_board SET amount_minor = $3, updated_position = $4 \
                  WHERE generation = $1 AND deal_id = $2",
                vec![
                    generation.into(),
                    deal.into(),
                    to.amount_minor.into(),
                    position.into(),
                ],
            ),
            DealEvent::DealWon { .. } => (
                "UPDATE deal_board SET status = 'won', closed_at = $3, closed_micros = $4, \
                        updated_position = $5 WHERE generation = $1 AND deal_id = $2",
                vec![
                    generation.into(),
                    deal.into(),
                    at.into(),
                    micros.into(),
                    position.into(),
                ],
            ),
            DealEvent::DealLost { reason } => (
                "UPDATE deal_board SET status = 'lost', closed_at = $3, closed_micros = $4, \
                        lost_reason = $5, updated_position = $6 \
                  WHERE generation = $1 AND deal_id = $2",
                vec![
                    generation.into(),
                    deal.into(),
                    at.into(),
                    micros.into(),
                    reason.as_str().into(),
                    position.into(),
                ],
            ),
        };
        tx.execute(sql, &params).await?;
        Ok(())
    }
}
