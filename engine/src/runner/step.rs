//! A runner's steps: the next batch after the checkpoint, applied (a read model, in one
//! transaction with the checkpoint's move) or acted on (a process, an outbound consumer:
//! each event, then the checkpoint past it); a failure placed at its event, counted, and
//! parked after its attempts; and the runner as a `Duty` of the leased loop.

use std::time::Duration;

use annals_store::RecordedEvent;
use async_trait::async_trait;
use tokio::sync::watch;

use super::{ConsumerRunner, StepError, bump, is_poison, lock};
use crate::checkpoint::{lock_checkpoint, move_checkpoint};
use crate::duty::{self, Duty};
use crate::{Consumer, ConsumerError, Failure, FailurePolicy, Fence, Outcome, PausePoint};

impl ConsumerRunner {
    /// One step of the live generation: the next batch after its checkpoint, applied and
    /// checkpointed in one transaction. A failure rolls the whole batch back. It runs
    /// under no lease: for tests, and a process alone on its database; beside servers,
    /// `run_until_stopped` runs the consumer where its lease is.
    pub async fn run_once(&self) -> Result<Outcome, ConsumerError> {
        self.run_once_under(None).await
    }

    /// `run_once`, with every checkpoint-moving transaction fenced by `fence` when given.
    pub(crate) async fn run_once_under(
        &self,
        fence: Option<&Fence>,
    ) -> Result<Outcome, ConsumerError> {
        // A halted projection still applies every event before the one it parked.
        let limit = self.halted_before().await?;
        let mut live = self.live_generation().await?;
        self.pause(PausePoint::LiveStep).await;
        let mut stepped = self.step(live, limit, self.batch_size, fence).await;
        // A rebuild swapped generations since `live` was read: the batch took nothing;
        // go on in the generation that is live now.
        while let Err(StepError::Superseded(_)) = stepped {
            live = self.live_generation().await?;
            stepped = self.step(live, limit, self.batch_size, fence).await;
        }
        match stepped {
            Ok((outcome, checkpoint)) => {
                *lock(&self.last_error) = None;
                *lock(&self.failing) = None;
                self.applied.send_if_modified(|a| bump(a, checkpoint));
                Ok(match outcome {
                    Outcome::CaughtUp if limit.is_some() => Outcome::Halted,
                    outcome => outcome,
                })
            }
            Err(StepError::Event {
                position,
                event_id,
                event_type,
                error,
            }) if is_poison(&error) => {
                let reason = error.to_string();
                *lock(&self.last_error) = Some(format!("position {position}: {reason}"));
                let attempts = {
                    let mut failing = lock(&self.failing);
                    let attempts = match *failing {
                        Some((at, n)) if at == position => n + 1,
                        _ => 1,
                    };
                    *failing = Some((position, attempts));
                    attempts
                };
                if attempts < self.max_attempts {
                    return Err(error);
                }
                self.park(
                    position,
                    event_id.as_deref(),
                    &event_type,
                    &reason,
                    attempts,
                    fence,
                )
                .await?;
                *lock(&self.failing) = None;
                tracing::error!(projection = self.name(), position, %reason, "event parked");
                match self.policy {
                    FailurePolicy::Halt => {
                        // The events of its batch before it are exact: apply them now.
                        let (_, checkpoint) = self
                            .step(
                                live,
                                Some(position.saturating_sub(1)),
                                self.batch_size,
                                fence,
                            )
                            .await
                            .map_err(StepError::into_error)?;
                        self.applied.send_if_modified(|a| bump(a, checkpoint));
                        Ok(Outcome::Halted)
                    }
                    FailurePolicy::Skip => Ok(Outcome::Applied(0)),
                }
            }
            Err(failure) => {
                let error = failure.into_error();
                *lock(&self.last_error) = Some(error.to_string());
                Err(error)
            }
        }
    }

    /// Under the halt policy, the last position a generation may apply: the one before
    /// the oldest parked event (`None` when nothing is parked, or under the skip policy).
    pub(crate) async fn halted_before(&self) -> Result<Option<u64>, ConsumerError> {
        Ok(match self.policy {
            FailurePolicy::Halt => self
                .parked_after(0, 1)
                .await?
                .first()
                .map(|parked| parked.position.saturating_sub(1)),
            FailurePolicy::Skip => None,
        })
    }

    /// Applies the next batch to `generation`, stopping at `limit` when given; returns
    /// what it did and the generation's checkpoint after it. Under a lease (`fence`), the
    /// transaction that moves the checkpoint first checks the lease is still this
    /// holder's, and commits nothing otherwise (a rebuild's or verify's generation has
    /// its claim instead).
    pub(crate) async fn step(
        &self,
        generation: i64,
        limit: Option<u64>,
        batch_size: usize,
        fence: Option<&Fence>,
    ) -> Result<(Outcome, u64), StepError> {
        let checkpoint = self.checkpoint_of(generation).await?;
        if limit.is_some_and(|limit| checkpoint >= limit) {
            return Ok((Outcome::CaughtUp, checkpoint));
        }
        let page = self
            .store
            .read_all(checkpoint + 1, batch_size, &self.consumer.filter())
            .await?;
        let mut next = page.next_position.saturating_sub(1).max(checkpoint);
        let mut events = page.events;
        if let Some(limit) = limit {
            next = next.min(limit);
            events.retain(|e| e.position <= limit);
        }
        if next == checkpoint {
            return Ok((Outcome::CaughtUp, checkpoint));
        }
        let left_out = self.left_out().await?;
        let events: Vec<RecordedEvent> = events
            .into_iter()
            .filter(|e| !left_out.contains(&e.position))
            .collect();
        if let Some(fence) = fence {
            fence.may_act();
        }
        self.pause(PausePoint::BatchRead).await;
        let projector = match &self.consumer {
            Consumer::ReadModel(projector) => projector,
            Consumer::Process(_) | Consumer::Outbound(_) => {
                return self
                    .act_on(generation, checkpoint, next, &events, fence)
                    .await;
            }
        };
        let name = self.name();
        let mut tx = self.db.begin_write(generation).await?;
        // The fence first: a holder that lost its lease (taken over, or past its life)
        // commits nothing, whatever it read before.
        if let Some(fence) = fence {
            fence.check(&mut tx).await?;
        }
        // The batch commits only to a generation that is live, or claimed by a rebuild or
        // verify, when it commits: one swapped out or taken over takes nothing more. The
        // projections row is held (shared) until the commit, and a swap or a claim
        // updates it before it reads a checkpoint or drops a generation, so neither
        // misses a batch nor drops one under it.
        let current = tx
            .fetch_int(
                &format!(
                    "SELECT live_generation FROM projections \
                      WHERE name = $1 AND (live_generation = $2 OR rebuilding = $2){}",
                    tx.share_lock()
                ),
                &[name.into(), generation.into()],
            )
            .await?;
        if current.is_none() {
            return Err(StepError::Superseded(name));
        }
        // The checkpoint guard. The checkpoint row is held before any row is read, as an
        // operator's retry holds it, and the batch goes on only if the row is still at
        // the position it read its events after: a second runner, a straggler after a
        // takeover, or a retry that committed meanwhile finds it moved and applies
        // nothing; one that comes later waits.
        if lock_checkpoint(&mut tx, name, generation).await? != checkpoint {
            return Err(ConsumerError::CheckpointMoved(name.to_owned()).into());
        }
        if let Err(failure) = projector.apply(&mut tx, &events).await {
            drop(tx);
            return Err(self.locate(failure, generation, &events).await);
        }
        let applied = events.len();
        // The row is held, and was found at `checkpoint`, above; on an error, dropping
        // the transaction rolls the batch back.
        move_checkpoint(&mut tx, name, checkpoint, next).await?;
        tx.commit().await?;
        Ok((Outcome::Applied(applied), next))
    }

    /// A process's or an outbound consumer's step: acts on each event of the batch in
    /// order, outside any transaction, and moves the checkpoint past it (from the value
    /// read, in a transaction of its own) before the next, so that a crash repeats at
    /// most one event; an event that fails stops the batch with the checkpoint just
    /// before it.
    async fn act_on(
        &self,
        generation: i64,
        checkpoint: u64,
        next: u64,
        events: &[RecordedEvent],
        fence: Option<&Fence>,
    ) -> Result<(Outcome, u64), StepError> {
        let mut at = checkpoint;
        for event in events {
            // A holder past its lease's life acts no more (it may have acted once more
            // just before: its checkpoint's move is then refused, and the new holder's
            // commands are the same, keyed by the event).
            if fence.is_some_and(|fence| !fence.may_act()) {
                return Err(ConsumerError::LeaseLost(self.name().to_owned()).into());
            }
            if let Err(error) = self.consumer.act(event).await {
                self.advance(generation, at, event.position.saturating_sub(1), fence)
                    .await?;
                return Err(StepError::Event {
                    position: event.position,
                    event_id: Some(event.event_id.to_string()),
                    event_type: event.event_type.clone(),
                    error,
                });
            }
            self.pause(PausePoint::Acted).await;
            self.advance(generation, at, event.position, fence).await?;
            at = event.position;
        }
        self.advance(generation, at, next, fence).await?;
        Ok((Outcome::Applied(events.len()), next))
    }

    /// Moves a process's or an outbound consumer's checkpoint from `from` to `to` (when
    /// further), if it is still at `from`: another runner that moved it meanwhile owns
    /// the consumer now (`CheckpointMoved`); under a lease, only while it is still this
    /// holder's (`LeaseLost`).
    pub(crate) async fn advance(
        &self,
        generation: i64,
        from: u64,
        to: u64,
        fence: Option<&Fence>,
    ) -> Result<(), ConsumerError> {
        if to <= from {
            return Ok(());
        }
        let name = self.name();
        let mut tx = self.db.begin_write(generation).await?;
        if let Some(fence) = fence {
            fence.check(&mut tx).await?;
        }
        if lock_checkpoint(&mut tx, name, generation).await? != from {
            return Err(ConsumerError::CheckpointMoved(name.to_owned()));
        }
        move_checkpoint(&mut tx, name, from, to).await?;
        tx.commit().await?;
        self.applied.send_if_modified(|a| bump(a, to));
        Ok(())
    }

    /// Turns a batch's failure into a step error naming its event: when the batch could
    /// not say which event failed, the events are applied one by one (in a transaction
    /// that is then dropped) to find it.
    pub(crate) async fn locate(
        &self,
        failure: Failure,
        generation: i64,
        events: &[RecordedEvent],
    ) -> StepError {
        let event_type = |position: u64| {
            events
                .iter()
                .find(|e| e.position == position)
                .map_or_else(String::new, |e| e.event_type.clone())
        };
        let event_id = |position: u64| {
            events
                .iter()
                .find(|e| e.position == position)
                .map(|e| e.event_id.to_string())
        };
        if let Some(position) = failure.position {
            return StepError::Event {
                event_type: event_type(position),
                event_id: event_id(position),
                position,
                error: failure.error,
            };
        }
        if !is_poison(&failure.error) {
            return StepError::Other(failure.error);
        }
        let projector = match self.projector() {
            Ok(projector) => projector,
            Err(error) => return StepError::Other(error),
        };
        let mut tx = match self.db.begin_write(generation).await {
            Ok(tx) => tx,
            Err(error) => return StepError::Other(error),
        };
        for event in events {
            if let Err(single) = projector.apply(&mut tx, std::slice::from_ref(event)).await {
                return StepError::Event {
                    position: event.position,
                    event_id: Some(event.event_id.to_string()),
                    event_type: event.event_type.clone(),
                    error: single.error,
                };
            }
        }
        StepError::Other(failure.error)
    }

    /// Steps until caught up; returns how many events were applied.
    pub async fn catch_up(&self) -> Result<usize, ConsumerError> {
        let mut applied = 0;
        while let Outcome::Applied(n) = self.run_once().await? {
            applied += n;
        }
        Ok(applied)
    }

    /// Runs until `stop` turns true, while this process holds the consumer's lease
    /// (taking it over once its holder's expired): steps while there is work, waits for
    /// new events (woken by the store's notification) when caught up, and backs off after
    /// a failure (`duty`); every checkpoint it moves is fenced by the lease.
    pub async fn run_until_stopped(&self, stop: watch::Receiver<bool>) {
        duty::run_until_stopped(self, &self.db, self.lease_life, stop).await;
    }
}

/// A consumer's round under its lease: one step; at once again while there is work,
/// else a rest until the store says new events came.
#[async_trait]
impl Duty for ConsumerRunner {
    fn name(&self) -> &'static str {
        self.consumer.name()
    }

    async fn round(&self, fence: &Fence) -> Result<Duration, ConsumerError> {
        Ok(match self.run_once_under(Some(fence)).await? {
            Outcome::Applied(_) => Duration::ZERO,
            Outcome::CaughtUp | Outcome::Halted => Duration::MAX,
        })
    }

    async fn rest(&self, at_most: Duration) {
        let after = *self.applied.borrow();
        if let Err(error) = self.store.wait_for_events(after, at_most).await {
            tracing::warn!(consumer = self.name(), %error, "waiting for events failed");
        }
    }
}
