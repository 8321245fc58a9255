//! The writer's side of the database, alike on every SQL backend: the writer task's
//! connection and its attempts (`Writer`, a `BatchWriter`), the commit of a planned batch
//! (`plan_and_commit`), and the data keys an append stores or shreds in its transaction.
//!
//! A write attempt that fails drops and closes its connection, so the next begins on a
//! fresh one; a batch whose facts proved too thin is rolled back and answered `None`, so
//! the writer task tries it again on more facts (see `BatchWriter`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::{Database, Pool, Transaction};
use tokio::sync::Mutex;

use super::{Dialect, PREPARED};
use crate::batch::{self, FactsSource, LogFacts, Plan, ValidAppend};
use crate::error::StoreError;
use crate::group_commit::BatchWriter;

/// What refuses a data key an append would store: its subject was erased, or the
/// database's master key is not the writer's.
pub(crate) fn key_refused(subject: &str) -> StoreError {
    StoreError::MasterKey(format!(
        "the data key of {subject} cannot be stored: its subject was erased, or the \
         database's master key changed while this process ran"
    ))
}

/// Stores the data keys of the streams a plan creates: no event of the subject exists,
/// so a key a refused capture left is replaced; a tombstone is not, and neither is any
/// key once the database's master key is not the writer's (PostgreSQL's
/// `annals_append` does the same in its statement).
pub(crate) async fn store_new_keys<DB: Dialect>(
    connection: &mut DB::Connection,
    plan: &Plan,
) -> Result<(), StoreError> {
    for (subject, wrapped, check) in &plan.new_keys {
        let done = DB::execute(
            connection,
            "INSERT INTO data_keys (subject, wrapped, created_at) \
             SELECT $1, $2, $3 WHERE EXISTS \
                 (SELECT 1 FROM master_key_check WHERE id = 1 AND check_value = $4) \
             ON CONFLICT (subject) DO UPDATE \
                SET wrapped = excluded.wrapped, created_at = excluded.created_at \
              WHERE data_keys.wrapped IS NOT NULL",
            &[
                subject.as_str().into(),
                wrapped.as_slice().into(),
                DB::time(key_time(plan)),
                check.as_slice().into(),
            ],
            PREPARED,
        )
        .await?;
        if DB::rows_affected(&done) == 0 {
            return Err(key_refused(subject));
        }
    }
    Ok(())
}

/// Destroys the data keys a plan shreds: each shredded subject's row keeps no key, and
/// says when (a subject without a row gets one, so a legacy subject is marked erased
/// too).
pub(crate) async fn shred_keys<DB: Dialect>(
    connection: &mut DB::Connection,
    plan: &Plan,
) -> Result<(), StoreError> {
    for subject in &plan.shredded {
        DB::execute(
            connection,
            "INSERT INTO data_keys (subject, wrapped, created_at, shredded_at) \
             VALUES ($1, NULL, $2, $2) \
             ON CONFLICT (subject) DO UPDATE SET wrapped = NULL, shredded_at = excluded.shredded_at",
            &[subject.as_str().into(), DB::time(key_time(plan))],
            PREPARED,
        )
        .await?;
    }
    Ok(())
}

/// When a plan's keys are stored or shredded: when its events are recorded.
fn key_time(plan: &Plan) -> DateTime<Utc> {
    plan.rows
        .first()
        .map_or_else(Utc::now, |row| row.recorded_at)
}

/// Plans the batch on `facts` in the open write transaction, inserts and commits; rolls
/// back and returns `None` when the facts proved too thin (see `BatchWriter`).
pub(crate) async fn plan_and_commit<DB: Dialect>(
    mut transaction: Transaction<'_, DB>,
    batch: &[ValidAppend],
    facts: LogFacts,
    source: FactsSource,
) -> Result<Option<Plan>, StoreError> {
    let planned_on_last = facts.last_position;
    let plan = batch::plan(batch, facts, Utc::now());
    if source != FactsSource::ReadWithIds && plan.needs_stored_ids() {
        transaction.rollback().await?;
        return Ok(None);
    }
    let inserted = DB::insert(&mut transaction, planned_on_last, &plan).await;
    if batch::stale_facts(inserted, source)? {
        transaction.rollback().await?;
        return Ok(None);
    }
    transaction.commit().await?;
    Ok(Some(plan))
}

/// The writer task's side of the database.
pub(super) struct Writer<DB: Database> {
    pub(super) pool: Pool<DB>,
    /// Kept between batches (taking it from the pool costs more than a round trip);
    /// dropped, and closed, after any error.
    pub(super) connection: Option<PoolConnection<DB>>,
    /// The gate and how long the writer waits for its turn there (a writer of this
    /// process that stalls inside its transaction must not stop every other for good).
    pub(super) gate: Option<(Arc<Mutex<()>>, Duration)>,
}

#[async_trait]
impl<DB: Dialect> BatchWriter for Writer<DB> {
    async fn write_attempt(
        &mut self,
        batch: &[ValidAppend],
        source: FactsSource,
        remembered: Option<LogFacts>,
    ) -> Result<Option<Plan>, StoreError> {
        let _turn = match &self.gate {
            Some((gate, timeout)) => Some(
                tokio::time::timeout(*timeout, gate.lock())
                    .await
                    .map_err(|_| StoreError::timed_out("the wait for the writers' turn ran out"))?,
            ),
            None => None,
        };
        let connection = match &mut self.connection {
            Some(connection) => connection,
            None => self.connection.insert(self.pool.acquire().await?),
        };
        let attempt = DB::write_attempt(connection, batch, source, remembered).await;
        if attempt.is_err()
            && let Some(mut connection) = self.connection.take()
        {
            connection.close_on_drop();
        }
        attempt
    }

    fn reset(&mut self) {
        if let Some(mut connection) = self.connection.take() {
            connection.close_on_drop();
        }
    }
}
