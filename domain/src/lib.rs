//! The business of Annals as plain data and pure functions: value objects, and for each
//! aggregate (lead, account, deal, later order and subscription) its commands, events,
//! state, `decide` and `evolve`, with the rules of `shared/spec/domain.md`.
//!
//! It must stay pure: no IO, no async, no database, no clock. Facts from outside (the
//! time, whether an email is taken) arrive inside commands. Filled by the domain issue.
