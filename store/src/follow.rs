//! Following the global log: a reader that hands out the events after its position in
//! order, exactly once each, and waits (without busy polling) when it has caught up.

use std::sync::Arc;
use std::time::Duration;

use crate::EventStore;
use crate::error::StoreError;
use crate::model::{LogFilter, RecordedEvent};

/// A cursor over the global log. It owns its position; a projector persists the position
/// of the last event it applied and starts a new follower after it.
#[derive(Debug)]
pub struct LogFollower {
    store: Arc<dyn EventStore>,
    filter: LogFilter,
    next_position: u64,
    batch_size: usize,
}

impl LogFollower {
    /// A follower that will hand out the events at `from_position` and after.
    pub fn new(store: Arc<dyn EventStore>, from_position: u64, filter: LogFilter) -> Self {
        LogFollower {
            store,
            filter,
            next_position: from_position.max(1),
            batch_size: 1_000,
        }
    }

    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// The position the next read starts at.
    pub fn next_position(&self) -> u64 {
        self.next_position
    }

    /// The next events in order, waiting up to `timeout` when there are none yet; empty
    /// when the time ran out.
    pub async fn next_batch(
        &mut self,
        timeout: Duration,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let page = self
                .store
                .read_all(self.next_position, self.batch_size, &self.filter)
                .await?;
            self.next_position = self.next_position.max(page.next_position);
            if !page.events.is_empty() {
                return Ok(page.events);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(Vec::new());
            }
            let head = self.store.wait_for_events(page.head, left).await?;
            if head <= page.head {
                return Ok(Vec::new());
            }
        }
    }
}
