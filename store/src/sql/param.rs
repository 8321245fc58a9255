//! Statements and columns, alike on every SQL database: the values bound to a
//! statement's placeholders (`Param`), and the one way the store runs a statement and
//! reads a column (`Sql`), written once over sqlx's `Database` with the bounds it needs.
//!
//! Numbers cross into SQL as `i64`; a missing text or integer is a typed NULL, so
//! PostgreSQL knows the type of a missing value.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde_json::Value;
use sqlx::database::HasStatementCache;
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Row, Type};

use crate::error::StoreError;
use crate::model::to_sql_int;

/// A value bound to a statement's placeholder. Text and integers carry their own NULL,
/// so PostgreSQL knows the type of a missing value.
#[derive(Debug, Clone, PartialEq)]
pub enum Param<'a> {
    Text(Option<Cow<'a, str>>),
    Int(Option<i64>),
    Bytes(&'a [u8]),
    Time(DateTime<Utc>),
}

/// A count or position: numbers cross into SQL as `i64`, and the store never hands out
/// more than `i64::MAX`.
impl From<u64> for Param<'_> {
    fn from(n: u64) -> Self {
        Param::Int(Some(to_sql_int(n)))
    }
}

/// A limit.
impl From<usize> for Param<'_> {
    fn from(n: usize) -> Self {
        Param::Int(Some(i64::try_from(n).unwrap_or(i64::MAX)))
    }
}

impl From<i64> for Param<'_> {
    fn from(n: i64) -> Self {
        Param::Int(Some(n))
    }
}

impl<'a> From<&'a str> for Param<'a> {
    fn from(text: &'a str) -> Self {
        Param::Text(Some(Cow::Borrowed(text)))
    }
}

impl From<String> for Param<'_> {
    fn from(text: String) -> Self {
        Param::Text(Some(Cow::Owned(text)))
    }
}

impl From<Option<String>> for Param<'_> {
    fn from(text: Option<String>) -> Self {
        Param::Text(text.map(Cow::Owned))
    }
}

impl<'a> From<&'a [u8]> for Param<'a> {
    fn from(bytes: &'a [u8]) -> Self {
        Param::Bytes(bytes)
    }
}

/// Whether a statement is prepared once and its plan kept (`true` for the store's own,
/// whose tables' shapes do not change), or planned afresh with its arguments each time.
pub(crate) const PREPARED: bool = true;

/// Runs statements with `Param`s and reads columns, on any database sqlx serves with the
/// types the store uses. The bounds are written once, on the one implementation below.
pub(crate) trait Sql: Database {
    fn fetch_all<'a>(
        connection: &'a mut Self::Connection,
        sql: &'a str,
        params: &'a [Param<'a>],
        prepared: bool,
    ) -> BoxFuture<'a, Result<Vec<Self::Row>, sqlx::Error>>;

    fn fetch_optional<'a>(
        connection: &'a mut Self::Connection,
        sql: &'a str,
        params: &'a [Param<'a>],
        prepared: bool,
    ) -> BoxFuture<'a, Result<Option<Self::Row>, sqlx::Error>>;

    fn fetch<'a>(
        connection: &'a mut Self::Connection,
        sql: &'a str,
    ) -> BoxStream<'a, Result<Self::Row, sqlx::Error>>;

    fn execute<'a>(
        connection: &'a mut Self::Connection,
        sql: &'a str,
        params: &'a [Param<'a>],
        prepared: bool,
    ) -> BoxFuture<'a, Result<Self::QueryResult, sqlx::Error>>;

    fn int(row: &Self::Row, column: &str) -> Result<Option<i64>, sqlx::Error>;
    fn text(row: &Self::Row, column: &str) -> Result<Option<String>, sqlx::Error>;
    fn bytes(row: &Self::Row, column: &str) -> Result<Option<Vec<u8>>, sqlx::Error>;
    /// A JSON column read from the text stored (see `chain`).
    fn json(row: &Self::Row, column: &str) -> Result<Value, StoreError>;
    /// Every column of a row, as text (the statement casts them).
    fn texts(row: &Self::Row) -> Result<Vec<Option<String>>, sqlx::Error>;
    /// The first column of a row, as an integer.
    fn first_int(row: &Self::Row) -> Result<Option<i64>, sqlx::Error>;

    /// A column that may not be NULL.
    fn required<T>(
        read: fn(&Self::Row, &str) -> Result<Option<T>, sqlx::Error>,
        row: &Self::Row,
        column: &str,
    ) -> Result<T, StoreError> {
        read(row, column)?.ok_or_else(|| StoreError::Corrupt(format!("{column} is NULL")))
    }

    /// A count, version or position: never negative.
    fn count(row: &Self::Row, column: &str) -> Result<u64, StoreError> {
        let n = Self::required(Self::int, row, column)?;
        u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("{column} is negative")))
    }
}

impl<DB> Sql for DB
where
    DB: Database + HasStatementCache,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> Option<i64>: Encode<'q, DB>,
    for<'q> Option<&'q str>: Encode<'q, DB>,
    for<'q> i64: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'q> String: Decode<'q, DB> + Type<DB>,
    for<'q> Vec<u8>: Decode<'q, DB> + Type<DB>,
    for<'q> DateTime<Utc>: Encode<'q, DB> + Type<DB>,
    for<'a> &'a str: ColumnIndex<DB::Row>,
    usize: ColumnIndex<DB::Row>,
{
    fn fetch_all<'a>(
        connection: &'a mut DB::Connection,
        sql: &'a str,
        params: &'a [Param<'a>],
        prepared: bool,
    ) -> BoxFuture<'a, Result<Vec<DB::Row>, sqlx::Error>> {
        Box::pin(query::<DB>(sql, params, prepared).fetch_all(connection))
    }

    fn fetch_optional<'a>(
        connection: &'a mut DB::Connection,
        sql: &'a str,
        params: &'a [Param<'a>],
        prepared: bool,
    ) -> BoxFuture<'a, Result<Option<DB::Row>, sqlx::Error>> {
        Box::pin(query::<DB>(sql, params, prepared).fetch_optional(connection))
    }

    fn fetch<'a>(
        connection: &'a mut DB::Connection,
        sql: &'a str,
    ) -> BoxStream<'a, Result<DB::Row, sqlx::Error>> {
        sqlx::query::<DB>(sql).fetch(connection)
    }

    fn execute<'a>(
        connection: &'a mut DB::Connection,
        sql: &'a str,
        params: &'a [Param<'a>],
        prepared: bool,
    ) -> BoxFuture<'a, Result<DB::QueryResult, sqlx::Error>> {
        Box::pin(query::<DB>(sql, params, prepared).execute(connection))
    }

    fn int(row: &DB::Row, column: &str) -> Result<Option<i64>, sqlx::Error> {
        row.try_get(column)
    }

    fn text(row: &DB::Row, column: &str) -> Result<Option<String>, sqlx::Error> {
        row.try_get(column)
    }

    fn bytes(row: &DB::Row, column: &str) -> Result<Option<Vec<u8>>, sqlx::Error> {
        row.try_get(column)
    }

    fn texts(row: &DB::Row) -> Result<Vec<Option<String>>, sqlx::Error> {
        (0..row.len()).map(|i| row.try_get(i)).collect()
    }

    fn first_int(row: &DB::Row) -> Result<Option<i64>, sqlx::Error> {
        row.try_get(0)
    }

    fn json(row: &DB::Row, column: &str) -> Result<Value, StoreError> {
        let text: &str = row.try_get(column)?;
        serde_json::from_str(text).map_err(|_| StoreError::Corrupt(format!("{column} is not JSON")))
    }
}

fn query<'a, DB>(
    sql: &'a str,
    params: &'a [Param<'a>],
    prepared: bool,
) -> sqlx::query::Query<'a, DB, DB::Arguments<'a>>
where
    DB: Database + HasStatementCache,
    for<'q> Option<i64>: Encode<'q, DB>,
    for<'q> Option<&'q str>: Encode<'q, DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'q> DateTime<Utc>: Encode<'q, DB> + Type<DB>,
{
    let query = sqlx::query::<DB>(sql).persistent(prepared);
    params.iter().fold(query, |query, param| match param {
        Param::Int(n) => query.bind(*n),
        Param::Text(text) => query.bind(text.as_deref()),
        Param::Bytes(bytes) => query.bind(*bytes),
        Param::Time(at) => query.bind(*at),
    })
}
