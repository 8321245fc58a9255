//! Read models whose rows fold from events: a batch loads the rows its events touch in
//! one query, applies the events to them in memory (pure functions), and writes the
//! changed rows back with multi-row upserts. A batch of thousands of events costs a
//! handful of statements, not one per event.
//!
//! A row is declared once (`row!`): the struct is the table's columns, with its key and
//! the indexes its queries need; `Table` is what the runner creates from it, and what
//! rebuild and verify see of it.

use std::collections::HashMap;
use std::fmt::Debug;

use annals_store::RecordedEvent;
use async_trait::async_trait;

use crate::{ConsumerError, Failure, Param, Projector, ReadTx};

/// A read-model table, declared once (by `row!`): what creates it, and what rebuild and
/// verify see of it.
#[derive(Debug, Clone, Copy)]
pub struct Table {
    pub name: &'static str,
    /// The columns compared by verify (all but `generation`).
    pub columns: &'static [&'static str],
    /// Each column's SQL type and nullability, in `columns` order.
    pub types: &'static [&'static str],
    /// The key column, for a stable order; with `generation`, the primary key.
    pub key: &'static str,
    pub indexes: &'static [Index],
}

/// An index of a read-model table, for its queries; led by `generation`, as every
/// read-model query is.
#[derive(Debug, Clone, Copy)]
pub struct Index {
    pub name: &'static str,
    /// The columns after `generation`, with any `DESC`.
    pub columns: &'static str,
    /// A partial index's condition: the rows it holds.
    pub only_where: Option<&'static str>,
}

impl Table {
    /// The statement that creates the table, in SQL both backends accept.
    pub fn create_table_statement(&self) -> String {
        let columns: String = self
            .columns
            .iter()
            .zip(self.types)
            .map(|(column, kind)| format!("{column} {kind}, "))
            .collect();
        format!(
            "CREATE TABLE IF NOT EXISTS {} (generation BIGINT NOT NULL, {columns}\
             PRIMARY KEY (generation, {}))",
            self.name, self.key
        )
    }

    /// The statement that creates one of its indexes.
    pub fn create_index_statement(&self, index: &Index) -> String {
        let only = index
            .only_where
            .map(|only| format!(" WHERE {only}"))
            .unwrap_or_default();
        format!(
            "CREATE INDEX IF NOT EXISTS {} ON {} (generation, {}){only}",
            index.name, self.name, index.columns
        )
    }

    /// The statements that create the table and all its indexes.
    pub fn create_statements(&self) -> Vec<String> {
        let mut statements = vec![self.create_table_statement()];
        statements.extend(self.indexes.iter().map(|i| self.create_index_statement(i)));
        statements
    }
}

/// A row of a read model's table, declared once with `row!`: its fields are the table's
/// columns, in order.
pub trait Row: Clone + Send + Sync + PartialEq + Debug + Sized {
    const TABLE: Table;

    /// The row's values, in `TABLE.columns` order.
    fn to_params(&self) -> Vec<Param<'static>>;

    /// A row read back as text, in `TABLE.columns` order.
    fn read(values: &[Option<String>]) -> Result<Self, ConsumerError>;
}

/// Declares a read model's row once: the struct, whose fields are its table's columns in
/// order (`String`, `i64`, `String`/`i64` as an `Option` for a nullable column, or a
/// type stored as its word, `Status as word`: one with `as_str` and `parse`), the table's name (the read model's `NAME`), its key and the indexes
/// its queries need (each led by `generation`, which the macro adds; a `where` makes it
/// partial), and so the table's DDL and how the row is written and read back.
#[macro_export]
macro_rules! row {
    (
        $(#[$meta:meta])*
        pub struct $row:ident in table $table:path, keyed by $key:ident {
            $($(#[$field_meta:meta])* pub $field:ident: $kind:ty $(as $word:ident)?,)*
        }
        $(indexes {
            $($index:ident on ($index_columns:literal) $(where $only:literal)?,)*
        })?
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $row {
            $($(#[$field_meta])* pub $field: $kind,)*
        }

        impl $crate::rows::Row for $row {
            const TABLE: $crate::Table = $crate::Table {
                name: $table,
                columns: &[$(stringify!($field)),*],
                types: &[$($crate::row!(@type $kind $(, $word)?)),*],
                key: stringify!($key),
                indexes: &[$($($crate::Index {
                    name: stringify!($index),
                    columns: $index_columns,
                    only_where: $crate::row!(@only $($only)?),
                }),*)?],
            };

            fn to_params(&self) -> Vec<$crate::Param<'static>> {
                vec![$($crate::row!(@param self.$field, $kind $(, $word)?)),*]
            }

            fn read(values: &[Option<String>]) -> Result<Self, $crate::ConsumerError> {
                let mut values = values.iter();
                Ok($row {
                    $($field: $crate::row!(@read values.next(), $field, $kind $(, $word)?),)*
                })
            }
        }
    };
    (@only) => { None };
    (@only $only:literal) => { Some($only) };
    (@type $kind:ty) => { <$kind as $crate::rows::Column>::SQL_TYPE };
    (@type $kind:ty, word) => { "TEXT NOT NULL" };
    (@param $value:expr, $kind:ty) => { $crate::rows::Column::param(&$value) };
    (@param $value:expr, $kind:ty, word) => { $crate::Param::from($value.as_str()) };
    (@read $value:expr, $field:ident, $kind:ty) => {
        $crate::rows::Column::read($value, stringify!($field))?
    };
    (@read $value:expr, $field:ident, $kind:ty, word) => {
        $crate::rows::read_word($value, stringify!($field), <$kind>::parse)?
    };
}

/// How a field of a `row!` is written and read back as text.
pub trait Column: Sized {
    /// The column's SQL type and nullability, as both backends spell it.
    const SQL_TYPE: &'static str;

    fn param(&self) -> Param<'static>;
    fn read(value: Option<&Option<String>>, column: &str) -> Result<Self, ConsumerError>;
}

fn not_null<T>(value: Option<T>, column: &str) -> Result<T, ConsumerError> {
    value.ok_or_else(|| ConsumerError::Corrupt(format!("{column} is NULL")))
}

impl Column for Option<String> {
    const SQL_TYPE: &'static str = "TEXT";

    fn param(&self) -> Param<'static> {
        self.clone().into()
    }

    fn read(value: Option<&Option<String>>, _column: &str) -> Result<Self, ConsumerError> {
        Ok(value.cloned().flatten())
    }
}

impl Column for String {
    const SQL_TYPE: &'static str = "TEXT NOT NULL";

    fn param(&self) -> Param<'static> {
        self.clone().into()
    }

    fn read(value: Option<&Option<String>>, column: &str) -> Result<Self, ConsumerError> {
        not_null(Option::<String>::read(value, column)?, column)
    }
}

impl Column for Option<i64> {
    const SQL_TYPE: &'static str = "BIGINT";

    fn param(&self) -> Param<'static> {
        Param::Int(*self)
    }

    fn read(value: Option<&Option<String>>, column: &str) -> Result<Self, ConsumerError> {
        Option::<String>::read(value, column)?
            .map(|text| {
                text.parse().map_err(|_| {
                    ConsumerError::Corrupt(format!("{column} is not an integer: {text:?}"))
                })
            })
            .transpose()
    }
}

impl Column for i64 {
    const SQL_TYPE: &'static str = "BIGINT NOT NULL";

    fn param(&self) -> Param<'static> {
        Param::Int(Some(*self))
    }

    fn read(value: Option<&Option<String>>, column: &str) -> Result<Self, ConsumerError> {
        not_null(Option::<i64>::read(value, column)?, column)
    }
}

/// A value stored as its word (a `row!` field `as word`), read back by `parse`.
pub fn read_word<T>(
    value: Option<&Option<String>>,
    column: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<T, ConsumerError> {
    let word = String::read(value, column)?;
    parse(&word)
        .ok_or_else(|| ConsumerError::Corrupt(format!("{column} is not a word it knows: {word:?}")))
}

/// A read model of rows keyed by one column, each row folded from events.
pub trait RowModel: Send + Sync + Debug + 'static {
    type Row: Row;

    const NAME: &'static str;
    /// Whether every row folds from the events of one stream only (its key is the
    /// stream's aggregate id): a re-fold then reads that stream, not the whole log.
    const ROWS_FOLLOW_STREAMS: bool = false;

    fn filter(&self) -> annals_store::LogFilter;

    /// The key of the row an event changes; `None` for an event the model ignores.
    fn key(&self, event: &RecordedEvent) -> Result<Option<String>, ConsumerError>;

    /// The row after the event (`row` is `None` when there is none yet). Pure: the event
    /// and the row are all it may look at.
    fn fold(
        &self,
        row: Option<Self::Row>,
        event: &RecordedEvent,
    ) -> Result<Option<Self::Row>, ConsumerError>;
}

/// Rows per statement: keeps a statement's parameters within SQLite's and PostgreSQL's
/// limits for the widest table.
const ROWS_PER_STATEMENT: usize = 500;

/// Every row model is a projector.
#[async_trait]
impl<M: RowModel> Projector for M {
    fn name(&self) -> &'static str {
        M::NAME
    }

    fn filter(&self) -> annals_store::LogFilter {
        RowModel::filter(self)
    }

    fn tables(&self) -> &'static [Table] {
        std::slice::from_ref(&<M::Row as Row>::TABLE)
    }

    async fn apply(&self, tx: &mut ReadTx, events: &[RecordedEvent]) -> Result<(), Failure> {
        let model = self;
        let at = |event: &RecordedEvent| {
            let position = event.position;
            move |error: ConsumerError| Failure {
                position: Some(position),
                error,
            }
        };
        let mut keyed = Vec::with_capacity(events.len());
        for event in events {
            if let Some(key) = model.key(event).map_err(at(event))? {
                keyed.push((key, event));
            }
        }
        let mut keys: Vec<&str> = keyed.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        let before = load::<M>(tx, &keys).await.map_err(Failure::unplaced)?;
        let mut rows = before.clone();
        for (key, event) in &keyed {
            let row = rows.remove(key.as_str());
            if let Some(row) = model.fold(row, event).map_err(at(event))? {
                rows.insert(key.clone(), row);
            }
        }
        let changed: Vec<&M::Row> = rows
            .iter()
            .filter(|(key, row)| before.get(key.as_str()) != Some(row))
            .map(|(_, row)| row)
            .collect();
        let gone: Vec<&str> = before
            .keys()
            .filter(|key| !rows.contains_key(key.as_str()))
            .map(String::as_str)
            .collect();
        store(tx, &changed, &gone).await.map_err(Failure::unplaced)
    }

    fn rows_follow_streams(&self) -> bool {
        M::ROWS_FOLLOW_STREAMS
    }

    /// The row `event` touches, folded again from nothing over the events of `history`
    /// that touch it, and written back (or deleted) when it differs from the stored one.
    async fn refold(
        &self,
        tx: &mut ReadTx,
        event: &RecordedEvent,
        history: &[RecordedEvent],
    ) -> Result<(), Failure> {
        let at = |event: &RecordedEvent| {
            let position = event.position;
            move |error: ConsumerError| Failure {
                position: Some(position),
                error,
            }
        };
        let Some(key) = self.key(event).map_err(at(event))? else {
            return Ok(());
        };
        let mut row = None;
        for earlier in history {
            if self.key(earlier).map_err(at(earlier))?.as_deref() == Some(key.as_str()) {
                row = self.fold(row, earlier).map_err(at(earlier))?;
            }
        }
        let before = load::<M>(tx, &[key.as_str()])
            .await
            .map_err(Failure::unplaced)?;
        let written = match &row {
            Some(row) if before.get(&key) != Some(row) => store(tx, &[row], &[]).await,
            None if before.contains_key(&key) => store::<M::Row>(tx, &[], &[key.as_str()]).await,
            _ => Ok(()),
        };
        written.map_err(Failure::unplaced)
    }
}

/// A table's columns as text, in `columns` order, for `read_row`. Each is aliased:
/// PostgreSQL resolves an `ORDER BY` name to an output column first, and would sort
/// `CAST(score AS TEXT)` as text.
pub fn text_columns(table: &Table) -> String {
    table
        .columns
        .iter()
        .map(|c| format!("CAST({c} AS TEXT) AS {c}_text"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn load<M: RowModel>(
    tx: &mut ReadTx,
    keys: &[&str],
) -> Result<HashMap<String, M::Row>, ConsumerError> {
    let table = <M::Row as Row>::TABLE;
    let columns = text_columns(&table);
    let mut rows = HashMap::new();
    for chunk in keys.chunks(ROWS_PER_STATEMENT) {
        let placeholders = (0..chunk.len())
            .map(|i| tx.placeholder(i + 2))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT {columns} FROM {} WHERE generation = {} AND {} IN ({placeholders})",
            table.name,
            tx.placeholder(1),
            table.key
        );
        let mut params = vec![Param::from(tx.generation())];
        params.extend(chunk.iter().map(|k| Param::from(*k)));
        for values in tx.fetch_text_rows(&sql, &params).await? {
            let key = values.first().cloned().flatten().unwrap_or_default();
            rows.insert(key, M::Row::read(&values)?);
        }
    }
    Ok(rows)
}

async fn store<R: Row>(
    tx: &mut ReadTx,
    changed: &[&R],
    gone: &[&str],
) -> Result<(), ConsumerError> {
    let table = R::TABLE;
    let generation = tx.generation();
    let width = table.columns.len() + 1;
    let updates = table
        .columns
        .iter()
        .filter(|c| **c != table.key)
        .map(|c| format!("{c} = excluded.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    for chunk in changed.chunks(ROWS_PER_STATEMENT) {
        let values = (0..chunk.len())
            .map(|r| {
                let row = (0..width)
                    .map(|c| tx.placeholder(r * width + c + 1))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("({row})")
            })
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "INSERT INTO {} (generation, {}) VALUES {values} \
             ON CONFLICT (generation, {}) DO UPDATE SET {updates}",
            table.name,
            table.columns.join(", "),
            table.key
        );
        let mut params = Vec::with_capacity(chunk.len() * width);
        for row in chunk {
            params.push(Param::from(generation));
            params.extend(row.to_params());
        }
        tx.execute(&sql, &params).await?;
    }
    for key in gone {
        tx.execute(
            &format!(
                "DELETE FROM {} WHERE generation = $1 AND {} = $2",
                table.name, table.key
            ),
            &[generation.into(), (*key).into()],
        )
        .await?;
    }
    Ok(())
}
