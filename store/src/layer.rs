//! Layers: an event store that wraps another and changes only some of what it does
//! (`StoreLayer`), such as the sealing of personal data (`EncryptedStore`), or a test's
//! store that holds an append or changes the clock of what it reads.
//!
//! A layer names the store it wraps (`inner`) and overrides only the methods it changes;
//! every other method forwards to the inner store, arguments and answer untouched. The
//! blanket `impl<L: StoreLayer> EventStore for L` makes every layer an event store, so a
//! method added to the contract reaches every layer at once and none forgets to forward
//! it; that impl is every layer's, so a layer does not implement `EventStore` itself.
//!
//! A concrete layer has each method twice, once per trait, under one name, so a call
//! such as `layer.append(…)` is ambiguous where both traits are in scope: code that
//! calls a layer holds it as an `EventStore` (or `dyn EventStore`) and brings only that
//! trait into scope. An override that also does what the inner store does calls it
//! through `inner`.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::model::{
    Anchor, AppendOutcome, AppendRequest, AuditReport, Direction, IdempotencyRecord, LogFilter,
    LogPage, RecordedEvent, Snapshot, StreamName,
};
use crate::{EventStore, StoreError};

/// An event store that wraps another and changes only some of what it does: each method
/// it does not override forwards to `inner` (see `EventStore` for what each one does).
#[async_trait]
pub trait StoreLayer: Send + Sync + std::fmt::Debug {
    /// The store this one wraps.
    fn inner(&self) -> &dyn EventStore;

    /// `EventStore::append`.
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        self.inner().append(request).await
    }

    /// `EventStore::read_stream`.
    async fn read_stream(
        &self,
        stream: &StreamName,
        from_version: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner()
            .read_stream(stream, from_version, direction, limit)
            .await
    }

    /// `EventStore::read_all`.
    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
        filter: &LogFilter,
    ) -> Result<LogPage, StoreError> {
        self.inner().read_all(from_position, limit, filter).await
    }

    /// `EventStore::head`.
    async fn head(&self) -> Result<u64, StoreError> {
        self.inner().head().await
    }

    /// `EventStore::wait_for_events`.
    async fn wait_for_events(&self, after: u64, timeout: Duration) -> Result<u64, StoreError> {
        self.inner().wait_for_events(after, timeout).await
    }

    /// `EventStore::save_snapshot`.
    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        self.inner().save_snapshot(snapshot).await
    }

    /// `EventStore::load_snapshot`.
    async fn load_snapshot(&self, stream: &StreamName) -> Result<Option<Snapshot>, StoreError> {
        self.inner().load_snapshot(stream).await
    }

    /// `EventStore::find_idempotency`.
    async fn find_idempotency(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.inner().find_idempotency(key).await
    }

    /// `EventStore::purge_idempotency`.
    async fn purge_idempotency(&self, recorded_before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.inner().purge_idempotency(recorded_before).await
    }

    /// `EventStore::verify`.
    async fn verify(&self) -> Result<AuditReport, StoreError> {
        self.inner().verify().await
    }

    /// `EventStore::anchor`.
    async fn anchor(&self) -> Result<Anchor, StoreError> {
        self.inner().anchor().await
    }

    /// `EventStore::find_anchor`.
    async fn find_anchor(&self, hash: &str) -> Result<Option<u64>, StoreError> {
        self.inner().find_anchor(hash).await
    }
}

// Every method by its full path: a layer has both traits' methods under one name.
#[async_trait]
impl<L: StoreLayer> EventStore for L {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        StoreLayer::append(self, request).await
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        from_version: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        StoreLayer::read_stream(self, stream, from_version, direction, limit).await
    }

    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
        filter: &LogFilter,
    ) -> Result<LogPage, StoreError> {
        StoreLayer::read_all(self, from_position, limit, filter).await
    }

    async fn head(&self) -> Result<u64, StoreError> {
        StoreLayer::head(self).await
    }

    async fn wait_for_events(&self, after: u64, timeout: Duration) -> Result<u64, StoreError> {
        StoreLayer::wait_for_events(self, after, timeout).await
    }

    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        StoreLayer::save_snapshot(self, snapshot).await
    }

    async fn load_snapshot(&self, stream: &StreamName) -> Result<Option<Snapshot>, StoreError> {
        StoreLayer::load_snapshot(self, stream).await
    }

    async fn find_idempotency(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        StoreLayer::find_idempotency(self, key).await
    }

    async fn purge_idempotency(&self, recorded_before: DateTime<Utc>) -> Result<u64, StoreError> {
        StoreLayer::purge_idempotency(self, recorded_before).await
    }

    async fn verify(&self) -> Result<AuditReport, StoreError> {
        StoreLayer::verify(self).await
    }

    async fn anchor(&self) -> Result<Anchor, StoreError> {
        StoreLayer::anchor(self).await
    }

    async fn find_anchor(&self, hash: &str) -> Result<Option<u64>, StoreError> {
        StoreLayer::find_anchor(self, hash).await
    }
}
