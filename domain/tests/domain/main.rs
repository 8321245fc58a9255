//! The domain's tests, in one binary: every rule accepted and refused (`rules` for
//! leads, accounts and deals; `order`; `subscription`; `routing`; `timer`), invariants
//! over random command sequences (`properties`), and the stored form of every event
//! (`events`).

// A test that cannot go on should stop loudly; `unwrap` says so shortest.
#![allow(clippy::unwrap_used)]

mod events;
mod order;
mod properties;
mod routing;
mod rules;
mod subscription;
mod timer;
