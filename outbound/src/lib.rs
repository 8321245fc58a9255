//! The outbound consumers: what delivers the log's events to something outside Annals,
//! at least once, each delivery with its event's id (the same on every redelivery). They
//! run on the consumer engine like every consumer (checkpoint, lease, dead letters,
//! backoff, status); what they need to reach outside (URLs, secrets, clients,
//! connections) comes in `OutboundSettings`, so that neither the engine nor the read
//! models depend on those clients: this crate is the only one that sends HTTP.
//!
//! Each consumer is one file; the registry of the crate that assembles the system
//! (`annals-api`'s `registry`) lists them, built from the settings.
//!
//! Invariant: a delivery the receiver refused for good (`ActionError::Refused`) is
//! parked after its attempts; one it could not take now (`ActionError::NotNow`: down,
//! slow, overloaded) is retried with backoff and never parked.

pub mod forward;

/// What the outbound consumers need from a deployment. Not `Copy`: it carries where to
/// deliver and with which secrets; a consumer that is not set up here is not run.
#[derive(Debug, Clone, Default)]
pub struct OutboundSettings {
    /// Where `forward` delivers every event, when anywhere.
    pub forward: Option<forward::Target>,
}
