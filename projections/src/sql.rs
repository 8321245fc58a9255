//! The read-model database, on either backend, behind one small interface: a
//! transaction that runs SQL with typed parameters, for one generation of a projection.
//! Read-model SQL is written once, with `$1`-style placeholders, which both PostgreSQL
//! and sqlx's SQLite accept.

use std::sync::Arc;

use sqlx::{Postgres, Row, Sqlite, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::ProjectionError;

/// Where read models live: the event store's own database, so a projection's rows and
/// its checkpoint commit in one transaction.
#[derive(Debug, Clone)]
pub enum ReadDatabase {
    Sqlite {
        pool: sqlx::SqlitePool,
        /// The store's queue for writers (see `SqliteStore::write_gate`).
        gate: Arc<Mutex<()>>,
    },
    Postgres(sqlx::PgPool),
}

impl ReadDatabase {
    pub fn sqlite(store: &annals_store::SqliteStore) -> Self {
        ReadDatabase::Sqlite {
            pool: store.pool().clone(),
            gate: store.write_gate(),
        }
    }

    pub fn postgres(store: &annals_store::PostgresStore) -> Self {
        ReadDatabase::Postgres(store.pool().clone())
    }

    /// The read models' database of an opened backend: its event store's own.
    pub fn of(backend: &annals_store::Backend) -> Self {
        match backend {
            annals_store::Backend::Sqlite(store) => ReadDatabase::sqlite(store),
            annals_store::Backend::Postgres(store) => ReadDatabase::postgres(store),
        }
    }

    /// A transaction writing the given generation of a projection's tables.
    pub async fn begin_write(&self, generation: i64) -> Result<ReadTx, ProjectionError> {
        let (inner, turn) = match self {
            // In turn with this process's other writers, then taking the write lock at
            // once: a deferred transaction that reads and then writes could fail on a
            // lock it cannot upgrade.
            ReadDatabase::Sqlite { pool, gate } => {
                let turn = gate.clone().lock_owned().await;
                let tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                (Inner::Sqlite(tx), Some(turn))
            }
            ReadDatabase::Postgres(pool) => (Inner::Postgres(pool.begin().await?), None),
        };
        Ok(ReadTx {
            inner,
            generation,
            _turn: turn,
        })
    }

    /// A read-only transaction whose every statement sees the database as of its start:
    /// one answer to a query, however many statements it takes. On PostgreSQL
    /// `REPEATABLE READ READ ONLY`, said explicitly rather than left to the database's
    /// default; on SQLite a read transaction, which in WAL mode keeps the snapshot its
    /// first read takes, so that read is made here, before the caller's first statement.
    pub async fn begin_snapshot(&self) -> Result<ReadTx, ProjectionError> {
        // Any read of a table takes the snapshot, on both backends.
        const FIRST_READ: &str = "SELECT COUNT(*) FROM projections";
        let inner = match self {
            ReadDatabase::Sqlite { pool, .. } => {
                let mut tx = pool.begin_with("BEGIN DEFERRED").await?;
                sqlx::query(FIRST_READ).fetch_one(&mut *tx).await?;
                Inner::Sqlite(tx)
            }
            ReadDatabase::Postgres(pool) => {
                let mut tx = pool
                    .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    .await?;
                sqlx::query(FIRST_READ).fetch_one(&mut *tx).await?;
                Inner::Postgres(tx)
            }
        };
        Ok(ReadTx {
            inner,
            generation: 0,
            _turn: None,
        })
    }

    /// A transaction that only reads (on SQLite it takes no write lock).
    pub async fn begin_read(&self, generation: i64) -> Result<ReadTx, ProjectionError> {
        let inner = match self {
            ReadDatabase::Sqlite { pool, .. } => Inner::Sqlite(pool.begin().await?),
            ReadDatabase::Postgres(pool) => Inner::Postgres(pool.begin().await?),
        };
        Ok(ReadTx {
            inner,
            generation,
            _turn: None,
        })
    }
}

/// A parameter of a read-model statement. Each kind carries its own NULL, so PostgreSQL
/// knows the type of a missing value.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Text(Option<String>),
    Int(Option<i64>),
}

impl From<&str> for Param {
    fn from(value: &str) -> Self {
        Param::Text(Some(value.to_owned()))
    }
}

impl From<String> for Param {
    fn from(value: String) -> Self {
        Param::Text(Some(value))
    }
}

impl From<Option<String>> for Param {
    fn from(value: Option<String>) -> Self {
        Param::Text(value)
    }
}

impl From<i64> for Param {
    fn from(value: i64) -> Self {
        Param::Int(Some(value))
    }
}

#[derive(Debug)]
enum Inner {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

/// One transaction on the read-model database, for one generation of a projection.
#[derive(Debug)]
pub struct ReadTx {
    inner: Inner,
    generation: i64,
    /// A SQLite writer's turn, held until the transaction ends.
    _turn: Option<OwnedMutexGuard<()>>,
}

/// On PostgreSQL statements are not prepared (`persistent` false): each is planned with
/// its real arguments. Read-model tables grow from empty during a rebuild, and a plan
/// cached while one was empty kept scanning it whole (350 ms per batch at 100,000 rows);
/// a statement runs once per batch, so planning it each time costs little. SQLite plans
/// by its indexes, not by table sizes, and re-preparing its large multi-row statements
/// halved its rebuild rate, so there they are prepared once.
macro_rules! bound {
    ($sql:expr, $params:expr, $persistent:expr) => {{
        let mut query = sqlx::query($sql).persistent($persistent);
        for param in $params {
            query = match param {
                Param::Text(text) => query.bind(text.clone()),
                Param::Int(int) => query.bind(*int),
            };
        }
        query
    }};
}

impl ReadDatabase {
    /// Every row of one query, outside any transaction (one round trip: a single
    /// statement sees one snapshot anyway). Columns are all text (cast them in the SQL).
    pub async fn fetch_text_rows(
        &self,
        sql: &str,
        params: &[Param],
    ) -> Result<Vec<Vec<Option<String>>>, ProjectionError> {
        let rows = match self {
            ReadDatabase::Sqlite { pool, .. } => bound!(sql, params, true)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| (0..row.len()).map(|i| row.try_get(i)).collect())
                .collect::<Result<_, _>>()?,
            ReadDatabase::Postgres(pool) => bound!(sql, params, false)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| (0..row.len()).map(|i| row.try_get(i)).collect())
                .collect::<Result<_, _>>()?,
        };
        Ok(rows)
    }

    /// The integer in the first column of a query's first row, outside any transaction.
    pub async fn fetch_int(
        &self,
        sql: &str,
        params: &[Param],
    ) -> Result<Option<i64>, ProjectionError> {
        let value = match self {
            ReadDatabase::Sqlite { pool, .. } => bound!(sql, params, true)
                .fetch_optional(pool)
                .await?
                .map(|row| row.try_get::<Option<i64>, _>(0))
                .transpose()?,
            ReadDatabase::Postgres(pool) => bound!(sql, params, false)
                .fetch_optional(pool)
                .await?
                .map(|row| row.try_get::<Option<i64>, _>(0))
                .transpose()?,
        };
        Ok(value.flatten())
    }
}

impl ReadTx {
    /// The generation this transaction writes: every read-model row carries it.
    pub fn generation(&self) -> i64 {
        self.generation
    }

    /// The placeholder of the `n`-th parameter (from 1) in generated SQL whose
    /// parameters appear in binding order: `$n` on PostgreSQL, `?` on SQLite, where
    /// binding a named parameter looks its name up by a linear scan (quadratic in a
    /// statement of thousands of parameters).
    pub fn placeholder(&self, n: usize) -> String {
        match self.inner {
            Inner::Sqlite(_) => "?".to_owned(),
            Inner::Postgres(_) => format!("${n}"),
        }
    }

    /// What ends a `SELECT` that holds the rows it reads against writers until this
    /// transaction ends: `FOR SHARE` on PostgreSQL; nothing on SQLite, where a write
    /// transaction already excludes every other writer.
    pub fn share_lock(&self) -> &'static str {
        match self.inner {
            Inner::Sqlite(_) => "",
            Inner::Postgres(_) => " FOR SHARE",
        }
    }

    /// Runs one statement; returns the rows it changed.
    pub async fn execute(&mut self, sql: &str, params: &[Param]) -> Result<u64, ProjectionError> {
        let done = match &mut self.inner {
            Inner::Sqlite(tx) => bound!(sql, params, true)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
            Inner::Postgres(tx) => bound!(sql, params, false)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
        };
        Ok(done)
    }

    /// Runs a query whose first column is an integer; the value in its first row.
    pub async fn fetch_int(
        &mut self,
        sql: &str,
        params: &[Param],
    ) -> Result<Option<i64>, ProjectionError> {
        let value = match &mut self.inner {
            Inner::Sqlite(tx) => bound!(sql, params, true)
                .fetch_optional(&mut **tx)
                .await?
                .map(|row| row.try_get::<Option<i64>, _>(0))
                .transpose()?,
            Inner::Postgres(tx) => bound!(sql, params, false)
                .fetch_optional(&mut **tx)
                .await?
                .map(|row| row.try_get::<Option<i64>, _>(0))
                .transpose()?,
        };
        Ok(value.flatten())
    }

    /// Every row of a query whose columns are all text (cast them in the SQL).
    pub async fn fetch_text_rows(
        &mut self,
        sql: &str,
        params: &[Param],
    ) -> Result<Vec<Vec<Option<String>>>, ProjectionError> {
        let rows = match &mut self.inner {
            Inner::Sqlite(tx) => bound!(sql, params, true)
                .fetch_all(&mut **tx)
                .await?
                .iter()
                .map(|row| (0..row.len()).map(|i| row.try_get(i)).collect())
                .collect::<Result<_, _>>()?,
            Inner::Postgres(tx) => bound!(sql, params, false)
                .fetch_all(&mut **tx)
                .await?
                .iter()
                .map(|row| (0..row.len()).map(|i| row.try_get(i)).collect())
                .collect::<Result<_, _>>()?,
        };
        Ok(rows)
    }

    /// How the database would run a statement: PostgreSQL's `EXPLAIN`, or SQLite's
    /// `EXPLAIN QUERY PLAN` details, one line each.
    pub async fn explain(
        &mut self,
        sql: &str,
        params: &[Param],
    ) -> Result<String, ProjectionError> {
        let lines: Vec<String> = match &mut self.inner {
            Inner::Sqlite(tx) => {
                let explain = format!("EXPLAIN QUERY PLAN {sql}");
                bound!(&explain, params, false)
                    .fetch_all(&mut **tx)
                    .await?
                    .iter()
                    .map(|row| row.try_get("detail"))
                    .collect::<Result<_, _>>()?
            }
            Inner::Postgres(tx) => {
                let explain = format!("EXPLAIN {sql}");
                bound!(&explain, params, false)
                    .fetch_all(&mut **tx)
                    .await?
                    .iter()
                    .map(|row| row.try_get(0))
                    .collect::<Result<_, _>>()?
            }
        };
        Ok(lines.join("\n"))
    }

    pub async fn commit(self) -> Result<(), ProjectionError> {
        match self.inner {
            Inner::Sqlite(tx) => tx.commit().await?,
            Inner::Postgres(tx) => tx.commit().await?,
        }
        Ok(())
    }
}
