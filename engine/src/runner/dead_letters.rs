//! Parked events (dead letters): parking an event that keeps failing, the operator's
//! list, retry and skip.
//!
//! Invariant: a retry applies a parked event in its place in the log, in one transaction
//! that holds the live checkpoint row and re-reads the dead letter, so a second retry
//! finds nothing to apply; a skip leaves the event unapplied for good, recorded.

use annals_store::{LogFilter, Param, RecordedEvent, StoreError, to_sql_int};

use super::{bump, is_poison, lock, now_text};
use crate::checkpoint::{lock_checkpoint, move_checkpoint};
use crate::{
    ConsumerError, ConsumerKind, ConsumerRunner, Failure, FailurePolicy, Fence, ParkedEvent, ReadTx,
};

impl ConsumerRunner {
    /// A write transaction on the live generation holding its checkpoint row, as a batch
    /// holds it: the generation, and the checkpoint. Retried when a swap changes the live
    /// generation between reading it and taking the row.
    pub(crate) async fn hold_live_checkpoint(&self) -> Result<(ReadTx, i64, u64), ConsumerError> {
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
                return Err(ConsumerError::Busy(name.to_owned()));
            }
            if still_live == Some(live) {
                let checkpoint = lock_checkpoint(&mut tx, name, live).await?;
                return Ok((tx, live, checkpoint));
            }
        }
        Err(ConsumerError::Busy(name.to_owned()))
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

    /// Parks an event; under a lease (`fence`), only while the lease is still this
    /// holder's (a holder that lost it parks nothing: the new one decides).
    pub(crate) async fn park(
        &self,
        position: u64,
        event_id: Option<&str>,
        event_type: &str,
        error: &str,
        attempts: u32,
        fence: Option<&Fence>,
    ) -> Result<(), ConsumerError> {
        let mut tx = self.db.begin_write(0).await?;
        if let Some(fence) = fence {
            fence.check(&mut tx).await?;
        }
        tx.execute(
            "INSERT INTO projection_dead_letters \
                    (name, position, event_type, error, attempts, event_id, parked_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (name, position) DO UPDATE \
                SET error = excluded.error, attempts = excluded.attempts",
            &[
                self.name().into(),
                to_sql_int(position).into(),
                event_type.into(),
                error.into(),
                i64::from(attempts).into(),
                event_id.map(str::to_owned).into(),
                now_text().into(),
            ],
        )
        .await?;
        tx.commit().await
    }

    /// The events this projection parked and nobody skipped, oldest first.
    pub async fn parked(&self) -> Result<Vec<ParkedEvent>, ConsumerError> {
        self.parked_after(0, usize::MAX).await
    }

    /// A page of `parked`: at most `limit` parked events after position `after`.
    pub async fn parked_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ParkedEvent>, ConsumerError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.dead_letters(
            "skipped_at IS NULL AND position > $2 ORDER BY position LIMIT $3",
            &[to_sql_int(after).into(), limit.into()],
        )
        .await
    }

    /// The dead letter at `position`, parked or skipped.
    pub async fn dead_letter(&self, position: u64) -> Result<Option<ParkedEvent>, ConsumerError> {
        let mut found = self
            .dead_letters("position = $2", &[to_sql_int(position).into()])
            .await?;
        Ok(found.pop())
    }

    pub(crate) async fn dead_letters(
        &self,
        condition: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<ParkedEvent>, ConsumerError> {
        let mut all = vec![Param::from(self.name())];
        all.extend_from_slice(params);
        let rows = self
            .db
            .fetch_text_rows(
                &format!(
                    "SELECT CAST(position AS TEXT), event_type, error, CAST(attempts AS TEXT), \
                            event_id, parked_at, skipped_by, skipped_at \
                       FROM projection_dead_letters WHERE name = $1 AND {condition}"
                ),
                &all,
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let column = |i: usize| row.get(i).cloned().flatten();
                let text = |i: usize| column(i).unwrap_or_default();
                ParkedEvent {
                    position: text(0).parse().unwrap_or(0),
                    event_type: text(1),
                    error: text(2),
                    attempts: text(3).parse().unwrap_or(0),
                    event_id: column(4),
                    parked_at: column(5),
                    skipped_by: column(6),
                    skipped_at: column(7),
                }
            })
            .collect())
    }

    /// The positions a batch leaves out: skipped events always; parked ones too when the
    /// projection goes on without them (a halted one stops before its parked event).
    pub(crate) async fn left_out(&self) -> Result<Vec<u64>, ConsumerError> {
        self.dead_letter_positions(match self.policy {
            FailurePolicy::Skip => "",
            FailurePolicy::Halt => " AND skipped_at IS NOT NULL",
        })
        .await
    }

    /// The positions of this consumer's dead letters that meet `condition` (`AND …`, or
    /// nothing for all of them).
    async fn dead_letter_positions(&self, condition: &str) -> Result<Vec<u64>, ConsumerError> {
        let rows = self
            .db
            .fetch_text_rows(
                &format!(
                    "SELECT CAST(position AS TEXT) FROM projection_dead_letters \
                      WHERE name = $1{condition}"
                ),
                &[self.name().into()],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|row| row.first().cloned().flatten()?.parse().ok())
            .collect())
    }

    /// An operator's retry of every parked event, oldest first (see `retry_parked_event`).
    /// Returns how many are still parked.
    pub async fn retry_parked(&self) -> Result<usize, ConsumerError> {
        let mut still = 0;
        for parked in self.parked().await? {
            match self.retry_parked_event(parked.position).await {
                Ok(()) | Err(ConsumerError::NotParked { .. }) => {}
                Err(ConsumerError::StillFailing { .. }) => still += 1,
                Err(error) => return Err(error),
            }
        }
        Ok(still)
    }

    /// An operator's retry of the parked event at `position`: applied now, in one
    /// transaction that holds the live checkpoint (a live batch running meanwhile either
    /// sees the retry or rolls back) and re-reads the dead letter (`NotParked` when a
    /// concurrent retry or skip took it: an event is never applied twice), in log order:
    /// ahead of the checkpoint (a halted projection), the events up to it are applied and
    /// the checkpoint moves to it; behind it (a skipping one), the rows it touches are
    /// re-folded from the log. When it fails again it stays parked with the new error
    /// (`StillFailing`); an outage is returned as it is, and counts no attempt.
    pub async fn retry_parked_event(&self, position: u64) -> Result<(), ConsumerError> {
        let name = self.name();
        let not_parked = || ConsumerError::NotParked {
            consumer: name.to_owned(),
            position,
        };
        let event = self
            .store
            .read_all(position, 1, &LogFilter::all())
            .await?
            .events
            .into_iter()
            .find(|e| e.position == position)
            .ok_or_else(not_parked)?;
        if self.kind() != ConsumerKind::ReadModel {
            return self.retry_acting(&event, not_parked).await;
        }
        let (mut tx, live, checkpoint) = self.hold_live_checkpoint().await?;
        let held = tx
            .execute(
                "UPDATE projection_dead_letters SET attempts = attempts \
                  WHERE name = $1 AND position = $2 AND skipped_at IS NULL",
                &[name.into(), to_sql_int(position).into()],
            )
            .await?;
        if held != 1 {
            return Err(not_parked());
        }
        let others: Vec<u64> = tx
            .fetch_text_rows(
                "SELECT CAST(position AS TEXT) FROM projection_dead_letters \
                  WHERE name = $1 AND position <> $2",
                &[name.into(), to_sql_int(position).into()],
            )
            .await?
            .iter()
            .filter_map(|row| row.first().cloned().flatten()?.parse().ok())
            .collect();
        let applied = if position > checkpoint {
            self.apply_through(&mut tx, checkpoint, position, &others)
                .await
        } else {
            self.refold_at(&mut tx, &event, checkpoint, &others).await
        };
        match applied {
            Ok(()) => {
                tx.execute(
                    "DELETE FROM projection_dead_letters WHERE name = $1 AND position = $2",
                    &[name.into(), to_sql_int(position).into()],
                )
                .await?;
                tx.commit().await?;
                *lock(&self.failing) = None;
                *lock(&self.last_error) = None;
                if position > checkpoint {
                    self.applied.send_if_modified(|a| bump(a, position));
                }
                tracing::info!(projection = name, position, live, "parked event retried");
                Ok(())
            }
            Err(failure) if is_poison(&failure.error) => {
                drop(tx);
                Err(self.still_failing(position, &failure.error).await?)
            }
            Err(failure) => Err(failure.error),
        }
    }

    /// Records that a retried event failed again with `error`: it stays parked, one
    /// attempt more; returns the operator's answer (`StillFailing`).
    async fn still_failing(
        &self,
        position: u64,
        error: &ConsumerError,
    ) -> Result<ConsumerError, ConsumerError> {
        let reason = error.to_string();
        let mut tx = self.db.begin_write(0).await?;
        tx.execute(
            "UPDATE projection_dead_letters SET error = $3, attempts = attempts + 1 \
              WHERE name = $1 AND position = $2 AND skipped_at IS NULL",
            &[
                self.name().into(),
                to_sql_int(position).into(),
                reason.clone().into(),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(ConsumerError::StillFailing { position, reason })
    }

    /// A retry for a process or an outbound consumer: it acts on the event (and, when it
    /// halted there, first on the events before it), outside any transaction, then in one
    /// transaction takes the dead letter off and moves the checkpoint to it if it was
    /// behind. Acting happens before the dead letter is taken, so two retries at once may
    /// both act: a process's idempotency keys, or the delivery's stable id, make that
    /// once; only one of them answers applied.
    async fn retry_acting(
        &self,
        event: &RecordedEvent,
        not_parked: impl Fn() -> ConsumerError,
    ) -> Result<(), ConsumerError> {
        let (name, position) = (self.name(), event.position);
        let parked = self.dead_letter(position).await?;
        if parked.is_none_or(|p| p.skipped_at.is_some()) {
            return Err(not_parked());
        }
        let generation = self.live_generation().await?;
        let before = self.checkpoint_of(generation).await?;
        let mut due = Vec::new();
        if position > before + 1 {
            let others = self.dead_letter_positions("").await?;
            let filter = self.consumer.filter();
            let mut next = before + 1;
            while next < position {
                let page = self
                    .store
                    .read_all(next, self.rebuild_batch, &filter)
                    .await?;
                due.extend(
                    page.events
                        .into_iter()
                        .filter(|e| e.position < position && !others.contains(&e.position)),
                );
                if page.next_position <= next {
                    break;
                }
                next = page.next_position;
            }
        }
        due.push(event.clone());
        for each in &due {
            match self.consumer.act(each).await {
                Ok(()) => {}
                Err(error) if is_poison(&error) && each.position == position => {
                    return Err(self.still_failing(position, &error).await?);
                }
                Err(error) => return Err(error),
            }
        }
        let mut tx = self.db.begin_write(generation).await?;
        let taken = tx
            .execute(
                "DELETE FROM projection_dead_letters \
                  WHERE name = $1 AND position = $2 AND skipped_at IS NULL",
                &[name.into(), to_sql_int(position).into()],
            )
            .await?;
        if taken != 1 {
            return Err(not_parked());
        }
        let checkpoint = lock_checkpoint(&mut tx, name, generation).await?;
        if position > checkpoint {
            if checkpoint != before {
                return Err(ConsumerError::CheckpointMoved(name.to_owned()));
            }
            move_checkpoint(&mut tx, name, checkpoint, position).await?;
        }
        tx.commit().await?;
        *lock(&self.failing) = None;
        *lock(&self.last_error) = None;
        self.applied.send_if_modified(|a| bump(a, position));
        tracing::info!(consumer = name, position, "parked event retried");
        Ok(())
    }

    /// An operator's skip of the parked event at `position`: left unapplied for good,
    /// recorded with `actor` and the time. A halted projection goes on after it.
    pub async fn skip_parked_event(
        &self,
        position: u64,
        actor: &str,
    ) -> Result<ParkedEvent, ConsumerError> {
        let name = self.name();
        let mut tx = self.db.begin_write(0).await?;
        let skipped = tx
            .execute(
                "UPDATE projection_dead_letters SET skipped_by = $3, skipped_at = $4 \
                  WHERE name = $1 AND position = $2 AND skipped_at IS NULL",
                &[
                    name.into(),
                    to_sql_int(position).into(),
                    actor.into(),
                    now_text().into(),
                ],
            )
            .await?;
        if skipped != 1 {
            return Err(ConsumerError::NotParked {
                consumer: name.to_owned(),
                position,
            });
        }
        tx.commit().await?;
        *lock(&self.failing) = None;
        *lock(&self.last_error) = None;
        tracing::warn!(projection = name, position, actor, "parked event skipped");
        self.dead_letter(position)
            .await?
            .ok_or_else(|| ConsumerError::Corrupt(format!("dead letter {position} vanished")))
    }

    /// Re-folds the rows `event` touches from the log up to `checkpoint` (leaving out
    /// `left_out`, including `event`), in `tx`, which holds the checkpoint row.
    pub(crate) async fn refold_at(
        &self,
        tx: &mut ReadTx,
        event: &RecordedEvent,
        checkpoint: u64,
        left_out: &[u64],
    ) -> Result<(), Failure> {
        let projector = self.projector().map_err(Failure::unplaced)?;
        let filter = projector.filter();
        let unplaced = |e: StoreError| Failure::unplaced(e.into());
        let mut history = Vec::new();
        if projector.rows_follow_streams() {
            let stream = annals_store::StreamName::parse(event.stream.clone()).map_err(unplaced)?;
            let mut from = 1;
            loop {
                let page = self
                    .store
                    .read_stream(
                        &stream,
                        from,
                        annals_store::Direction::Forwards,
                        self.rebuild_batch,
                    )
                    .await
                    .map_err(unplaced)?;
                let Some(last) = page.last() else { break };
                from = last.version + 1;
                let done = page.len() < self.rebuild_batch || last.position > checkpoint;
                history.extend(page.into_iter().filter(|e| filter.matches(e)));
                if done {
                    break;
                }
            }
        } else {
            let mut next = 1;
            while next <= checkpoint {
                let page = self
                    .store
                    .read_all(next, self.rebuild_batch, &filter)
                    .await
                    .map_err(unplaced)?;
                history.extend(page.events);
                if page.next_position <= next {
                    break;
                }
                next = page.next_position;
            }
        }
        history.retain(|e| e.position <= checkpoint && !left_out.contains(&e.position));
        projector.refold(tx, event, &history).await
    }
}
