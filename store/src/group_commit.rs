//! The writer task behind `append`: appends that arrive while a transaction is being
//! written wait in a queue and go into the next transaction together, so they share one
//! lock, one round of reads and one flush. Each append is still decided on its own
//! (see `batch::plan`); one append's failure never fails another's.

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, watch};

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

pub(crate) type Answer = Result<AppendOutcome, StoreError>;

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
}

/// Writes one batch, from the cheapest facts that settle it.
async fn write_batch<W: BatchWriter>(
    writer: &mut W,
    cache: &mut HeadCache,
    batch: &[ValidAppend],
) -> Result<Vec<Answer>, StoreError> {
    let remembered = cache.facts(batch);
    let sources = if remembered.is_some() {
        [FactsSource::Remembered, FactsSource::ReadWithIds].as_slice()
    } else {
        [FactsSource::Read, FactsSource::ReadWithIds].as_slice()
    };
    let mut remembered = remembered;
    for &source in sources {
        match writer.write_attempt(batch, source, remembered.take()).await {
            Ok(Some(plan)) => {
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
    answer: oneshot::Sender<Answer>,
}

/// The sending side, held by the store.
#[derive(Debug, Clone)]
pub(crate) struct GroupCommit {
    queue: mpsc::Sender<Pending>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Starts the writer task. `head` is told the last position after every commit, which
    /// is what wakes this process's waiting readers.
    pub fn start<W: BatchWriter>(writer: W, head: watch::Sender<u64>) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(run(writer, receiver, head));
        GroupCommit { queue }
    }

    pub async fn append(&self, append: ValidAppend) -> Answer {
        let (answer, receive) = oneshot::channel();
        self.queue
            .send(Pending { append, answer })
            .await
            .map_err(|_| StoreError::Closed)?;
        receive.await.map_err(|_| StoreError::Closed)?
    }
}

async fn run<W: BatchWriter>(
    mut writer: W,
    mut receiver: mpsc::Receiver<Pending>,
    head: watch::Sender<u64>,
) {
    let mut cache = HeadCache::default();
    while let Some(first) = receiver.recv().await {
        let mut events = first.append.request.events.len();
        let mut pending = vec![first];
        while pending.len() < MAX_APPENDS_PER_BATCH && events < MAX_EVENTS_PER_BATCH {
            match receiver.try_recv() {
                Ok(next) => {
                    events += next.append.request.events.len();
                    pending.push(next);
                }
                Err(_) => break,
            }
        }
        let (appends, answers): (Vec<ValidAppend>, Vec<oneshot::Sender<Answer>>) =
            pending.into_iter().map(|p| (p.append, p.answer)).unzip();
        let results = write(&mut writer, &mut cache, &appends).await;
        let last = results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(AppendOutcome::last_position)
            .max();
        if let Some(last) = last {
            crate::raise_head(&head, last);
        }
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
/// database being unreachable, each append is tried alone so one bad append cannot fail
/// the others.
async fn write<W: BatchWriter>(
    writer: &mut W,
    cache: &mut HeadCache,
    appends: &[ValidAppend],
) -> Vec<Answer> {
    match write_batch(writer, cache, appends).await {
        Ok(answers) => answers,
        Err(error) if appends.len() == 1 || matches!(error, StoreError::Unavailable(_)) => {
            tracing::warn!(%error, appends = appends.len(), "append batch failed");
            vec![Err(error); appends.len()]
        }
        Err(error) => {
            tracing::warn!(%error, appends = appends.len(), "append batch failed; trying each append alone");
            let mut answers = Vec::with_capacity(appends.len());
            for append in appends {
                let answer = match write_batch(writer, cache, std::slice::from_ref(append)).await {
                    Ok(mut one) => one.pop().unwrap_or(Err(StoreError::Closed)),
                    Err(error) => Err(error),
                };
                answers.push(answer);
            }
            answers
        }
    }
}
