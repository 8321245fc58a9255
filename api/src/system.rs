//! The running system, assembled from a database URL: the event store, a command handler
//! per aggregate, the projections and the processes. The server and the operator CLI
//! share it, so both see the same projections under the same names.
//!
//! Invariant: background work (projectors, the conversion process, the idempotency
//! purge) runs only between `start` and `Background::stop`, and stops at a checkpoint.

use std::sync::Arc;
use std::time::Duration;

use annals_commands::conversion::LeadConversionProcess;
use annals_commands::{CommandHandler, HandlerConfig, Handlers};
use annals_domain::Aggregate;
use annals_domain::lead::Lead;
use annals_projections::{ProjectionRunner, ReadDatabase, read_models};
use annals_store::{EventStore, StoreConfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::ApiError;

#[derive(Debug)]
pub struct System {
    pub store: Arc<dyn EventStore>,
    pub db: ReadDatabase,
    /// A command handler per aggregate (`System::handler`).
    handlers: Handlers,
    /// Every projection, by name.
    pub projections: Vec<Arc<ProjectionRunner>>,
    pub conversion: Arc<LeadConversionProcess>,
}

impl System {
    /// Opens the store a URL names (`sqlite:` or `postgres://`), applying migrations,
    /// and creates the read models' tables that do not exist yet.
    pub async fn open(url: &str) -> Result<Self, ApiError> {
        let backend = annals_store::open(url, StoreConfig::default()).await?;
        let store = backend.event_store();
        let db = ReadDatabase::of(&backend);
        let handlers = HandlerConfig::default();
        let projections: Vec<_> = read_models()
            .into_iter()
            .map(|projector| Arc::new(ProjectionRunner::new(store.clone(), db.clone(), projector)))
            .collect();
        for projection in &projections {
            projection.register().await?;
        }
        Ok(System {
            handlers: Handlers::new(store.clone(), handlers.clone()),
            conversion: Arc::new(LeadConversionProcess::new(store.clone(), handlers)),
            projections,
            db,
            store,
        })
    }

    /// The handler of `A`'s commands, shared by every caller in this process.
    pub fn handler<A: Aggregate + 'static>(&self) -> Arc<CommandHandler<A>> {
        self.handlers.of::<A>()
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
                .handler::<Lead>()
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
