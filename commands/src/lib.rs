//! Command handling: load an aggregate (snapshot, cache, events), `decide`, and append
//! with the expected version; retry a lost race against the new state; idempotency keys
//! stored in the same transaction as the events.
//!
//! It holds no business rules (those are `annals-domain`'s) and no SQL (that is
//! `annals-store`'s). Filled by the command-handling issue.
