//! The tables kept beside the log (the read models, and later the processes' state), on
//! the event store's own database so that their rows and a checkpoint commit in one
//! transaction, and the leases that spread consumers between the processes sharing it
//! (their statements are `leases`'s).
//!
//! Statements are written once for every backend, with `$1`-style placeholders (or
//! `placeholder(n)` in generated SQL) and `Param`s; rows come back as integers or text
//! (the statement casts its columns). What differs between backends is the dialect's
//! (`sql::Dialect`); this module is written once over it.
//!
//! Invariants: a write transaction on SQLite takes its turn at this process's write gate
//! with the appends, then the write lock at once (a deferred transaction that reads and
//! then writes could fail on a lock it cannot upgrade); a snapshot transaction sees one
//! snapshot from before its caller's first statement; leases are `leases`'s (taken,
//! renewed, released and fenced by the database's clock, on every backend alike).

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::{Database, Transaction};
use tokio::sync::OwnedMutexGuard;

use crate::error::StoreError;
use crate::leases::{self, Lease, LeaseState};
use crate::sql::{Dialect, Param, SqlStore};

/// The tables beside the log, on one database.
#[async_trait]
pub trait Tables: Send + Sync + Debug {
    /// A transaction that writes.
    async fn begin_write(&self) -> Result<Box<dyn TablesTx>, StoreError>;

    /// A read-only transaction whose every statement sees the database as of its start:
    /// one answer to a query, however many statements it takes.
    async fn begin_snapshot(&self) -> Result<Box<dyn TablesTx>, StoreError>;

    /// A transaction that only reads (on SQLite it takes no write lock).
    async fn begin_read(&self) -> Result<Box<dyn TablesTx>, StoreError>;

    /// Every row of one query, outside any transaction (one round trip: a single
    /// statement sees one snapshot anyway); its columns are all text.
    async fn fetch_text_rows(
        &self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<Vec<Option<String>>>, StoreError>;

    /// The integer in the first column of a query's first row, outside any transaction.
    async fn fetch_int(&self, sql: &str, params: &[Param<'_>]) -> Result<Option<i64>, StoreError>;

    /// Tries to take the lease `name` for `holder`, for `life` from now by the database's
    /// clock: a new one, or one whose expiry has passed (taken over at a higher epoch);
    /// `None` while another holds it unexpired (see `leases`).
    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        life: Duration,
    ) -> Result<Option<Lease>, StoreError>;

    /// Renews a lease for `life` from now, by its holder and epoch (also after its expiry,
    /// as long as nobody took it over); `false` when it was taken over.
    async fn renew_lease(&self, lease: &Lease, life: Duration) -> Result<bool, StoreError>;

    /// Gives a lease back: it expires now, so another takes it at once.
    async fn release_lease(&self, lease: &Lease) -> Result<(), StoreError>;

    /// The row of the lease `name`, with the database's clock; `None` when never taken.
    async fn lease(&self, name: &str) -> Result<Option<LeaseState>, StoreError>;

    /// The names of a table and of its indexes, as the catalog has them; none when there
    /// is no such table. Reading it takes no lock on the table.
    async fn schema_of(&self, table: &str) -> Result<Vec<String>, StoreError>;
}

/// One transaction on the tables beside the log.
#[async_trait]
pub trait TablesTx: Send + Debug {
    /// The placeholder of the `n`-th parameter (from 1) in generated SQL whose parameters
    /// appear in binding order: `$n` on PostgreSQL, `?` on SQLite, where binding a named
    /// parameter looks its name up by a linear scan (quadratic in a statement of
    /// thousands of parameters).
    fn placeholder(&self, n: usize) -> String;

    /// What ends a `SELECT` that holds the rows it reads against writers until this
    /// transaction ends: `FOR SHARE` on PostgreSQL; nothing on SQLite, where a write
    /// transaction already excludes every other writer.
    fn share_lock(&self) -> &'static str;

    /// An SQL expression for the database's clock now, in microseconds since the epoch
    /// (on PostgreSQL the time of the statement's evaluation, not the transaction's).
    fn now_micros(&self) -> &'static str;

    /// Whether `lease` is still its holder's at its epoch, and unexpired, by the
    /// database's clock; holds the lease's row until this transaction ends, so that no
    /// take-over commits before it. A transaction that moves a checkpoint under a lease
    /// asks this, and rolls back on `false`.
    async fn fence(&mut self, lease: &Lease) -> Result<bool, StoreError>;

    /// Runs one statement; returns the rows it changed.
    async fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, StoreError>;

    /// Runs a query whose first column is an integer; the value in its first row.
    async fn fetch_int(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Option<i64>, StoreError>;

    /// Every row of a query whose columns are all text.
    async fn fetch_text_rows(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<Vec<Option<String>>>, StoreError>;

    /// How the database would run a statement, one line a step.
    async fn explain(&mut self, sql: &str, params: &[Param<'_>]) -> Result<String, StoreError>;

    async fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// A transaction on the tables, and a SQLite writer's turn, held until it ends.
#[derive(Debug)]
struct Tx<DB: Database> {
    transaction: Transaction<'static, DB>,
    _turn: Option<OwnedMutexGuard<()>>,
}

impl<DB: Dialect> Tx<DB> {
    fn of(transaction: Transaction<'static, DB>) -> Box<dyn TablesTx> {
        Box::new(Tx {
            transaction,
            _turn: None,
        })
    }
}

async fn fetch_text_rows<DB: Dialect>(
    connection: &mut DB::Connection,
    sql: &str,
    params: &[Param<'_>],
) -> Result<Vec<Vec<Option<String>>>, StoreError> {
    let rows = DB::fetch_all(connection, sql, params, DB::PREPARE_TABLE_STATEMENTS).await?;
    Ok(rows.iter().map(DB::texts).collect::<Result<_, _>>()?)
}

async fn fetch_int<DB: Dialect>(
    connection: &mut DB::Connection,
    sql: &str,
    params: &[Param<'_>],
) -> Result<Option<i64>, StoreError> {
    let row = DB::fetch_optional(connection, sql, params, DB::PREPARE_TABLE_STATEMENTS).await?;
    Ok(row.as_ref().map(DB::first_int).transpose()?.flatten())
}

#[async_trait]
impl<DB: Dialect> Tables for SqlStore<DB> {
    async fn begin_write(&self) -> Result<Box<dyn TablesTx>, StoreError> {
        let turn = match self.gate() {
            Some(gate) => Some(gate.lock_owned().await),
            None => None,
        };
        let transaction = self.pool().begin_with(DB::BEGIN_TABLES_WRITE).await?;
        Ok(Box::new(Tx {
            transaction,
            _turn: turn,
        }))
    }

    async fn begin_snapshot(&self) -> Result<Box<dyn TablesTx>, StoreError> {
        let mut transaction = self.pool().begin_with(DB::BEGIN_SNAPSHOT).await?;
        // Any read of a table takes the snapshot, on both backends.
        fetch_int::<DB>(&mut transaction, "SELECT COUNT(*) FROM log_head", &[]).await?;
        Ok(Tx::of(transaction))
    }

    async fn begin_read(&self) -> Result<Box<dyn TablesTx>, StoreError> {
        Ok(Tx::of(self.pool().begin().await?))
    }

    async fn fetch_text_rows(
        &self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<Vec<Option<String>>>, StoreError> {
        fetch_text_rows::<DB>(&mut *self.pool().acquire().await?, sql, params).await
    }

    async fn fetch_int(&self, sql: &str, params: &[Param<'_>]) -> Result<Option<i64>, StoreError> {
        fetch_int::<DB>(&mut *self.pool().acquire().await?, sql, params).await
    }

    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        life: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let mut tx = self.begin_write().await?;
        let mut epoch = tx
            .fetch_int(
                &leases::take_sql(DB::NOW_MICROS),
                &[name.into(), holder.into(), leases::micros(life).into()],
            )
            .await?;
        tx.commit().await?;
        if epoch.is_none() {
            // Held: by a process of this host that is gone, it is taken over now.
            let held = self.lease(name).await?;
            if let Some(gone) = held.filter(|held| leases::is_gone(&held.holder)) {
                let mut tx = self.begin_write().await?;
                epoch = tx
                    .fetch_int(
                        &leases::take_from_gone_sql(DB::NOW_MICROS),
                        &[
                            name.into(),
                            gone.holder.as_str().into(),
                            gone.epoch.into(),
                            holder.into(),
                            leases::micros(life).into(),
                        ],
                    )
                    .await?;
                tx.commit().await?;
                if epoch.is_some() {
                    tracing::info!(
                        lease = name,
                        gone = gone.holder,
                        "lease of a process gone taken over"
                    );
                }
            }
        }
        Ok(epoch.map(|epoch| Lease {
            name: name.to_owned(),
            holder: holder.to_owned(),
            epoch: u64::try_from(epoch).unwrap_or(0),
        }))
    }

    async fn renew_lease(&self, lease: &Lease, life: Duration) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let renewed = tx
            .execute(
                &leases::renew_sql(DB::NOW_MICROS),
                &[
                    lease.name.as_str().into(),
                    lease.holder.as_str().into(),
                    lease.epoch.into(),
                    leases::micros(life).into(),
                ],
            )
            .await?;
        tx.commit().await?;
        Ok(renewed == 1)
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        tx.execute(
            &leases::release_sql(DB::NOW_MICROS),
            &[
                lease.name.as_str().into(),
                lease.holder.as_str().into(),
                lease.epoch.into(),
            ],
        )
        .await?;
        tx.commit().await
    }

    async fn lease(&self, name: &str) -> Result<Option<LeaseState>, StoreError> {
        let rows = self
            .fetch_text_rows(&leases::state_sql(DB::NOW_MICROS), &[name.into()])
            .await?;
        let corrupt = || StoreError::Corrupt("a lease's row".into());
        rows.into_iter()
            .next()
            .map(|row| {
                let text = |i: usize| row.get(i).cloned().flatten().ok_or_else(corrupt);
                let int = |i: usize| text(i)?.parse::<i64>().map_err(|_| corrupt());
                Ok(LeaseState {
                    name: text(0)?,
                    holder: text(1)?,
                    epoch: u64::try_from(int(2)?).map_err(|_| corrupt())?,
                    expires_micros: int(3)?,
                    taken_micros: int(4)?,
                    now_micros: int(5)?,
                })
            })
            .transpose()
    }

    async fn schema_of(&self, table: &str) -> Result<Vec<String>, StoreError> {
        let rows = self.fetch_text_rows(DB::SCHEMA_OF, &[table.into()]).await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| row.into_iter().next().flatten())
            .collect())
    }
}

#[async_trait]
impl<DB: Dialect> TablesTx for Tx<DB> {
    fn placeholder(&self, n: usize) -> String {
        DB::placeholder(n)
    }

    fn share_lock(&self) -> &'static str {
        DB::SHARE_LOCK
    }

    fn now_micros(&self) -> &'static str {
        DB::NOW_MICROS
    }

    async fn fence(&mut self, lease: &Lease) -> Result<bool, StoreError> {
        let held = fetch_int::<DB>(
            &mut self.transaction,
            &leases::fence_sql(DB::NOW_MICROS, DB::SHARE_LOCK),
            &[
                lease.name.as_str().into(),
                lease.holder.as_str().into(),
                lease.epoch.into(),
            ],
        )
        .await?;
        Ok(held.is_some())
    }

    async fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, StoreError> {
        let done = DB::execute(
            &mut self.transaction,
            sql,
            params,
            DB::PREPARE_TABLE_STATEMENTS,
        )
        .await?;
        Ok(DB::rows_affected(&done))
    }

    async fn fetch_int(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Option<i64>, StoreError> {
        fetch_int::<DB>(&mut self.transaction, sql, params).await
    }

    async fn fetch_text_rows(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<Vec<Option<String>>>, StoreError> {
        fetch_text_rows::<DB>(&mut self.transaction, sql, params).await
    }

    async fn explain(&mut self, sql: &str, params: &[Param<'_>]) -> Result<String, StoreError> {
        let explain = format!("{}{sql}", DB::EXPLAIN);
        let rows = DB::fetch_all(&mut self.transaction, &explain, params, false).await?;
        let lines = rows
            .iter()
            .map(|row| DB::required(DB::text, row, DB::EXPLAIN_COLUMN))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(lines.join("\n"))
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        Ok(self.transaction.commit().await?)
    }
}
