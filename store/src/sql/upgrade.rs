//! The upgrade that chains the rows stored before the log chain existed into it
//! (`backfill`), once, when the store starts on a database whose head row says so.

use sqlx::Pool;

use super::rows::read_log_head;
use super::{Dialect, PREPARED};
use crate::audit;
use crate::chain::{GENESIS, Hash};
use crate::error::StoreError;

/// Chains the rows stored before the log chain existed into it, once, when the head row
/// says so (its hash is NULL only between the migration and this): in position order,
/// under the writers' lock (so one process does it, and no append slips in), in one
/// transaction.
pub(super) async fn backfill<DB: Dialect>(pool: &Pool<DB>) -> Result<(), StoreError> {
    let unchained = |head: audit::HeadRow| matches!(head, Some((_, None)));
    // A plain read first: a store opening beside another process's writer must not wait
    // for the writers' lock when there is nothing to chain (almost always).
    if !unchained(read_log_head::<DB>(&mut *pool.acquire().await?).await?) {
        return Ok(());
    }
    let mut transaction = pool.begin_with(DB::BEGIN_WRITE).await?;
    if !unchained(read_log_head::<DB>(&mut transaction).await?) {
        transaction.rollback().await?;
        return Ok(());
    }
    let mut previous = GENESIS;
    let mut last = 0;
    loop {
        let rows = DB::fetch_all(
            &mut transaction,
            "SELECT position, category, hash FROM events WHERE position > $1 \
              ORDER BY position LIMIT 10000",
            &[last.into()],
            PREPARED,
        )
        .await?;
        let rows = rows
            .iter()
            .map(|row| {
                Ok((
                    DB::count(row, "position")?,
                    DB::required(DB::text, row, "category")?,
                    DB::required(DB::bytes, row, "hash")?,
                ))
            })
            .collect::<Result<Vec<(u64, String, Vec<u8>)>, StoreError>>()?;
        let Some((end, _, _)) = rows.last() else {
            break;
        };
        last = *end;
        let hashes = audit::chain_rows(&mut previous, &rows);
        let chained: Vec<(u64, Hash)> = rows.iter().map(|(p, _, _)| *p).zip(hashes).collect();
        DB::store_log_hashes(&mut transaction, &chained).await?;
    }
    DB::execute(
        &mut transaction,
        "UPDATE log_head SET position = $1, hash = $2 WHERE id = 1",
        &[last.into(), previous.as_slice().into()],
        PREPARED,
    )
    .await?;
    transaction.commit().await?;
    Ok(())
}
