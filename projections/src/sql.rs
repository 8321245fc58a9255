//! The read-model database, on either backend, behind one small interface: a
//! transaction that runs SQL with typed parameters. Read-model SQL is written once, with
//! `$1`-style placeholders, which both PostgreSQL and sqlx's SQLite accept.

use sqlx::{Postgres, Sqlite, Transaction};

use crate::ProjectionError;

/// Where read models live: the event store's own database, so a projection's rows and
/// its checkpoint commit in one transaction.
#[derive(Debug, Clone)]
pub enum ReadDatabase {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl ReadDatabase {
    pub async fn begin(&self) -> Result<ReadTx, ProjectionError> {
        Ok(match self {
            ReadDatabase::Sqlite(pool) => ReadTx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?),
            ReadDatabase::Postgres(pool) => ReadTx::Postgres(pool.begin().await?),
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

/// One transaction on the read-model database.
#[derive(Debug)]
pub enum ReadTx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

macro_rules! bound {
    ($sql:expr, $params:expr) => {{
        let mut query = sqlx::query($sql);
        for param in $params {
            query = match param {
                Param::Text(text) => query.bind(text.clone()),
                Param::Int(int) => query.bind(*int),
            };
        }
        query
    }};
}

impl ReadTx {
    /// Runs one statement; returns the rows it changed.
    pub async fn execute(&mut self, sql: &str, params: &[Param]) -> Result<u64, ProjectionError> {
        let done = match self {
            ReadTx::Sqlite(tx) => bound!(sql, params)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
            ReadTx::Postgres(tx) => bound!(sql, params)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
        };
        Ok(done)
    }

    /// Runs a query whose one column is an integer, in the first row if any.
    pub async fn fetch_int(
        &mut self,
        sql: &str,
        params: &[Param],
    ) -> Result<Option<i64>, ProjectionError> {
        use sqlx::Row;
        let value = match self {
            ReadTx::Sqlite(tx) => bound!(sql, params)
                .fetch_optional(&mut **tx)
                .await?
                .map(|row| row.try_get::<i64, _>(0))
                .transpose()?,
            ReadTx::Postgres(tx) => bound!(sql, params)
                .fetch_optional(&mut **tx)
                .await?
                .map(|row| row.try_get::<i64, _>(0))
                .transpose()?,
        };
        Ok(value)
    }

    pub async fn commit(self) -> Result<(), ProjectionError> {
        match self {
            ReadTx::Sqlite(tx) => tx.commit().await?,
            ReadTx::Postgres(tx) => tx.commit().await?,
        }
        Ok(())
    }
}
