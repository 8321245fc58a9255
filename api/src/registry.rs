//! The one list of the log's consumers: every read model, process and outbound
//! consumer, in a stable order (the order `/admin/consumers` shows), built from what
//! each needs: the command handlers for processes, the settings a deployment gives, the
//! clock. A new consumer is one file in its room and one line here.

use std::sync::Arc;

use annals_commands::Handlers;
use annals_consumers::processes::{ProcessSettings, lead_conversion, lead_routing, order_saga};
use annals_consumers::read_models::{
    account_360, deal_board, due_timers, lead_board, lead_response, order_board, revenue,
    subscription_board,
};
use annals_consumers::timers::Clock;
use annals_engine::Consumer;
use annals_outbound::{OutboundSettings, forward};

/// What a deployment sets for the consumers.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub processes: ProcessSettings,
    pub outbound: OutboundSettings,
    /// How long a lease on a consumer (or other leased work: the timer scheduler, the
    /// purge) lives unless renewed (10 s unless set; every process of a deployment must
    /// use the same): the bound on a take-over after its holder stalls or dies.
    pub lease_life: chrono::Duration,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        ConsumerSettings {
            processes: ProcessSettings::default(),
            outbound: OutboundSettings::default(),
            lease_life: chrono::Duration::from_std(annals_engine::LEASE_LIFE)
                .unwrap_or(chrono::Duration::MAX),
        }
    }
}

/// Every consumer of the log, in a stable order. Processes act through `handlers`, and
/// read the time (an invoice's, say) from `clock`.
pub fn consumers(
    handlers: &Handlers,
    settings: &ConsumerSettings,
    clock: Arc<dyn Clock>,
) -> Vec<Consumer> {
    let processes = &settings.processes;
    let mut consumers = vec![
        Consumer::ReadModel(Arc::new(lead_board::LeadBoard)),
        Consumer::ReadModel(Arc::new(deal_board::DealBoard)),
        Consumer::ReadModel(Arc::new(account_360::Account360)),
        Consumer::ReadModel(Arc::new(due_timers::DueTimers)),
        Consumer::ReadModel(Arc::new(lead_response::LeadResponse)),
        Consumer::ReadModel(Arc::new(order_board::OrderBoard)),
        Consumer::ReadModel(Arc::new(subscription_board::SubscriptionBoard)),
        Consumer::ReadModel(Arc::new(revenue::Revenue)),
        Consumer::Process(Arc::new(lead_conversion::LeadConversion::new(handlers))),
        Consumer::Process(Arc::new(lead_routing::LeadRouting::new(
            handlers.store(),
            handlers,
            processes.lead_response_deadline,
            clock.clone(),
        ))),
        Consumer::Process(Arc::new(order_saga::OrderSaga::new(
            handlers,
            processes.payment_timeout,
            clock,
        ))),
    ];
    if let Some(target) = &settings.outbound.forward {
        consumers.push(Consumer::Outbound(Arc::new(forward::Forward::new(
            target.clone(),
        ))));
    }
    consumers
}
