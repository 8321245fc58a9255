//! The writer task behind `append`: appends that arrive while a transaction is being
//! written wait in a queue and go into the next transaction together, so they share one
//! lock, one round of reads and one flush. Each append is still decided on its own
//! (see `batch::plan`); one append's failure never fails another's.
//!
//! Bounds: the queue holds at most `QUEUE_CAPACITY` appends and
//! `StoreConfig::max_queued_bytes` bytes (callers wait for room past either); each write
//! attempt ends within `StoreConfig::commit_timeout` (its connection dropped, its callers
//! answered `Unavailable`); a batch the database refuses is split in halves until the
//! appends that fail it are alone, so one bad append costs O(log n) attempts, not n; and
//! a panic while writing a batch answers that batch's callers `Unavailable`, drops the
//! writer's connection and memory, and the writer goes on with the next batch.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc, oneshot, watch};

use crate::batch::{FactsSource, HeadCache, Plan, ValidAppend};
use crate::error::StoreError;
use crate::model::AppendOutcome;

/// Appends per transaction, at most; and events, at most (one large append may exceed it
/// alone).
const MAX_APPENDS_PER_BATCH: usize = 512;
const MAX_EVENTS_PER_BATCH: usize = 8_192;
/// Appends waiting for the writer, at most; past it `append` waits for room, so a slow
/// database slows callers down instead of growing memory without bound.
const QUEUE_CAPACITY: usize = 4_096;

pub(crate) type AppendResult = Result<AppendOutcome, StoreError>;

/// A backend's way of writing one batch in one transaction.
#[async_trait]
pub(crate) trait BatchWriter: Send + 'static {
    /// Takes the write lock, gets the facts from `source` (`remembered` holds them for
    /// `FactsSource::Remembered`), plans the batch, writes and commits. Returns
    /// `Ok(None)`, having written nothing, when the facts proved too thin: the plan
    /// refused an append on a version (which may be a retry) without stored ids, or the
    /// insert met a unique constraint (remembered facts were stale, or an id is stored).
    /// `Err` means nothing was written, or for a dropped commit that it is unknown.
    async fn write_attempt(
        &mut self,
        batch: &[ValidAppend],
        source: FactsSource,
        remembered: Option<crate::batch::LogFacts>,
    ) -> Result<Option<Plan>, StoreError>;

    /// Drops (and closes) the writer's connection, after an attempt that was abandoned
    /// midway: it timed out or panicked, so the connection's state is unknown.
    fn reset(&mut self);
}

/// Writes one batch, from the cheapest facts that settle it.
async fn write_batch<W: BatchWriter>(
    writer: &mut W,
    cache: &mut HeadCache,
    batch: &[ValidAppend],
    probe: &WriterProbe,
    commit_timeout: Duration,
) -> Result<Vec<AppendResult>, StoreError> {
    let remembered = cache.facts(batch);
    let sources = if remembered.is_some() {
        [FactsSource::Remembered, FactsSource::ReadWithIds].as_slice()
    } else {
        [FactsSource::Read, FactsSource::ReadWithIds].as_slice()
    };
    let mut remembered = remembered;
    for &source in sources {
        probe.attempts.fetch_add(1, Ordering::Relaxed);
        let attempt = writer.write_attempt(batch, source, remembered.take());
        let attempt = match tokio::time::timeout(commit_timeout, attempt).await {
            Ok(attempt) => attempt,
            Err(_) => {
                // A half-open socket, or a server that stopped answering: whatever the
                // connection was doing is abandoned with it.
                writer.reset();
                Err(StoreError::timed_out(
                    "a write attempt outlived the commit timeout",
                ))
            }
        };
        match attempt {
            Ok(Some(plan)) => {
                if source == FactsSource::Remembered {
                    probe.from_memory.fetch_add(1, Ordering::Relaxed);
                }
                cache.remember(&plan);
                return Ok(plan.outcomes);
            }
            Ok(None) => continue,
            Err(error) => {
                cache.forget();
                return Err(error);
            }
        }
    }
    cache.forget();
    Err(StoreError::Corrupt(
        "an append met a unique constraint even with every fact read under the lock".into(),
    ))
}

struct Pending {
    append: ValidAppend,
    answer: oneshot::Sender<AppendResult>,
    /// The append's share of the queue's bytes, given back once it is answered.
    room: OwnedSemaphorePermit,
}

/// The sending side, held by the store.
#[derive(Debug, Clone)]
pub(crate) struct GroupCommit {
    queue: mpsc::Sender<Pending>,
    probe: Arc<WriterProbe>,
}

/// The bytes an append holds while it waits for the writer: its events' JSON and names,
/// its claims and its idempotency record.
fn queued_bytes(append: &ValidAppend) -> usize {
    let request = &append.request;
    let json: usize = append
        .data
        .iter()
        .chain(&append.metadata)
        .map(String::len)
        .sum();
    let types: usize = request.events.iter().map(|e| e.event_type.len()).sum();
    let claims: usize = request.claims.iter().map(|c| c.key().len()).sum();
    let key = request.idempotency.as_ref().map_or(0, |k| {
        k.key.len() + k.request_hash.len() + k.payload.to_string().len()
    });
    request.stream.as_str().len() + json + types + claims + key
}

/// Test support: what the writer task is doing, and switches that pause it or make it
/// panic, so tests can force the interleavings they need.
#[doc(hidden)]
#[derive(Debug)]
pub struct WriterProbe {
    /// The queue's bytes: an append takes its size in permits (at most all of them, so
    /// one larger than the bound still goes, alone) until it is answered.
    room: Arc<Semaphore>,
    max_bytes: u32,
    paused: watch::Sender<bool>,
    panic_next: AtomicBool,
    attempts: AtomicU64,
    from_memory: AtomicU64,
    queued: AtomicUsize,
    waiting_for_room: AtomicUsize,
}

impl WriterProbe {
    fn new(max_queued_bytes: usize) -> Self {
        let max_bytes =
            u32::try_from(max_queued_bytes.clamp(1, Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
        WriterProbe {
            room: Arc::new(Semaphore::new(max_bytes as usize)),
            max_bytes,
            paused: watch::Sender::new(false),
            panic_next: AtomicBool::new(false),
            attempts: AtomicU64::new(0),
            from_memory: AtomicU64::new(0),
            queued: AtomicUsize::new(0),
            waiting_for_room: AtomicUsize::new(0),
        }
    }
}

impl WriterProbe {
    /// Makes the writer wait, before it takes its next batch, until `resume`.
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// Makes the writer panic while it writes its next batch.
    pub fn panic_next_batch(&self) {
        self.panic_next.store(true, Ordering::SeqCst);
    }

    /// Write attempts (transactions begun) so far.
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::SeqCst)
    }

    /// Batches committed from the facts the writer remembered, with no reads first.
    pub fn batches_from_memory(&self) -> u64 {
        self.from_memory.load(Ordering::SeqCst)
    }

    /// Appends in the queue, not yet taken into a batch.
    pub fn queued_appends(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Bytes the queued appends account for (see `StoreConfig::max_queued_bytes`).
    pub fn queued_bytes(&self) -> usize {
        (self.max_bytes as usize).saturating_sub(self.room.available_permits())
    }

    /// Callers that found no room in the queue and wait for it.
    pub fn callers_waiting_for_room(&self) -> usize {
        self.waiting_for_room.load(Ordering::SeqCst)
    }

    /// Takes the append's share of the queue's bytes, waiting for room when there is none.
    async fn room_for(&self, append: &ValidAppend) -> Result<OwnedSemaphorePermit, StoreError> {
        let permits = u32::try_from(queued_bytes(append))
            .unwrap_or(u32::MAX)
            .min(self.max_bytes);
        match self.room.clone().try_acquire_many_owned(permits) {
            Ok(room) => Ok(room),
            Err(TryAcquireError::Closed) => Err(StoreError::Closed),
            Err(TryAcquireError::NoPermits) => {
                let _waiting = crate::Counted::new(&self.waiting_for_room);
                self.room
                    .clone()
                    .acquire_many_owned(permits)
                    .await
                    .map_err(|_| StoreError::Closed)
            }
        }
    }

    async fn wait_while_paused(&self) {
        let mut paused = self.paused.subscribe();
        // The sender lives in `self`, so the wait can only end by a resume.
        let _ = paused.wait_for(|paused| !paused).await;
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Starts the writer task. `head` is told the last position after every commit, which
    /// is what wakes this process's waiting readers.
    pub fn start<W: BatchWriter>(
        writer: W,
        head: watch::Sender<u64>,
        config: &crate::StoreConfig,
    ) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let probe = Arc::new(WriterProbe::new(config.max_queued_bytes));
        tokio::spawn(run(
            writer,
            receiver,
            head,
            probe.clone(),
            config.commit_timeout,
        ));
        GroupCommit { queue, probe }
    }

    pub fn probe(&self) -> &WriterProbe {
        &self.probe
    }

    pub async fn append(&self, append: ValidAppend) -> AppendResult {
        let room = self.probe.room_for(&append).await?;
        let (answer, receive) = oneshot::channel();
        self.probe.queued.fetch_add(1, Ordering::SeqCst);
        if self
            .queue
            .send(Pending {
                append,
                answer,
                room,
            })
            .await
            .is_err()
        {
            self.probe.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(StoreError::Closed);
        }
        // The writer answers every append it takes, even when it panics; a dropped answer
        // means its task is gone.
        receive.await.map_err(|_| StoreError::writer_crashed())?
    }
}

async fn run<W: BatchWriter>(
    mut writer: W,
    mut receiver: mpsc::Receiver<Pending>,
    head: watch::Sender<u64>,
    probe: Arc<WriterProbe>,
    commit_timeout: Duration,
) {
    let mut cache = HeadCache::default();
    while let Some(first) = receiver.recv().await {
        probe.wait_while_paused().await;
        probe.queued.fetch_sub(1, Ordering::SeqCst);
        let mut events = first.append.request.events.len();
        let mut pending = vec![first];
        while pending.len() < MAX_APPENDS_PER_BATCH && events < MAX_EVENTS_PER_BATCH {
            match receiver.try_recv() {
                Ok(next) => {
                    probe.queued.fetch_sub(1, Ordering::SeqCst);
                    events += next.append.request.events.len();
                    pending.push(next);
                }
                Err(_) => break,
            }
        }
        let mut appends = Vec::with_capacity(pending.len());
        let mut answers = Vec::with_capacity(pending.len());
        let mut rooms = Vec::with_capacity(pending.len());
        for p in pending {
            appends.push(p.append);
            answers.push(p.answer);
            rooms.push(p.room);
        }
        let written = AssertUnwindSafe(async {
            if probe.panic_next.swap(false, Ordering::SeqCst) {
                panic!("test hook: the writer panics");
            }
            write(&mut writer, &mut cache, &appends, &probe, commit_timeout).await
        })
        .catch_unwind()
        .await;
        let results = written.unwrap_or_else(|_| {
            // The batch's effect on the log is unknown (as after a dropped commit): its
            // callers are told to retry, and the writer starts afresh.
            tracing::error!(
                appends = appends.len(),
                "the writer panicked while writing a batch; restarting it"
            );
            cache.forget();
            writer.reset();
            vec![Err(StoreError::writer_crashed()); appends.len()]
        });
        let last = results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(AppendOutcome::last_position)
            .max();
        if let Some(last) = last {
            crate::raise_head(&head, last);
        }
        // The batch's room in the queue is free before its callers hear back, so a caller
        // that appends again at once finds it.
        drop(appends);
        drop(rooms);
        for (answer, result) in answers.into_iter().zip(results) {
            // A caller that stopped waiting (its request was cancelled) is no error: the
            // append happened or not, and its event ids make a retry safe.
            let _ = answer.send(result);
        }
        // Let the callers just answered run first: busy ones append again at once, and
        // their appends then share the next transaction instead of trickling in.
        tokio::task::yield_now().await;
    }
}

/// Writes the batch; when the shared transaction fails for a reason other than the
/// database being unreachable, writes each half of it on its own, and so on down, so the
/// appends that fail the transaction end up alone and fail alone, and the others commit:
/// one bad append among n costs about 2 log2(n) more attempts.
fn write<'a, W: BatchWriter>(
    writer: &'a mut W,
    cache: &'a mut HeadCache,
    appends: &'a [ValidAppend],
    probe: &'a WriterProbe,
    commit_timeout: Duration,
) -> futures::future::BoxFuture<'a, Vec<AppendResult>> {
    Box::pin(async move {
        match write_batch(writer, cache, appends, probe, commit_timeout).await {
            Ok(answers) => answers,
            Err(error) if appends.len() == 1 || matches!(error, StoreError::Unavailable(_)) => {
                tracing::warn!(%error, appends = appends.len(), "append batch failed");
                vec![Err(error); appends.len()]
            }
            Err(error) => {
                tracing::warn!(%error, appends = appends.len(), "append batch failed; writing each half alone");
                let (left, right) = appends.split_at(appends.len() / 2);
                let mut answers = write(writer, cache, left, probe, commit_timeout).await;
                answers.extend(write(writer, cache, right, probe, commit_timeout).await);
                answers
            }
        }
    })
}
