//! The log's head and the store's own rows, read and decoded alike on every SQL
//! backend: the head (`MAX(position)`), the head row (the last position given and its
//! log hash, which a deleted tail does not lower), an event, an idempotency key and a
//! schema version. A column that breaks what the store wrote is `StoreError::Corrupt`.

use sqlx::Pool;

use super::{Dialect, PREPARED};
use crate::audit;
use crate::chain::Hash;
use crate::error::StoreError;
use crate::model::{IdempotencyRecord, RecordedEvent, recorded_event};

const READ_HEAD: &str = "SELECT COALESCE(MAX(position), 0) AS head FROM events";
const LOG_HEAD: &str = "SELECT position, hash FROM log_head WHERE id = 1";

pub(super) async fn read_head<DB: Dialect>(pool: &Pool<DB>) -> Result<u64, StoreError> {
    let mut connection = pool.acquire().await?;
    let row = DB::fetch_optional(&mut connection, READ_HEAD, &[], PREPARED).await?;
    Ok(match row {
        Some(row) => DB::count(&row, "head")?,
        None => 0,
    })
}

/// The log's head row, as it is stored.
pub(super) async fn read_log_head<DB: Dialect>(
    connection: &mut DB::Connection,
) -> Result<audit::HeadRow, StoreError> {
    let row = DB::fetch_optional(connection, LOG_HEAD, &[], PREPARED).await?;
    row.map(|row| -> Result<_, StoreError> {
        let position = DB::int(&row, "position")?;
        Ok((
            position.and_then(|p| u64::try_from(p).ok()),
            DB::bytes(&row, "hash")?,
        ))
    })
    .transpose()
}

/// The log's head row: the last position given and its log hash, which must be there.
pub(crate) async fn log_head<DB: Dialect>(
    connection: &mut DB::Connection,
) -> Result<(u64, Hash), StoreError> {
    match read_log_head::<DB>(connection).await? {
        None => Err(StoreError::Corrupt("the log's head row is missing".into())),
        Some((Some(position), Some(hash))) => Ok((
            position,
            hash.as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt("the log's head hash".into()))?,
        )),
        Some(_) => Err(StoreError::Corrupt("the log's head row is empty".into())),
    }
}

/// An event row of `EVENT_COLUMNS`.
pub(super) fn event<DB: Dialect>(row: &DB::Row) -> Result<RecordedEvent, StoreError> {
    let int = |column| DB::required(DB::int, row, column);
    let text = |column| DB::required(DB::text, row, column);
    recorded_event(
        int("position")?,
        text("stream")?,
        int("version")?,
        DB::read_event_id(row)?,
        text("event_type")?,
        int("schema_version")?,
        DB::json(row, "data")?,
        DB::json(row, "metadata")?,
        DB::read_time(row, "recorded_at")?,
        &DB::required(DB::bytes, row, "hash")?,
    )
}

/// An idempotency key row of `IDEMPOTENCY_COLUMNS`.
pub(crate) fn idempotency_record<DB: Dialect>(
    row: &DB::Row,
) -> Result<IdempotencyRecord, StoreError> {
    let text = |column| DB::required(DB::text, row, column);
    Ok(IdempotencyRecord {
        key: text("key")?,
        request_hash: text("request_hash")?,
        payload: DB::json(row, "payload")?,
        stream: text("stream")?,
        version: DB::count(row, "version")?,
        last_position: DB::count(row, "last_position")?,
        recorded_at: DB::read_time(row, "recorded_at")?,
    })
}

/// A schema version column.
pub(crate) fn schema_version<DB: Dialect>(row: &DB::Row) -> Result<u32, StoreError> {
    let n = DB::required(DB::int, row, "schema_version")?;
    u32::try_from(n).map_err(|_| StoreError::Corrupt("schema version".into()))
}
