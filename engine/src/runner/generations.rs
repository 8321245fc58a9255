//! Generations: claiming a spare generation for a rebuild or verify, renewing and
//! releasing the claim, filling the generation from position 0 and swapping it in.
//!
//! Invariant: only a claim's holder swaps; a generation is dropped only in a
//! transaction that still holds the claim and has read the live generation under it.

use super::{StepError, bump, now_micros};
use crate::checkpoint::read_checkpoint_of;
use crate::rows::Column;
use crate::{
    ConsumerError, ConsumerRunner, FailurePolicy, Outcome, PausePoint, ReadTx, RebuildClaim,
};

impl ConsumerRunner {
    /// Claims the projection for a rebuild or a verify and takes a spare generation, in
    /// one transaction: the claim (the projection free, or its claim left stale by a
    /// process that stopped renewing it) takes the next number of the projection's
    /// generation counter and reads which generation is live, and the leftovers of
    /// earlier claims (neither live nor this one) are dropped under it. No swap can come
    /// between reading the live generation and the drop: only a claim's holder swaps.
    /// Returns (live, spare).
    pub(crate) async fn claim_spare_generation(&self) -> Result<(i64, i64), ConsumerError> {
        // Only a read model has generations (its rows); a process is never re-run.
        self.projector()?;
        // Registers the projection on first use.
        self.live_generation().await?;
        self.pause(PausePoint::Claim).await;
        let name = self.name();
        let mut tx = self.db.begin_write(0).await?;
        let claimed = tx
            .fetch_text_rows(
                "UPDATE projections \
                    SET rebuilding = next_generation, next_generation = next_generation + 1, \
                        rebuild_seen_micros = $2 \
                  WHERE name = $1 AND (rebuilding IS NULL OR rebuild_seen_micros IS NULL \
                                       OR rebuild_seen_micros < $3) \
                  RETURNING CAST(live_generation AS TEXT), CAST(rebuilding AS TEXT)",
                &[name.into(), now_micros().into(), self.stale_before().into()],
            )
            .await?;
        let Some(row) = claimed.first() else {
            return Err(ConsumerError::Busy(name.to_owned()));
        };
        let generation = |i: usize| {
            i64::read(row.get(i), "generation")
                .map_err(|_| ConsumerError::Corrupt(format!("projections row of {name}")))
        };
        let (live, spare) = (generation(0)?, generation(1)?);
        // Every generation with rows has a checkpoint row: they commit together.
        let leftovers = tx
            .fetch_text_rows(
                "SELECT CAST(generation AS TEXT) FROM projection_checkpoints \
                  WHERE name = $1 AND generation <> $2 AND generation <> $3",
                &[name.into(), live.into(), spare.into()],
            )
            .await?;
        for leftover in &leftovers {
            if let Some(generation) = Option::<i64>::read(leftover.first(), "generation")? {
                self.delete_generation(&mut tx, generation).await?;
            }
        }
        tx.commit().await?;
        self.pause(PausePoint::Claimed).await;
        Ok((live, spare))
    }

    /// Renews the claim on `spare`; fails when another process has taken it over.
    pub(crate) async fn renew_claim(&self, spare: i64) -> Result<(), ConsumerError> {
        let mut tx = self.db.begin_write(0).await?;
        let renewed = self.hold_claim(&mut tx, spare).await?;
        tx.commit().await?;
        if renewed.is_none() {
            return Err(ConsumerError::Busy(self.name().to_owned()));
        }
        Ok(())
    }

    /// Renews the claim on `spare` in `tx`, holding the projections row until `tx` ends
    /// (no batch commits, no swap or claim happens meanwhile); the live generation, or
    /// `None` when the claim is no longer this runner's.
    pub(crate) async fn hold_claim(
        &self,
        tx: &mut ReadTx,
        spare: i64,
    ) -> Result<Option<i64>, ConsumerError> {
        tx.fetch_int(
            "UPDATE projections SET rebuild_seen_micros = $3 \
              WHERE name = $1 AND rebuilding = $2 RETURNING live_generation",
            &[self.name().into(), spare.into(), now_micros().into()],
        )
        .await
    }

    /// Ends the claim on `claimed` and drops `generation` (when given) in the same
    /// transaction: only while the claim is still this runner's (one taken over may have
    /// the taker's work in it), and never the live generation. Returns whether the claim
    /// was still this runner's.
    pub(crate) async fn release_claim(
        &self,
        claimed: i64,
        generation: Option<i64>,
    ) -> Result<bool, ConsumerError> {
        let mut tx = self.db.begin_write(0).await?;
        let live = tx
            .fetch_int(
                "UPDATE projections SET rebuilding = NULL \
                  WHERE name = $1 AND rebuilding = $2 RETURNING live_generation",
                &[self.name().into(), claimed.into()],
            )
            .await?;
        let Some(live) = live else {
            return Ok(false);
        };
        if let Some(generation) = generation.filter(|g| *g != live) {
            self.delete_generation(&mut tx, generation).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Deletes one generation's rows and checkpoint, in the caller's transaction (which
    /// holds the claim: see `release_claim` and `claim_spare_generation`).
    pub(crate) async fn delete_generation(
        &self,
        tx: &mut ReadTx,
        generation: i64,
    ) -> Result<(), ConsumerError> {
        for table in self.consumer.tables() {
            tx.execute(
                &format!("DELETE FROM {} WHERE generation = $1", table.name),
                &[generation.into()],
            )
            .await?;
        }
        tx.execute(
            "DELETE FROM projection_checkpoints WHERE name = $1 AND generation = $2",
            &[self.name().into(), generation.into()],
        )
        .await?;
        Ok(())
    }

    /// Brings `generation` up to the head of the log (or `limit`), in large batches,
    /// renewing the claim on `spare` after each. It applies what the live runner applies
    /// and nothing else: skipped events are left out (and parked ones, under the skip
    /// policy, by `step`), and under the halt policy it stops before the oldest parked
    /// event, where the live runner halts. A parked event is resolved only by an
    /// operator's retry or skip, never by a rebuild, so live, rebuild, verify, retry and
    /// skip agree on which events a board holds.
    pub(crate) async fn fill(
        &self,
        generation: i64,
        limit: Option<u64>,
        spare: i64,
    ) -> Result<(), ConsumerError> {
        loop {
            // Read again at every batch: the live runner may park an event meanwhile.
            let halt = self.halted_before().await?;
            let limit = match (limit, halt) {
                (Some(limit), Some(halt)) => Some(limit.min(halt)),
                (limit, halt) => limit.or(halt),
            };
            match self.step(generation, limit, self.rebuild_batch, None).await {
                Ok((outcome, reached)) => {
                    self.progress.send_replace(reached);
                    self.renew_claim(spare).await?;
                    if !matches!(outcome, Outcome::Applied(_)) {
                        return Ok(());
                    }
                    self.pause(PausePoint::FillBatch).await;
                }
                Err(StepError::Superseded(name)) => {
                    return Err(ConsumerError::Busy(name.to_owned()));
                }
                Err(failure) => return Err(failure.into_error()),
            }
        }
    }

    /// Rebuilds the projection from position 0 beside the live generation and swaps when
    /// the new one has caught up; readers see the old one until the swap, then the new.
    pub async fn rebuild(&self) -> Result<(), ConsumerError> {
        let claim = self.claim_rebuild().await?;
        self.finish_rebuild(claim).await
    }

    /// The first half of `rebuild`: claims the projection (`Busy` when a rebuild or
    /// verify holds it), so a caller can answer at once and rebuild in the background.
    pub async fn claim_rebuild(&self) -> Result<RebuildClaim, ConsumerError> {
        let (_, new) = self.claim_spare_generation().await?;
        Ok(RebuildClaim { new })
    }

    /// The second half of `rebuild`: fills the claimed generation and swaps it in, then
    /// drops the generation it replaced. On failure it drops its own, if its claim is
    /// still its own.
    pub async fn finish_rebuild(&self, claim: RebuildClaim) -> Result<(), ConsumerError> {
        let RebuildClaim { new } = claim;
        match self.build_and_swap(new).await {
            Ok(old) => {
                self.release_claim(new, Some(old)).await?;
                Ok(())
            }
            Err(error) => {
                self.release_claim(new, Some(new)).await?;
                Err(error)
            }
        }
    }

    /// Fills `new` and makes it live once it has reached the live generation; returns
    /// the generation it replaced. The claim is kept (for dropping the old generation).
    pub(crate) async fn build_and_swap(&self, new: i64) -> Result<i64, ConsumerError> {
        let name = self.name();
        loop {
            self.fill(new, None, new).await?;
            // The claim's row first: a live batch holds it until it commits, so the
            // checkpoints read after it are final until the swap commits.
            let mut tx = self.db.begin_write(0).await?;
            let Some(live) = self.hold_claim(&mut tx, new).await? else {
                return Err(ConsumerError::Busy(name.to_owned()));
            };
            let live_at = read_checkpoint_of(&mut tx, name, live).await?;
            let new_at = read_checkpoint_of(&mut tx, name, new).await?;
            // An event the live runner parked (halting) after this generation had passed
            // it: swapped in, the board would hold what the live one halted before.
            if self.policy == FailurePolicy::Halt
                && let Some(parked) = tx
                    .fetch_int(
                        "SELECT MIN(position) FROM projection_dead_letters \
                          WHERE name = $1 AND skipped_at IS NULL",
                        &[name.into()],
                    )
                    .await?
                && u64::try_from(parked).is_ok_and(|parked| parked <= new_at)
            {
                tracing::warn!(
                    projection = name,
                    parked,
                    "an event was parked behind the rebuild; retry or skip it, then rebuild"
                );
                return Err(ConsumerError::Busy(name.to_owned()));
            }
            if new_at >= live_at {
                tx.execute(
                    "UPDATE projections SET live_generation = $2 WHERE name = $1",
                    &[name.into(), new.into()],
                )
                .await?;
                tx.commit().await?;
                self.applied.send_if_modified(|a| bump(a, new_at));
                return Ok(live);
            }
            // The live generation moved on meanwhile: catch up again.
        }
    }
}
