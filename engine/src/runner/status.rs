//! What a runner tells of its consumer: the live generation and its checkpoint, the
//! wait for a position (read-your-writes), and the status an operator sees.

use std::time::Duration;

use tokio::sync::watch;

use super::{ConsumerRunner, lock};
use crate::checkpoint::read_checkpoint;
use crate::{ConsumerError, ConsumerStatus, FailurePolicy};

impl ConsumerRunner {
    /// The generation readers see (registering the projection on first use).
    pub async fn live_generation(&self) -> Result<i64, ConsumerError> {
        let name = self.name();
        self.register().await?;
        let mut tx = self.db.begin_read(0).await?;
        let live = tx
            .fetch_int(
                "SELECT live_generation FROM projections WHERE name = $1",
                &[name.into()],
            )
            .await?
            .unwrap_or(1);
        tx.commit().await?;
        Ok(live)
    }

    /// The position up to which the live generation has applied the log.
    pub async fn checkpoint(&self) -> Result<u64, ConsumerError> {
        // One statement: the live generation and its checkpoint as of one snapshot.
        let position = self
            .db
            .fetch_int(
                "SELECT c.position FROM projections p JOIN projection_checkpoints c \
                     ON c.name = p.name AND c.generation = p.live_generation \
                  WHERE p.name = $1",
                &[self.name().into()],
            )
            .await?
            .unwrap_or(0);
        Ok(u64::try_from(position).unwrap_or(0))
    }

    /// How far this process has seen the live generation applied (by its own runner, or
    /// at a swap): a lower bound of `checkpoint` that costs no query. 0 when this
    /// process does not run the projection. Only a batch that committed to the
    /// generation live at its commit raises it, and a swap makes live only a generation
    /// at least as far as the one it replaces, so it never runs ahead of the live board.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    pub(crate) async fn checkpoint_of(&self, generation: i64) -> Result<u64, ConsumerError> {
        let mut tx = self.db.begin_read(generation).await?;
        let position = read_checkpoint(&mut tx, self.name()).await?;
        tx.commit().await?;
        Ok(position)
    }

    /// The position the live generation has been seen applied up to, as it moves (see
    /// `applied`): lets another task wake when this consumer has taken new events.
    pub fn applied_changes(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Waits until the live generation has applied the log up to `position`, or
    /// `timeout`; returns whether it has (read-your-writes for `min_position`).
    pub async fn wait_for(&self, position: u64, timeout: Duration) -> bool {
        let mut applied = self.applied.subscribe();
        tokio::time::timeout(timeout, applied.wait_for(|a| *a >= position))
            .await
            .is_ok_and(|seen| seen.is_ok())
    }

    pub async fn status(&self) -> Result<ConsumerStatus, ConsumerError> {
        let checkpoint = self.checkpoint().await?;
        let head = self.store.head().await?;
        let mut tx = self.db.begin_read(0).await?;
        let rebuilding = tx
            .fetch_int(
                "SELECT rebuilding FROM projections \
                  WHERE name = $1 AND rebuild_seen_micros >= $2",
                &[self.name().into(), self.stale_before().into()],
            )
            .await?;
        // When the live checkpoint last moved, and the database's clock now.
        let moved = tx
            .fetch_text_rows(
                &format!(
                    "SELECT CAST(c.moved_micros AS TEXT), CAST({} AS TEXT) \
                       FROM projections p JOIN projection_checkpoints c \
                         ON c.name = p.name AND c.generation = p.live_generation \
                      WHERE p.name = $1",
                    tx.now_micros()
                ),
                &[self.name().into()],
            )
            .await?;
        tx.commit().await?;
        let micros = |text: &Option<String>| text.as_deref().and_then(|t| t.parse::<i64>().ok());
        let moved_micros = moved.first().and_then(|row| micros(&row[0]));
        let lease = self.db.lease_of(self.name()).await?;
        let lag = head.saturating_sub(checkpoint);
        let parked = self.parked().await?;
        // Stalled: work waits, and nothing moved for longer than a lease's life since the
        // checkpoint last moved, its lease was last taken (a new holder catching up is not
        // stalled) or the first event it has not taken was appended (one that came after
        // a long quiet is not late yet), by the database's clock.
        let waiting_since = match lag {
            0 => None,
            _ => self
                .store
                .read_all(checkpoint + 1, 1, &annals_store::LogFilter::all())
                .await?
                .events
                .first()
                .map(|event| event.recorded_at.timestamp_micros()),
        };
        let stalled = match (&lease, waiting_since) {
            (Some(lease), Some(appended)) => {
                let since = moved_micros
                    .unwrap_or(i64::MIN)
                    .max(lease.taken_micros)
                    .max(appended);
                let life = i64::try_from(self.lease_life.as_micros()).unwrap_or(i64::MAX);
                lease.now_micros.saturating_sub(since) > life
            }
            _ => false,
        };
        let status = if self.policy == FailurePolicy::Halt && !parked.is_empty() {
            "halted"
        } else if rebuilding.is_some() {
            "rebuilding"
        } else if stalled {
            "stalled"
        } else if lag > self.batch_size as u64 {
            "catching_up"
        } else {
            "running"
        };
        let time = |micros: i64| {
            chrono::DateTime::from_timestamp_micros(micros)
                .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        };
        Ok(ConsumerStatus {
            name: self.name().to_owned(),
            kind: self.kind(),
            checkpoint,
            head,
            lag,
            status,
            last_error: lock(&self.last_error).clone().or_else(|| {
                parked
                    .first()
                    .map(|p| format!("position {}: {}", p.position, p.error))
            }),
            parked: parked.len() as u64,
            holder: lease.as_ref().map(|lease| lease.holder.clone()),
            lease_expires_at: lease.as_ref().and_then(|lease| time(lease.expires_micros)),
            moved_at: moved_micros.and_then(time),
        })
    }
}
