//! A consumer's checkpoint, per generation, in `projection_checkpoints`: read, held, and
//! moved only from the value read.
//!
//! Invariant: `move_checkpoint` changes the row only from the position its transaction
//! read (the first batch makes it); a runner that finds it made or moved by another
//! changes nothing (`CheckpointMoved`), and its transaction must be rolled back.

use annals_store::to_sql_int;

use crate::{ConsumerError, ReadTx};

pub(crate) async fn read_checkpoint(tx: &mut ReadTx, name: &str) -> Result<u64, ConsumerError> {
    let generation = tx.generation();
    read_checkpoint_of(tx, name, generation).await
}

pub(crate) async fn read_checkpoint_of(
    tx: &mut ReadTx,
    name: &str,
    generation: i64,
) -> Result<u64, ConsumerError> {
    let position = tx
        .fetch_int(
            "SELECT position FROM projection_checkpoints WHERE name = $1 AND generation = $2",
            &[name.into(), generation.into()],
        )
        .await?
        .unwrap_or(0);
    Ok(u64::try_from(position).unwrap_or(0))
}

/// Reads a checkpoint and holds its row until the transaction ends (a no-op update: a
/// row lock on PostgreSQL; SQLite's write transaction already excludes other writers).
pub(crate) async fn lock_checkpoint(
    tx: &mut ReadTx,
    name: &str,
    generation: i64,
) -> Result<u64, ConsumerError> {
    tx.execute(
        "UPDATE projection_checkpoints SET position = position WHERE name = $1 AND generation = $2",
        &[name.into(), generation.into()],
    )
    .await?;
    read_checkpoint_of(tx, name, generation).await
}

/// Moves the checkpoint of `tx`'s generation from `from`, the value read from its row (0
/// when it has none), to `to`, in the transaction of the batch that applied the events up
/// to `to`: the first batch makes the row, a later one updates the row its transaction
/// holds. A runner whose row another made or moved first changes nothing and gets
/// `CheckpointMoved`, and its batch must be rolled back.
pub(crate) async fn move_checkpoint(
    tx: &mut ReadTx,
    name: &str,
    from: u64,
    to: u64,
) -> Result<(), ConsumerError> {
    let params = [name.into(), tx.generation().into(), to_sql_int(to).into()];
    // When it moved, by the database's clock: what tells a stalled consumer (`status`).
    let now = tx.now_micros();
    let moved = if from == 0 {
        tx.execute(
            &format!(
                "INSERT INTO projection_checkpoints (name, generation, position, moved_micros) \
                 VALUES ($1, $2, $3, {now}) ON CONFLICT (name, generation) DO NOTHING"
            ),
            &params,
        )
        .await?
    } else {
        tx.execute(
            &format!(
                "UPDATE projection_checkpoints SET position = $3, moved_micros = {now} \
                  WHERE name = $1 AND generation = $2"
            ),
            &params,
        )
        .await?
    };
    if moved != 1 {
        return Err(ConsumerError::CheckpointMoved(name.to_owned()));
    }
    Ok(())
}
