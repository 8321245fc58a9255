//! The writer task behind `append`: appends that arrive while a transaction is being
//! written wait in a queue and go into the next transaction together, so they share one
//! lock, one round of reads and one flush. Each append is still decided on its own
//! (see `batch::plan`); one append's failure never fails another's.

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, watch};

use crate::batch::ValidAppend;
use crate::error::StoreError;
use crate::model::AppendOutcome;

/// Appends per transaction, at most; and events, at most (one large append may exceed it
/// alone).
const MAX_APPENDS_PER_BATCH: usize = 512;
const MAX_EVENTS_PER_BATCH: usize = 8_192;

pub(crate) type Answer = Result<AppendOutcome, StoreError>;

/// A backend's way of writing one batch in one transaction.
#[async_trait]
pub(crate) trait BatchWriter: Send + 'static {
    /// Writes the batch and commits. `Ok` carries one answer per append, in order; `Err`
    /// means nothing of the batch was written (or, for a dropped commit, that it is not
    /// known whether it was).
    async fn write_batch(&mut self, batch: &[ValidAppend]) -> Result<Vec<Answer>, StoreError>;
}

struct Pending {
    append: ValidAppend,
    answer: oneshot::Sender<Answer>,
}

/// The sending side, held by the store.
#[derive(Debug, Clone)]
pub(crate) struct GroupCommit {
    queue: mpsc::UnboundedSender<Pending>,
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
        let (queue, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(writer, receiver, head));
        GroupCommit { queue }
    }

    pub async fn append(&self, append: ValidAppend) -> Answer {
        let (answer, receive) = oneshot::channel();
        self.queue
            .send(Pending { append, answer })
            .map_err(|_| StoreError::Closed)?;
        receive.await.map_err(|_| StoreError::Closed)?
    }
}

async fn run<W: BatchWriter>(
    mut writer: W,
    mut receiver: mpsc::UnboundedReceiver<Pending>,
    head: watch::Sender<u64>,
) {
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
        let results = write(&mut writer, &appends).await;
        let last = results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(AppendOutcome::last_position)
            .max();
        if let Some(last) = last {
            head.send_if_modified(|h| {
                let newer = last > *h;
                if newer {
                    *h = last;
                }
                newer
            });
        }
        for (answer, result) in answers.into_iter().zip(results) {
            // A caller that stopped waiting (its request was cancelled) is no error: the
            // append happened or not, and its event ids make a retry safe.
            let _ = answer.send(result);
        }
    }
}

/// Writes the batch; when the shared transaction fails for a reason other than the
/// database being unreachable, each append is tried alone so one bad append cannot fail
/// the others.
async fn write<W: BatchWriter>(writer: &mut W, appends: &[ValidAppend]) -> Vec<Answer> {
    match writer.write_batch(appends).await {
        Ok(answers) => answers,
        Err(error) if appends.len() == 1 || matches!(error, StoreError::Unavailable(_)) => {
            tracing::warn!(%error, appends = appends.len(), "append batch failed");
            vec![Err(error); appends.len()]
        }
        Err(error) => {
            tracing::warn!(%error, appends = appends.len(), "append batch failed; trying each append alone");
            let mut answers = Vec::with_capacity(appends.len());
            for append in appends {
                let answer = match writer.write_batch(std::slice::from_ref(append)).await {
                    Ok(mut one) => one.pop().unwrap_or(Err(StoreError::Closed)),
                    Err(error) => Err(error),
                };
                answers.push(answer);
            }
            answers
        }
    }
}
