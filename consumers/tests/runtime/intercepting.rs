//! A store that does something of the test's before chosen appends (which may fail
//! them): how the process tests force a client's command, or an outage, into the middle
//! of a process's step.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use annals_store::{
    AppendOutcome, AppendRequest, EventStore, LogFilter, RecordedEvent, StoreError,
};
use async_trait::async_trait;
use futures::future::BoxFuture;

pub type BeforeAppend =
    Box<dyn Fn(&AppendRequest) -> BoxFuture<'static, Result<(), StoreError>> + Send + Sync>;

/// The store, with something done before each append (which may fail it).
pub struct Intercepting {
    pub inner: Arc<dyn EventStore>,
    pub before: BeforeAppend,
}

impl std::fmt::Debug for Intercepting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Intercepting")
    }
}

#[async_trait]
impl EventStore for Intercepting {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        (self.before)(&request).await?;
        self.inner.append(request).await
    }
    async fn read_stream(
        &self,
        stream: &annals_store::StreamName,
        from_version: u64,
        direction: annals_store::Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner
            .read_stream(stream, from_version, direction, limit)
            .await
    }
    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
        filter: &LogFilter,
    ) -> Result<annals_store::LogPage, StoreError> {
        self.inner.read_all(from_position, limit, filter).await
    }
    async fn head(&self) -> Result<u64, StoreError> {
        self.inner.head().await
    }
    async fn wait_for_events(&self, after: u64, timeout: Duration) -> Result<u64, StoreError> {
        self.inner.wait_for_events(after, timeout).await
    }
    async fn save_snapshot(&self, snapshot: &annals_store::Snapshot) -> Result<(), StoreError> {
        self.inner.save_snapshot(snapshot).await
    }
    async fn load_snapshot(
        &self,
        stream: &annals_store::StreamName,
    ) -> Result<Option<annals_store::Snapshot>, StoreError> {
        self.inner.load_snapshot(stream).await
    }
    async fn find_idempotency(
        &self,
        key: &str,
    ) -> Result<Option<annals_store::IdempotencyRecord>, StoreError> {
        self.inner.find_idempotency(key).await
    }
    async fn purge_idempotency(
        &self,
        recorded_before: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64, StoreError> {
        self.inner.purge_idempotency(recorded_before).await
    }
    async fn verify(&self) -> Result<annals_store::AuditReport, StoreError> {
        self.inner.verify().await
    }
    async fn anchor(&self) -> Result<annals_store::Anchor, StoreError> {
        self.inner.anchor().await
    }
    async fn find_anchor(&self, hash: &str) -> Result<Option<u64>, StoreError> {
        self.inner.find_anchor(hash).await
    }
}

/// `inner`, with `act` done once, before the first append that `picks` (then that
/// append goes on): the place a test puts a client's command between a process's read
/// and its append.
pub fn acting_once_before(
    inner: Arc<dyn EventStore>,
    picks: impl Fn(&AppendRequest) -> bool + Send + Sync + 'static,
    act: impl Fn() -> BoxFuture<'static, ()> + Send + Sync + 'static,
) -> Arc<dyn EventStore> {
    let armed = AtomicBool::new(true);
    Arc::new(Intercepting {
        inner,
        before: Box::new(move |request| {
            let now = picks(request) && armed.swap(false, Ordering::SeqCst);
            let acted = now.then(&act);
            Box::pin(async move {
                if let Some(acted) = acted {
                    acted.await;
                }
                Ok(())
            })
        }),
    })
}
