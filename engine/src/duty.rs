//! The one leased loop: work that one process of those sharing the database does at a
//! time (a consumer, the timer scheduler, the purge of expired idempotency keys) runs in
//! rounds under a lease, and rests between them. The loop takes the lease (or stands by
//! while another process holds it), does a round, rests as long as the round said (woken
//! early when the duty knows new work came), backs off after a failure, and gives the
//! lease back when it stops. What differs between duties is `Duty::round`.
//!
//! Invariants: a round runs only under a lease this process holds (its fence); the loop
//! comes back at least every third of the lease's life, which keeps the lease renewed
//! while the work is alive; a failure is retried after a backoff (100 ms doubling, at
//! most 10 s and a third of a life), never in a busy loop; a stop is seen within a rest.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::lease::{Fence, LeaseKeeper};
use crate::{ConsumerError, ReadDatabase};

/// How often a process that does not hold a lease tries to take it: a take-over comes
/// within this of the lease's expiry.
const LEASE_RETRY: Duration = Duration::from_secs(2);
/// The first wait after a failed round; it doubles on each failure in a row.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait after failed rounds.
const LONGEST_BACKOFF: Duration = Duration::from_secs(10);
/// The longest rest between rounds, whatever a round asks for.
const LONGEST_REST: Duration = Duration::from_secs(5);

/// Work done in rounds by one process of several at a time, under a lease of its name.
#[async_trait]
pub trait Duty: Send + Sync {
    /// The lease's name (a consumer's own name, or the work's).
    fn name(&self) -> &'static str;

    /// One round of work under `fence` (asked before each step that acts: `may_act`,
    /// and in each transaction that must not commit once the lease is lost: `check`);
    /// how long the loop may rest before the next round (zero: go on at once).
    async fn round(&self, fence: &Fence) -> Result<Duration, ConsumerError>;

    /// Rests for `at_most`, or less when new work may have come (the store's
    /// notification, a read model's progress). Sleeps unless the duty knows better.
    async fn rest(&self, at_most: Duration) {
        tokio::time::sleep(at_most).await;
    }
}

/// Runs `duty` until `stop` turns true, while this process holds its lease (taking it
/// over once its holder's expired; `life` is how long the lease lives unless renewed),
/// then gives the lease back.
pub async fn run_until_stopped(
    duty: &dyn Duty,
    db: &ReadDatabase,
    life: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut lease = LeaseKeeper::new(duty.name(), db, life);
    let longest_rest = (life / 3).min(LONGEST_REST);
    let mut backoff = FIRST_BACKOFF;
    while !*stop.borrow() {
        let Some(fence) = lease.hold().await else {
            tokio::select! {
                _ = stop.changed() => {}
                () = tokio::time::sleep(LEASE_RETRY) => {}
            }
            continue;
        };
        match duty.round(&fence).await {
            Ok(rest) => {
                backoff = FIRST_BACKOFF;
                if !rest.is_zero() {
                    tokio::select! {
                        _ = stop.changed() => {}
                        () = duty.rest(rest.min(longest_rest)) => {}
                    }
                }
            }
            // Said once, by the lease; the next round stands by.
            Err(ConsumerError::LeaseLost(_)) => {}
            Err(error) => {
                tracing::warn!(duty = duty.name(), %error, "a round failed; retrying");
                tokio::select! {
                    _ = stop.changed() => {}
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(LONGEST_BACKOFF).min(longest_rest);
            }
        }
    }
    lease.release().await;
}
