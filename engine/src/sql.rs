//! The read-model database: the tables beside the log (`annals_store::Tables`), on the
//! event store's own database, so a projection's rows and its checkpoint commit in one
//! transaction; each transaction writes or reads one generation of a projection.
//! Read-model SQL is written once, with `$1`-style placeholders, which every backend
//! accepts (see `annals_store::Tables` for what differs and where).

use std::sync::Arc;
use std::time::Duration;

use annals_store::{Backend, Lease, LeaseState, Param, Tables, TablesTx};

use crate::ConsumerError;

/// Where read models live.
#[derive(Debug, Clone)]
pub struct ReadDatabase(Arc<dyn Tables>);

impl ReadDatabase {
    pub fn new(tables: Arc<dyn Tables>) -> Self {
        ReadDatabase(tables)
    }

    /// The read models' database of an opened backend: its event store's own.
    pub fn of(backend: &Backend) -> Self {
        ReadDatabase(backend.tables())
    }

    /// A transaction writing the given generation of a projection's tables.
    pub async fn begin_write(&self, generation: i64) -> Result<ReadTx, ConsumerError> {
        Ok(ReadTx {
            inner: self
                .0
                .begin_write()
                .await
                .map_err(ConsumerError::Database)?,
            generation,
        })
    }

    /// A read-only transaction whose every statement sees the database as of its start:
    /// one answer to a query, however many statements it takes.
    pub async fn begin_snapshot(&self) -> Result<ReadTx, ConsumerError> {
        Ok(ReadTx {
            inner: self
                .0
                .begin_snapshot()
                .await
                .map_err(ConsumerError::Database)?,
            generation: 0,
        })
    }

    /// A transaction that only reads (on SQLite it takes no write lock).
    pub async fn begin_read(&self, generation: i64) -> Result<ReadTx, ConsumerError> {
        Ok(ReadTx {
            inner: self.0.begin_read().await.map_err(ConsumerError::Database)?,
            generation,
        })
    }

    /// Every row of one query, outside any transaction (one round trip: a single
    /// statement sees one snapshot anyway). Columns are all text (cast them in the SQL).
    pub async fn fetch_text_rows(
        &self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<Vec<Option<String>>>, ConsumerError> {
        self.0
            .fetch_text_rows(sql, params)
            .await
            .map_err(ConsumerError::Database)
    }

    /// The integer in the first column of a query's first row, outside any transaction.
    pub async fn fetch_int(
        &self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Option<i64>, ConsumerError> {
        self.0
            .fetch_int(sql, params)
            .await
            .map_err(ConsumerError::Database)
    }

    /// The names of a table and of its indexes, from the catalog; none when there is no
    /// such table.
    pub async fn schema_of(&self, table: &str) -> Result<Vec<String>, ConsumerError> {
        self.0
            .schema_of(table)
            .await
            .map_err(ConsumerError::Database)
    }

    /// Tries to take a consumer's lease (`projection.{name}`) for `holder`, for `life`;
    /// `None` while another holds it.
    pub(crate) async fn try_lease(
        &self,
        consumer: &str,
        holder: &str,
        life: Duration,
    ) -> Result<Option<Lease>, ConsumerError> {
        Ok(self
            .0
            .try_lease(&lease_name(consumer), holder, life)
            .await?)
    }

    /// Renews a lease for `life`; `false` when another process took it over.
    pub(crate) async fn renew_lease(
        &self,
        lease: &Lease,
        life: Duration,
    ) -> Result<bool, ConsumerError> {
        Ok(self.0.renew_lease(lease, life).await?)
    }

    /// Gives a lease back: another process may take it at once.
    pub(crate) async fn release_lease(&self, lease: &Lease) -> Result<(), ConsumerError> {
        Ok(self.0.release_lease(lease).await?)
    }

    /// The row of a consumer's lease, when it was ever taken.
    pub async fn lease_of(&self, consumer: &str) -> Result<Option<LeaseState>, ConsumerError> {
        let name = lease_name(consumer);
        Ok(self.0.lease(&name).await?)
    }
}

/// The name of a consumer's lease in the store's `leases`.
pub(crate) fn lease_name(consumer: &str) -> String {
    format!("projection.{consumer}")
}

/// One transaction on the read-model database, for one generation of a projection.
#[derive(Debug)]
pub struct ReadTx {
    inner: Box<dyn TablesTx>,
    generation: i64,
}

impl ReadTx {
    /// The generation this transaction writes: every read-model row carries it.
    pub fn generation(&self) -> i64 {
        self.generation
    }

    /// See `TablesTx::placeholder`.
    pub fn placeholder(&self, n: usize) -> String {
        self.inner.placeholder(n)
    }

    /// See `TablesTx::share_lock`.
    pub fn share_lock(&self) -> &'static str {
        self.inner.share_lock()
    }

    /// See `TablesTx::now_micros`: the database's clock, in SQL.
    pub fn now_micros(&self) -> &'static str {
        self.inner.now_micros()
    }

    /// See `TablesTx::fence`.
    pub(crate) async fn fence(&mut self, lease: &Lease) -> Result<bool, ConsumerError> {
        self.inner
            .fence(lease)
            .await
            .map_err(ConsumerError::Database)
    }

    /// Runs one statement; returns the rows it changed.
    pub async fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, ConsumerError> {
        self.inner
            .execute(sql, params)
            .await
            .map_err(ConsumerError::Database)
    }

    /// Runs a query whose first column is an integer; the value in its first row.
    pub async fn fetch_int(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Option<i64>, ConsumerError> {
        self.inner
            .fetch_int(sql, params)
            .await
            .map_err(ConsumerError::Database)
    }

    /// Every row of a query whose columns are all text (cast them in the SQL).
    pub async fn fetch_text_rows(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<Vec<Option<String>>>, ConsumerError> {
        self.inner
            .fetch_text_rows(sql, params)
            .await
            .map_err(ConsumerError::Database)
    }

    /// How the database would run a statement: PostgreSQL's `EXPLAIN`, or SQLite's
    /// `EXPLAIN QUERY PLAN` details, one line each.
    pub async fn explain(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<String, ConsumerError> {
        self.inner
            .explain(sql, params)
            .await
            .map_err(ConsumerError::Database)
    }

    pub async fn commit(self) -> Result<(), ConsumerError> {
        self.inner.commit().await.map_err(ConsumerError::Database)
    }
}
