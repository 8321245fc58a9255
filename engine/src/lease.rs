//! The lease a consumer (or the timer scheduler) runs under, held by one process of those
//! sharing the database: taking it, renewing it in the background, knowing locally whether
//! this process may still act, and the fence every checkpoint-moving transaction asks.
//!
//! The store's leases (`annals_store::leases`) expire by the database's clock unless
//! renewed. The keeper renews every third of the lease's life while its holder shows
//! life (it comes back to its loop, or takes an event, within two thirds of a life), and
//! knows locally, by a monotonic clock, until when it may act: the start of its last
//! successful renewal plus the life, less a tenth. A holder past that (it could not
//! renew in time; it was paused, say by SIGSTOP, and woke) stops acting and says
//! `lease lost`; another process takes the lease over once it expired by the
//! database's clock. Whatever the old holder still does is refused by the fence
//! (`Fence::check`) in the transaction that would move its checkpoint.
//!
//! Invariant: the engine's lease is by name only; it knows nothing of what it guards.
//! `duty` is the one loop that keeps a lease.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use annals_store::Lease;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::runner::lock;
use crate::{ConsumerError, ReadDatabase, ReadTx};

/// A lease's life unless a deployment sets one (`ANNALS_LEASE_TTL`).
pub const LEASE_LIFE: Duration = Duration::from_secs(10);

/// What the holder of a lease knows locally of it.
#[derive(Debug)]
struct Validity {
    name: &'static str,
    /// Until when this process may act under the lease (monotonic).
    until: Mutex<Instant>,
    /// When its holder last showed life (came back to its loop, took an event).
    beat: Mutex<Instant>,
    lost: AtomicBool,
}

impl Validity {
    fn valid(&self) -> bool {
        !self.lost.load(Ordering::SeqCst) && Instant::now() < *lock(&self.until)
    }

    /// Marks the lease lost, and says so once.
    fn lose(&self, why: &str) {
        if !self.lost.swap(true, Ordering::SeqCst) {
            tracing::warn!(consumer = self.name, why, "lease lost; standing down");
        }
    }
}

/// What a holder acts under: its lease, and whether it may still act.
#[derive(Debug, Clone)]
pub struct Fence {
    lease: Lease,
    validity: Arc<Validity>,
}

impl Fence {
    /// Whether this process may still act under the lease (local knowledge: the last
    /// renewal is recent enough); also shows the keeper that its holder is alive.
    pub fn may_act(&self) -> bool {
        *lock(&self.validity.beat) = Instant::now();
        let valid = self.validity.valid();
        if !valid {
            self.validity.lose("not renewed within its life");
        }
        valid
    }

    /// In a transaction that moves a checkpoint: refuses (`LeaseLost`, and the caller
    /// rolls back) unless the lease is still this holder's at its epoch and unexpired by
    /// the database's clock, holding its row until the transaction ends.
    pub async fn check(&self, tx: &mut ReadTx) -> Result<(), ConsumerError> {
        let lost = || ConsumerError::LeaseLost(self.validity.name.to_owned());
        if !self.may_act() {
            return Err(lost());
        }
        if !tx.fence(&self.lease).await? {
            self.validity.lose("taken over, or expired");
            return Err(lost());
        }
        Ok(())
    }
}

/// A lease across processes on one name (a consumer's, or the timer scheduler's), kept
/// by the one loop that works under it: held, or tried for, before each round of work.
pub(crate) struct LeaseKeeper {
    name: &'static str,
    db: ReadDatabase,
    life: Duration,
    held: Option<(Fence, JoinHandle<()>)>,
}

impl LeaseKeeper {
    pub(crate) fn new(name: &'static str, db: &ReadDatabase, life: Duration) -> Self {
        LeaseKeeper {
            name,
            db: db.clone(),
            life,
            held: None,
        }
    }

    /// What this process may act under now: the lease it holds while still valid, or
    /// the lease taken now; `None` while another process holds it (or it cannot be
    /// reached). A lease found lost is let go, and taken again only once it expired.
    pub(crate) async fn hold(&mut self) -> Option<Fence> {
        if let Some((fence, renewer)) = &self.held {
            if fence.may_act() {
                return Some(fence.clone());
            }
            renewer.abort();
            self.held = None;
        }
        let started = Instant::now();
        match self
            .db
            .try_lease(self.name, annals_store::holder_of_this_process(), self.life)
            .await
        {
            Ok(Some(lease)) => {
                tracing::info!(
                    consumer = self.name,
                    holder = lease.holder,
                    epoch = lease.epoch,
                    "lease taken; running"
                );
                let validity = Arc::new(Validity {
                    name: self.name,
                    until: Mutex::new(started + valid_for(self.life)),
                    beat: Mutex::new(Instant::now()),
                    lost: AtomicBool::new(false),
                });
                let fence = Fence { lease, validity };
                let renewer = tokio::spawn(renew(self.db.clone(), fence.clone(), self.life));
                self.held = Some((fence.clone(), renewer));
                Some(fence)
            }
            // At debug level: a standby process says, each time it looks, that it found
            // the lease taken.
            Ok(None) => {
                tracing::debug!(consumer = self.name, "lease held elsewhere; standing by");
                None
            }
            Err(error) => {
                tracing::warn!(consumer = self.name, %error, "taking the lease failed");
                None
            }
        }
    }

    /// Gives the lease back, so another process takes it at once.
    pub(crate) async fn release(mut self) {
        if let Some((fence, renewer)) = self.held.take() {
            renewer.abort();
            if let Err(error) = self.db.release_lease(&fence.lease).await {
                tracing::warn!(consumer = self.name, %error, "releasing the lease failed");
            }
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        if let Some((_, renewer)) = &self.held {
            renewer.abort();
        }
    }
}

/// How long after the start of a successful take or renewal the holder may act: the
/// life less a tenth, for the time the statement took to reach the database.
fn valid_for(life: Duration) -> Duration {
    life.saturating_sub(life / 10)
}

/// Renews the lease every third of its life while its holder shows life, until it is
/// lost: taken over (the renewal finds another epoch), or not renewed in time.
async fn renew(db: ReadDatabase, fence: Fence, life: Duration) {
    let validity = &fence.validity;
    loop {
        tokio::time::sleep(life / 3).await;
        if !validity.valid() {
            validity.lose("not renewed within its life");
            return;
        }
        let silent = Instant::now().saturating_duration_since(*lock(&validity.beat));
        if silent >= life * 2 / 3 {
            // The holder has not come back for most of a life: it is stalled (a hung
            // step, a pause). Its lease lapses, and another process takes the work over.
            validity.lose("its holder stalled");
            return;
        }
        let started = Instant::now();
        let left = lock(&validity.until).saturating_duration_since(started);
        match tokio::time::timeout(left, db.renew_lease(&fence.lease, life)).await {
            Ok(Ok(true)) => *lock(&validity.until) = started + valid_for(life),
            Ok(Ok(false)) => {
                validity.lose("taken over");
                return;
            }
            Ok(Err(error)) => {
                tracing::warn!(consumer = validity.name, %error, "renewing the lease failed");
            }
            Err(_) => {}
        }
    }
}
