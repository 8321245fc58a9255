//! The consumer engine: the one runtime of every consumer of the log. A consumer follows
//! the global log in position order from a checkpoint of its own, and is one of three
//! kinds: a read model
//! (its rows and its checkpoint commit in one transaction of the event store's own
//! database: exactly once), a process (it sends commands whose idempotency keys derive
//! from the causing event: at least once, with the effect of once) or an outbound
//! consumer (it delivers outside, at least once, with the event's id).
//!
//! The engine knows no business: it depends on the store only, and sees events as the
//! store records them. What a consumer *is* (a board, the order saga, a webhook) lives
//! in the crates above it (`annals-consumers`, `annals-outbound`).
//!
//! Rooms: `contract` (`Consumer`, `Projector`, `Process`, `Outbound`, what one step did,
//! the failure policy); `error`; `rows` (a read model's row declared once: `Table`,
//! `row!`, `RowModel`); `reports` (what an operator sees); `runner` (`ConsumerRunner`,
//! every method of it in the folder: `register`, `step` (batches, acting, the
//! checkpoint's moves), `status`, `dead_letters` (parking and the operator's retry and
//! skip), `generations` (claims, rebuilds and swaps), `verify` (the comparison));
//! `checkpoint` (its SQL); `lease` (the lease work runs under, renewed in the
//! background, fencing every checkpoint move); `duty` (the one leased loop: lease, act,
//! wait, back off, stop, for a consumer and any other work one process of several does
//! at a time); `sql` (the read-model database).
//!
//! Every read-model row belongs to a *generation* of its projection; readers see only the
//! live one. A rebuild fills a new generation from position 0 beside the live one and
//! swaps by changing one value, so readers never see a half-built read model; verify
//! fills a scratch generation and compares it with the live one at the same position.
//!
//! Invariants: a checkpoint only moves in the transaction that applied the events up to
//! it, and only from the value the runner read (a runner that lost a race applies
//! nothing); under a lease, only while the lease is still its holder's at its epoch
//! (a holder that stalled past its lease's life commits nothing when it wakes); a read
//! model is a pure function of the log (no clock, no randomness), so a rebuild from
//! position 0 gives the same rows. Projectors never append events;
//! processes act only through commands, and are never rebuilt (they have no generations).
//!
//! Generations: a rebuild or verify first *claims* the projection (one at a time; a
//! claim not renewed for `CLAIM_STALE`, 30 s, may be taken over) and in the same statement
//! takes a new generation from a counter that only grows, so no two claims ever share
//! one, and reads which generation is live. Only a claim's holder swaps, and a
//! generation is dropped only in a transaction that still holds the claim and has read
//! the live generation under it: never the live one, and never by a claimant whose
//! claim was taken over.
//! A batch commits only to a generation that is live or claimed as of its commit (it
//! holds the projections row that a swap or a claim updates), so a live runner that
//! read the generation before a swap applies nothing to the old one, and `applied`
//! (what `wait_for` answers from) never runs ahead of the live checkpoint. Verify
//! compares in one read-only snapshot in which both generations stand at one position,
//! in bounded pages by key, holding up no writer.
//!
//! Parked events (dead letters): only an event's own failure parks it (the projector
//! refuses it, or the database refuses what it made of it); an outage (a timeout, a
//! deadlock, a serialization failure, a lock not granted, a lost connection, a busy
//! SQLite file) is retried with backoff and never parks anything. An operator's retry
//! applies a parked event in its place in the log, in one transaction that holds the
//! live checkpoint row (every batch takes that row before it reads any other, so a
//! batch either sees the retry or waits for it) and re-reads the dead letter (a second
//! retry finds nothing to apply); a skip leaves the event unapplied for good, recorded

mod checkpoint;
mod contract;
pub mod duty;
mod error;
mod lease;
mod reports;
pub mod rows;
mod runner;
mod sql;

pub use annals_store::Param;
pub use contract::{
    ActionError, BoxError, Consumer, ConsumerKind, FailurePolicy, Outbound, Outcome, Process,
    Projector,
};
pub use duty::Duty;
pub use error::{ConsumerError, Failure};
pub use lease::{Fence, LEASE_LIFE};
pub use reports::{ConsumerStatus, Difference, DifferenceKind, ParkedEvent, VerifyReport};
pub use rows::{Index, Table};
pub use runner::{ConsumerRunner, PauseHook, PausePoint, RebuildClaim};
pub use sql::{ReadDatabase, ReadTx};
