//! The live runner of a consumer: registering it (a read model's tables as declared),
//! reading the log after its checkpoint in batches, a read model applying each batch and
//! moving the checkpoint in one transaction, a process or an outbound consumer acting on
//! each event and then moving the checkpoint past it; running it where its lease is
//! (`lease`: one process of several), the wait for a position, and its status.
//!
//! Invariant: a checkpoint only moves in the transaction that applied the events up to
//! it, and only from the value the runner read; under a lease, only while that
//! transaction finds the lease still its holder's (`Fence::check`); an outage is retried
//! with backoff and never parks an event.

use std::sync::atomic::Ordering;
use std::time::Duration;

use annals_commands::CommandError;
use annals_store::RecordedEvent;
use tokio::sync::watch;

use crate::lease::{Fence, LeaseKeeper};
use crate::{
    Consumer, ConsumerKind, ConsumerRunner, ConsumerStatus, Failure, FailurePolicy, LEASE_RETRY,
    Outcome, PausePoint, ProjectionError, ReadTx, Table, bump, lock, lock_checkpoint,
    move_checkpoint, read_checkpoint,
};

/// Why a step failed: at an event (which may be parked), or around it.
pub(crate) enum StepError {
    Event {
        position: u64,
        event_id: Option<String>,
        event_type: String,
        error: ProjectionError,
    },
    /// The generation is neither live nor claimed any more (a rebuild swapped it out, or
    /// took its claim over); the batch took nothing.
    Superseded(&'static str),
    Other(ProjectionError),
}

impl<E: Into<ProjectionError>> From<E> for StepError {
    fn from(error: E) -> Self {
        StepError::Other(error.into())
    }
}

impl StepError {
    pub(crate) fn into_error(self) -> ProjectionError {
        match self {
            StepError::Event { error, .. } | StepError::Other(error) => error,
            StepError::Superseded(name) => ProjectionError::CheckpointMoved(name.to_owned()),
        }
    }
}

/// Whether a failure is the event's own (the projector refused it, or the database
/// refused what it made of it), as opposed to an outage, which is retried with backoff
/// forever and never parks an event.
pub(crate) fn is_poison(error: &ProjectionError) -> bool {
    match error {
        ProjectionError::Apply { .. } => true,
        ProjectionError::Database(error) => error.is_refusal(),
        // A process's command: the business's, the handler's or the store's refusal is
        // the event's; the store failing, other writers (also past a version the process
        // read), or the same command in flight are outages: acting again decides anew.
        ProjectionError::Command(CommandError::Store(error)) => {
            matches!(error, annals_store::StoreError::InvalidInput(_)) || error.is_refusal()
        }
        ProjectionError::Command(error) => !matches!(
            error,
            CommandError::ConcurrencyConflict { .. }
                | CommandError::VersionMismatch { .. }
                | CommandError::IdempotencyKeyInUse
        ),
        _ => false,
    }
}

impl ConsumerRunner {
    /// Makes what the database lacks of the projection: its row in `projections`, its
    /// tables and their indexes as declared; refuses a table that lacks a declared column
    /// (`TableChanged`). Once per runner (later calls cost nothing); every use of the
    /// projection does it first, and a process calls it at start so that its queries
    /// find the tables before the runner's first step. What exists is found in the
    /// catalog, so a process that finds everything made takes no lock and writes nothing.
    pub async fn register(&self) -> Result<(), ProjectionError> {
        if self.registered.load(Ordering::Relaxed) {
            return Ok(());
        }
        let name = self.name();
        let known = self
            .db
            .fetch_int(
                "SELECT COUNT(*) FROM projections WHERE name = $1",
                &[name.into()],
            )
            .await?;
        if known == Some(0) {
            let mut tx = self.db.begin_write(0).await?;
            tx.execute(
                "INSERT INTO projections (name, live_generation, rebuilding) \
                 VALUES ($1, 1, NULL) ON CONFLICT (name) DO NOTHING",
                &[name.into()],
            )
            .await?;
            if self.kind() != ConsumerKind::ReadModel {
                // A process that followed the log before the one runtime kept its
                // checkpoint in `process_checkpoints`: it goes on from there.
                tx.execute(
                    "INSERT INTO projection_checkpoints (name, generation, position) \
                     SELECT name, 1, position FROM process_checkpoints WHERE name = $1 \
                     ON CONFLICT (name, generation) DO NOTHING",
                    &[name.into()],
                )
                .await?;
            }
            tx.commit().await?;
        }
        for table in self.consumer.tables() {
            let mut attempts = 0;
            loop {
                match self.make_missing(table).await {
                    Ok(()) => break,
                    // Two processes making one table or index at once: PostgreSQL refuses
                    // the one that commits second, which then finds it made.
                    Err(ProjectionError::Database(error)) if error.is_refusal() && attempts < 3 => {
                        attempts += 1;
                    }
                    Err(error) => return Err(error),
                }
            }
        }
        self.registered.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Makes a declared table that does not exist, with its indexes; or, for one that
    /// does, checks its columns and makes the indexes it lacks. A table made here is
    /// empty, so the projection's checkpoints go with it in the same transaction and the
    /// projection applies the log again from position 0 (a table an operator dropped is
    /// rebuilt, never left missing the history before its checkpoint).
    pub(crate) async fn make_missing(&self, table: &Table) -> Result<(), ProjectionError> {
        let made = self.db.schema_of(table.name).await?;
        if made.is_empty() {
            let mut tx = self.db.begin_write(0).await?;
            for statement in table.create_statements() {
                tx.execute(&statement, &[]).await?;
            }
            tx.execute(
                "DELETE FROM projection_checkpoints WHERE name = $1",
                &[self.name().into()],
            )
            .await?;
            return tx.commit().await;
        }
        let sql = format!(
            "SELECT {} FROM {} WHERE 1 = 0",
            table.columns.join(", "),
            table.name
        );
        if let Err(error) = self.db.fetch_text_rows(&sql, &[]).await {
            return Err(match error {
                ProjectionError::Database(error) if error.is_refusal() => {
                    ProjectionError::TableChanged {
                        projection: self.name().to_owned(),
                        table: table.name.to_owned(),
                        refusal: error,
                    }
                }
                error => error,
            });
        }
        for index in table.indexes {
            if !made.iter().any(|name| name == index.name) {
                let mut tx = self.db.begin_write(0).await?;
                tx.execute(&table.create_index_statement(index), &[])
                    .await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// The generation readers see (registering the projection on first use).
    pub async fn live_generation(&self) -> Result<i64, ProjectionError> {
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
    pub async fn checkpoint(&self) -> Result<u64, ProjectionError> {
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

    pub(crate) async fn checkpoint_of(&self, generation: i64) -> Result<u64, ProjectionError> {
        let mut tx = self.db.begin_read(generation).await?;
        let position = read_checkpoint(&mut tx, self.name()).await?;
        tx.commit().await?;
        Ok(position)
    }

    /// One step of the live generation: the next batch after its checkpoint, applied and
    /// checkpointed in one transaction. A failure rolls the whole batch back. It runs
    /// under no lease: for tests, and a process alone on its database; beside servers,
    /// `run_until_stopped` runs the consumer where its lease is.
    pub async fn run_once(&self) -> Result<Outcome, ProjectionError> {
        self.run_once_under(None).await
    }

    /// `run_once`, with every checkpoint-moving transaction fenced by `fence` when given.
    pub(crate) async fn run_once_under(
        &self,
        fence: Option<&Fence>,
    ) -> Result<Outcome, ProjectionError> {
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
    pub(crate) async fn halted_before(&self) -> Result<Option<u64>, ProjectionError> {
        Ok(match self.policy {
            FailurePolicy::Halt => self
                .parked_after(0, 1)
                .await?
                .first()
                .map(|parked| parked.position.saturating_sub(1)),
            FailurePolicy::Skip => None,
        })
    }

    // ---- Parked events (dead letters) and the operator's retry and skip. ----

    /// A write transaction on the live generation holding its checkpoint row, as a batch
    /// holds it: the generation, and the checkpoint. Retried when a swap changes the live
    /// generation between reading it and taking the row.
    pub(crate) async fn hold_live_checkpoint(&self) -> Result<(ReadTx, i64, u64), ProjectionError> {
        let name = self.name();
        for _ in 0..3 {
            let live = self.live_generation().await?;
            let mut tx = self.db.begin_write(live).await?;
            // The projections row first, then the checkpoint row: the order a batch and a
            // swap take them in, so none of them waits on another in a cycle.
            // A rebuild or verify that holds a claim fills a generation of its own
            // without the parked event; a retry now would reach the live rows only, and
            // the swap would then lose it. So a retry waits for the claim to end (a stale
            // one too: its holder may still swap; the next rebuild takes it over).
            let still_live = tx
                .fetch_int(
                    &format!(
                        "SELECT CASE WHEN rebuilding IS NOT NULL THEN -1 \
                                     ELSE live_generation END \
                           FROM projections WHERE name = $1{}",
                        tx.share_lock()
                    ),
                    &[name.into()],
                )
                .await?;
            if still_live == Some(-1) {
                return Err(ProjectionError::Busy(name.to_owned()));
            }
            if still_live == Some(live) {
                let checkpoint = lock_checkpoint(&mut tx, name, live).await?;
                return Ok((tx, live, checkpoint));
            }
        }
        Err(ProjectionError::Busy(name.to_owned()))
    }

    /// Applies the events after `checkpoint` up to `through` (in log order, leaving out
    /// `left_out`) and moves the checkpoint to `through`, in `tx`, which holds the
    /// checkpoint row.
    pub(crate) async fn apply_through(
        &self,
        tx: &mut ReadTx,
        checkpoint: u64,
        through: u64,
        left_out: &[u64],
    ) -> Result<(), Failure> {
        let projector = self.projector().map_err(Failure::unplaced)?;
        let filter = projector.filter();
        let mut next = checkpoint + 1;
        let mut events = Vec::new();
        while next <= through {
            let wanted = usize::try_from(through - next + 1).unwrap_or(usize::MAX);
            let page = self
                .store
                .read_all(next, wanted.min(self.rebuild_batch), &filter)
                .await
                .map_err(|e| Failure::unplaced(e.into()))?;
            events.extend(
                page.events
                    .into_iter()
                    .filter(|e| e.position <= through && !left_out.contains(&e.position)),
            );
            if page.next_position <= next {
                break;
            }
            next = page.next_position;
        }
        projector.apply(tx, &events).await?;
        // The row is held since `checkpoint` was read from it (`lock_checkpoint`).
        move_checkpoint(tx, self.name(), checkpoint, through)
            .await
            .map_err(Failure::unplaced)
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
            return Err(ProjectionError::CheckpointMoved(name.to_owned()).into());
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
                return Err(ProjectionError::LeaseLost(self.name().to_owned()).into());
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
    ) -> Result<(), ProjectionError> {
        if to <= from {
            return Ok(());
        }
        let name = self.name();
        let mut tx = self.db.begin_write(generation).await?;
        if let Some(fence) = fence {
            fence.check(&mut tx).await?;
        }
        if lock_checkpoint(&mut tx, name, generation).await? != from {
            return Err(ProjectionError::CheckpointMoved(name.to_owned()));
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
    pub async fn catch_up(&self) -> Result<usize, ProjectionError> {
        let mut applied = 0;
        while let Outcome::Applied(n) = self.run_once().await? {
            applied += n;
        }
        Ok(applied)
    }

    /// Runs until `stop` turns true, while this process holds the consumer's lease
    /// (taking it over once its holder's expired): steps while there is work, waits for
    /// new events (woken by the store's notification) when caught up, and backs off after
    /// a failure; every checkpoint it moves is fenced by the lease, and it comes back to
    /// its loop at least every third of the lease's life (which keeps the lease renewed).
    pub async fn run_until_stopped(&self, mut stop: watch::Receiver<bool>) {
        let mut lease = LeaseKeeper::new(self.name(), &self.db, self.lease_life);
        let longest_wait = (self.lease_life / 3).min(Duration::from_secs(5));
        let mut backoff = Duration::from_millis(100);
        while !*stop.borrow() {
            let Some(fence) = lease.hold().await else {
                tokio::select! {
                    _ = stop.changed() => {}
                    () = tokio::time::sleep(LEASE_RETRY) => {}
                }
                continue;
            };
            match self.run_once_under(Some(&fence)).await {
                Ok(Outcome::Applied(_)) => backoff = Duration::from_millis(100),
                Ok(Outcome::CaughtUp | Outcome::Halted) => {
                    let after = *self.applied.borrow();
                    tokio::select! {
                        _ = stop.changed() => {}
                        waited = self.store.wait_for_events(after, longest_wait) => {
                            if let Err(error) = waited {
                                tracing::warn!(projection = self.name(), %error, "waiting for events failed");
                            }
                        }
                    }
                }
                // Said once, by the lease; the next round stands by.
                Err(ProjectionError::LeaseLost(_)) => {}
                Err(error) => {
                    tracing::warn!(projection = self.name(), %error, "projection step failed; retrying");
                    tokio::select! {
                        _ = stop.changed() => {}
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10)).min(longest_wait);
                }
            }
        }
        lease.release().await;
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

    pub async fn status(&self) -> Result<ConsumerStatus, ProjectionError> {
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
