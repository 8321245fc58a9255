//! A store that does something of the test's before chosen appends (which may fail
//! them): how the process tests force a client's command, or an outage, into the middle
//! of a process's step.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use annals_store::{AppendOutcome, AppendRequest, EventStore, StoreError, StoreLayer};
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
impl StoreLayer for Intercepting {
    fn inner(&self) -> &dyn EventStore {
        self.inner.as_ref()
    }
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        (self.before)(&request).await?;
        self.inner.append(request).await
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
