//! The running system, assembled from a database URL: the event store, a command handler
//! per aggregate, the projections and the processes. The server and the operator CLI
//! share it, so both see the same projections under the same names.
//!
//! Invariant: background work (projectors, the conversion process, the idempotency
//! purge) runs only between `start` and `Background::stop`, and stops at a checkpoint.

use std::sync::Arc;
use std::time::Duration;

use annals_commands::conversion::LeadConversionProcess;
use annals_commands::{CommandHandler, HandlerConfig};
use annals_domain::account::Account;
use annals_domain::deal::Deal;
use annals_domain::lead::Lead;
use annals_projections::account_360::Account360;
use annals_projections::deal_board::DealBoard;
use annals_projections::lead_board::LeadBoard;
use annals_projections::{ProjectionRunner, Projector, ReadDatabase};
use annals_store::{EventStore, StoreConfig, StoreError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug)]
pub struct System {
    pub store: Arc<dyn EventStore>,
    pub db: ReadDatabase,
    pub leads: CommandHandler<Lead>,
    pub accounts: CommandHandler<Account>,
    pub deals: CommandHandler<Deal>,
    /// Every projection, by name.
    pub projections: Vec<Arc<ProjectionRunner>>,
    pub conversion: Arc<LeadConversionProcess>,
}

impl System {
    /// Opens the store a URL names (`sqlite:` or `postgres://`), applying migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let backend = annals_store::open(url, StoreConfig::default()).await?;
        let store = backend.event_store();
        let db = ReadDatabase::of(&backend);
        let handlers = HandlerConfig::default();
        let projectors: [Arc<dyn Projector>; 3] = [
            Arc::new(LeadBoard),
            Arc::new(DealBoard),
            Arc::new(Account360),
        ];
        let projections = projectors
            .into_iter()
            .map(|projector| Arc::new(ProjectionRunner::new(store.clone(), db.clone(), projector)))
            .collect();
        Ok(System {
            leads: CommandHandler::new(store.clone(), handlers.clone()),
            accounts: CommandHandler::new(store.clone(), handlers.clone()),
            deals: CommandHandler::new(store.clone(), handlers.clone()),
            conversion: Arc::new(LeadConversionProcess::new(store.clone(), handlers)),
            projections,
            db,
            store,
        })
    }

    pub fn projection(&self, name: &str) -> Option<&Arc<ProjectionRunner>> {
        self.projections.iter().find(|p| p.name() == name)
    }

    /// The projections' names, in a stable order.
    pub fn projection_names(&self) -> Vec<&'static str> {
        self.projections.iter().map(|p| p.name()).collect()
    }

    /// Starts the projectors, the conversion process and the idempotency purge.
    pub fn start(self: &Arc<Self>) -> Background {
        let (stop, stopped) = watch::channel(false);
        let mut tasks: Vec<JoinHandle<()>> = Vec::new();
        for runner in &self.projections {
            let runner = runner.clone();
            let stopped = stopped.clone();
            tasks.push(tokio::spawn(async move {
                runner.run_until_stopped(stopped).await
            }));
        }
        let conversion = self.conversion.clone();
        let stopped_conversion = stopped.clone();
        tasks.push(tokio::spawn(async move {
            conversion.run_until_stopped(stopped_conversion).await
        }));
        let system = self.clone();
        tasks.push(tokio::spawn(async move {
            system
                .leads
                .purge_idempotency_keys_until_stopped(Duration::from_secs(15 * 60), stopped)
                .await
        }));
        Background { stop, tasks }
    }
}

/// The background work of a started system.
#[derive(Debug)]
pub struct Background {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Background {
    /// Asks every task to stop and waits for each to finish its step.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        for task in self.tasks {
            if let Err(error) = task.await {
                tracing::warn!(%error, "a background task ended badly");
            }
        }
    }
}
