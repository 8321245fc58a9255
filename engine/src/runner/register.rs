//! Registering a consumer: its row in `projections`, and a read model's tables and
//! indexes as its `row!` declares them.

use std::sync::atomic::Ordering;

use super::ConsumerRunner;
use crate::{ConsumerError, ConsumerKind, Table};

impl ConsumerRunner {
    /// Makes what the database lacks of the projection: its row in `projections`, its
    /// tables and their indexes as declared; refuses a table that lacks a declared column
    /// (`TableChanged`). Once per runner (later calls cost nothing); every use of the
    /// projection does it first, and a process calls it at start so that its queries
    /// find the tables before the runner's first step. What exists is found in the
    /// catalog, so a process that finds everything made takes no lock and writes nothing.
    pub async fn register(&self) -> Result<(), ConsumerError> {
        if self.registered.load(Ordering::Relaxed) {
            return Ok(());
        }
        let name = self.name();
        let known = self
            .db
            .fetch_int(
                "SELECT COUNT(*) FROM projections WHERE name = $1",
                &[name.into()],
            )
            .await?;
        if known == Some(0) {
            let mut tx = self.db.begin_write(0).await?;
            tx.execute(
                "INSERT INTO projections (name, live_generation, rebuilding) \
                 VALUES ($1, 1, NULL) ON CONFLICT (name) DO NOTHING",
                &[name.into()],
            )
            .await?;
            if self.kind() != ConsumerKind::ReadModel {
                // A process that followed the log before the one runtime kept its
                // checkpoint in `process_checkpoints`: it goes on from there.
                tx.execute(
                    "INSERT INTO projection_checkpoints (name, generation, position) \
                     SELECT name, 1, position FROM process_checkpoints WHERE name = $1 \
                     ON CONFLICT (name, generation) DO NOTHING",
                    &[name.into()],
                )
                .await?;
            }
            tx.commit().await?;
        }
        for table in self.consumer.tables() {
            let mut attempts = 0;
            loop {
                match self.make_missing(table).await {
                    Ok(()) => break,
                    // Two processes making one table or index at once: PostgreSQL refuses
                    // the one that commits second, which then finds it made.
                    Err(ConsumerError::Database(error)) if error.is_refusal() && attempts < 3 => {
                        attempts += 1;
                    }
                    Err(error) => return Err(error),
                }
            }
        }
        self.registered.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Makes a declared table that does not exist, with its indexes; or, for one that
    /// does, checks its columns and makes the indexes it lacks. A table made here is
    /// empty, so the projection's checkpoints go with it in the same transaction and the
    /// projection applies the log again from position 0 (a table an operator dropped is
    /// rebuilt, never left missing the history before its checkpoint).
    pub(crate) async fn make_missing(&self, table: &Table) -> Result<(), ConsumerError> {
        let made = self.db.schema_of(table.name).await?;
        if made.is_empty() {
            let mut tx = self.db.begin_write(0).await?;
            for statement in table.create_statements() {
                tx.execute(&statement, &[]).await?;
            }
            tx.execute(
                "DELETE FROM projection_checkpoints WHERE name = $1",
                &[self.name().into()],
            )
            .await?;
            return tx.commit().await;
        }
        let sql = format!(
            "SELECT {} FROM {} WHERE 1 = 0",
            table.columns.join(", "),
            table.name
        );
        if let Err(error) = self.db.fetch_text_rows(&sql, &[]).await {
            return Err(match error {
                ConsumerError::Database(error) if error.is_refusal() => {
                    ConsumerError::TableChanged {
                        projection: self.name().to_owned(),
                        table: table.name.to_owned(),
                        refusal: error,
                    }
                }
                error => error,
            });
        }
        for index in table.indexes {
            if !made.iter().any(|name| name == index.name) {
                let mut tx = self.db.begin_write(0).await?;
                tx.execute(&table.create_index_statement(index), &[])
                    .await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }
}
