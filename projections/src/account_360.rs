//! `account_360`'s own rows: one per account with its profile (`domain.md`, read
//! models). The account's deals, won amounts and converted leads are read from the deal
//! and lead boards beside it.

use annals_domain::account::AccountEvent;
use annals_store::{LogFilter, RecordedEvent};
use async_trait::async_trait;

use crate::{
    Param, ProjectionError, Projector, ReadTx, Table, aggregate_id, decode, sql_int, time_text,
};

#[derive(Debug, Default)]
pub struct Account360;

#[async_trait]
impl Projector for Account360 {
    fn name(&self) -> &'static str {
        "account_360"
    }

    fn filter(&self) -> LogFilter {
        LogFilter::categories(["account"])
    }

    fn tables(&self) -> &'static [Table] {
        &[Table {
            name: "account_360",
            columns: &[
                "account_id",
                "name",
                "domain",
                "industry",
                "employees",
                "tier",
                "opened_at",
                "updated_position",
            ],
            key: "account_id",
        }]
    }

    async fn apply(&self, tx: &mut ReadTx, event: &RecordedEvent) -> Result<(), ProjectionError> {
        let decoded: AccountEvent = decode(event)?;
        let account = aggregate_id(event);
        let position = sql_int(event.position);
        let generation = tx.generation();
        let (sql, params): (&str, Vec<Param>) = match decoded {
            AccountEvent::AccountOpened {
                name,
                domain,
                industry,
                employees,
                tier,
                ..
            } => (
                "INSERT INTO account_360 (generation, account_id, name, domain, industry, \
                                          employees, tier, opened_at, updated_position) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                vec![
                    generation.into(),
                    account.into(),
                    name.as_str().into(),
                    domain.map(|d| d.as_str().to_owned()).into(),
                    industry.map(|i| i.as_str().to_owned()).into(),
                    Param::Int(employees.map(sql_int)),
                    tier.as_str().into(),
                    time_text(event).into(),
                    position.into(),
                ],
            ),
            AccountEvent::AccountRenamed { name, .. } => (
                "UPDATE account_360 SET name = $3, updated_position = $4 \
                  WHERE generation = $1 AND account_id = $2",
                vec![
                    generation.into(),
                    account.into(),
                    name.as_str().into(),
                    position.into(),
                ],
            ),
            AccountEvent::AccountTierChanged { tier, .. } => (
                "UPDATE account_360 SET tier = $3, updated_position = $4 \
                  WHERE generation = $1 AND account_id = $2",
                vec![
                    generation.into(),
                    account.into(),
                    tier.as_str().into(),
                    position.into(),
                ],
            ),
        };
        tx.execute(sql, &params).await?;
        Ok(())
    }
}
