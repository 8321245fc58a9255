//! Read models whose rows fold from events: a batch loads the rows its events touch in
//! one query, applies the events to them in memory (pure functions), and writes the
//! changed rows back with multi-row upserts. A batch of thousands of events costs a
//! handful of statements, not one per event.

use std::collections::HashMap;
use std::fmt::Debug;

use annals_store::RecordedEvent;
use async_trait::async_trait;

use crate::{Failure, Param, ProjectionError, Projector, ReadTx, Table};

/// A read model of rows keyed by one column, each row folded from events.
pub trait RowModel: Send + Sync + Debug + 'static {
    type Row: Clone + Send + Sync + PartialEq + Debug;

    const NAME: &'static str;
    const TABLE: Table;
    /// Whether every row folds from the events of one stream only (its key is the
    /// stream's aggregate id): a re-fold then reads that stream, not the whole log.
    const ROWS_FOLLOW_STREAMS: bool = false;

    fn filter(&self) -> annals_store::LogFilter;

    /// The key of the row an event changes; `None` for an event the model ignores.
    fn key(&self, event: &RecordedEvent) -> Result<Option<String>, ProjectionError>;

    /// The row after the event (`row` is `None` when there is none yet). Pure: the event
    /// and the row are all it may look at.
    fn fold(
        &self,
        row: Option<Self::Row>,
        event: &RecordedEvent,
    ) -> Result<Option<Self::Row>, ProjectionError>;

    /// The row's values, in `TABLE.columns` order.
    fn to_params(&self, row: &Self::Row) -> Vec<Param<'static>>;

    /// A row read back as text, in `TABLE.columns` order.
    fn read_row(&self, values: &[Option<String>]) -> Result<Self::Row, ProjectionError>;
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
        std::slice::from_ref(&M::TABLE)
    }

    async fn apply(&self, tx: &mut ReadTx, events: &[RecordedEvent]) -> Result<(), Failure> {
        let model = self;
        let at = |event: &RecordedEvent| {
            let position = event.position;
            move |error: ProjectionError| Failure {
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
        let before = load(model, tx, &keys).await.map_err(Failure::unplaced)?;
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
        store(model, tx, &changed, &gone)
            .await
            .map_err(Failure::unplaced)
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
            move |error: ProjectionError| Failure {
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
        let before = load(self, tx, &[key.as_str()])
            .await
            .map_err(Failure::unplaced)?;
        let written = match &row {
            Some(row) if before.get(&key) != Some(row) => store(self, tx, &[row], &[]).await,
            None if before.contains_key(&key) => store(self, tx, &[], &[key.as_str()]).await,
            _ => Ok(()),
        };
        written.map_err(Failure::unplaced)
    }
}

/// A table's columns as text, in `columns` order, for `read_row`. Each is aliased:
/// PostgreSQL resolves an `ORDER BY` name to an output column first, and would sort
/// `CAST(score AS TEXT)` as text.
pub(crate) fn text_columns(table: &Table) -> String {
    table
        .columns
        .iter()
        .map(|c| format!("CAST({c} AS TEXT) AS {c}_text"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn load<M: RowModel>(
    model: &M,
    tx: &mut ReadTx,
    keys: &[&str],
) -> Result<HashMap<String, M::Row>, ProjectionError> {
    let table = M::TABLE;
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
            rows.insert(key, model.read_row(&values)?);
        }
    }
    Ok(rows)
}

async fn store<M: RowModel>(
    model: &M,
    tx: &mut ReadTx,
    changed: &[&M::Row],
    gone: &[&str],
) -> Result<(), ProjectionError> {
    let table = M::TABLE;
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
            params.extend(model.to_params(row));
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

/// Reads the text of one column of a row read back (`None` when NULL).
pub(crate) fn column(values: &[Option<String>], i: usize) -> Option<String> {
    values.get(i).cloned().flatten()
}

/// Reads a required text column.
pub(crate) fn required(values: &[Option<String>], i: usize) -> Result<String, ProjectionError> {
    column(values, i).ok_or_else(|| ProjectionError::Corrupt(format!("column {i} is NULL")))
}

/// Reads an integer column.
pub(crate) fn integer(values: &[Option<String>], i: usize) -> Result<Option<i64>, ProjectionError> {
    column(values, i)
        .map(|v| {
            v.parse()
                .map_err(|_| ProjectionError::Corrupt(format!("column {i} is not an integer")))
        })
        .transpose()
}
