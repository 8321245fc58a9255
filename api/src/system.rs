//! The running system, assembled from a database URL: the event store, a command handler
//! per aggregate, and a runner per consumer of the log (read models, processes). The
//! server and the operator CLI share it, so both see the same consumers under the same
//! names.
//!
//! Invariant: background work (the consumers, the idempotency purge) runs only between
//! `start` and `Background::stop`, and stops at a checkpoint.

use std::sync::Arc;
use std::time::Duration;

use annals_commands::{CommandHandler, HandlerConfig, Handlers};
use annals_domain::Aggregate;
use annals_domain::lead::Lead;
use annals_projections::timers::{Clock, SystemClock, TimerScheduler};
use annals_projections::{ConsumerKind, ConsumerRunner, ProcessSettings, ReadDatabase, consumers};
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
    /// Every consumer of the log, in `consumers()`'s order.
    pub consumers: Vec<Arc<ConsumerRunner>>,
    /// Fires the processes' timers when they fall due.
    pub scheduler: Arc<TimerScheduler>,
}

impl System {
    /// Opens the store a URL names (`sqlite:` or `postgres://`), applying migrations,
    /// and creates the read models' tables that do not exist yet.
    pub async fn open(url: &str) -> Result<Self, ApiError> {
        Self::open_with(url, process_settings()?, Arc::new(SystemClock)).await
    }

    /// `open`, with the processes' settings and the timers' clock given.
    pub async fn open_with(
        url: &str,
        settings: ProcessSettings,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ApiError> {
        let backend = annals_store::open(url, StoreConfig::default()).await?;
        let store = backend.event_store();
        let db = ReadDatabase::of(&backend);
        let handlers = Handlers::new(store.clone(), HandlerConfig::default());
        let consumers: Vec<_> = consumers(&handlers, &settings)
            .into_iter()
            .map(|consumer| Arc::new(ConsumerRunner::new(store.clone(), db.clone(), consumer)))
            .collect();
        for consumer in &consumers {
            consumer.register().await?;
        }
        Ok(System {
            scheduler: Arc::new(TimerScheduler::new(db.clone(), &handlers, clock)),
            handlers,
            consumers,
            db,
            store,
        })
    }

    /// The handler of `A`'s commands, shared by every caller in this process.
    pub fn handler<A: Aggregate + 'static>(&self) -> Arc<CommandHandler<A>> {
        self.handlers.of::<A>()
    }

    /// The read models (the consumers with rows), in a stable order.
    pub fn projections(&self) -> impl Iterator<Item = &Arc<ConsumerRunner>> {
        self.consumers
            .iter()
            .filter(|c| c.kind() == ConsumerKind::ReadModel)
    }

    /// The read model of this name.
    pub fn projection(&self, name: &str) -> Option<&Arc<ConsumerRunner>> {
        self.projections().find(|p| p.name() == name)
    }

    /// The read models' names, in a stable order.
    pub fn projection_names(&self) -> Vec<&'static str> {
        self.projections().map(|p| p.name()).collect()
    }

    /// The consumer of this name, of any kind.
    pub fn consumer(&self, name: &str) -> Option<&Arc<ConsumerRunner>> {
        self.consumers.iter().find(|c| c.name() == name)
    }

    /// The consumers' names, in a stable order.
    pub fn consumer_names(&self) -> Vec<&'static str> {
        self.consumers.iter().map(|c| c.name()).collect()
    }

    /// Starts every consumer, the timer scheduler and the idempotency purge.
    pub fn start(self: &Arc<Self>) -> Background {
        let (stop, stopped) = watch::channel(false);
        let mut tasks: Vec<JoinHandle<()>> = Vec::new();
        for runner in &self.consumers {
            let runner = runner.clone();
            let stopped = stopped.clone();
            tasks.push(tokio::spawn(async move {
                runner.run_until_stopped(stopped).await
            }));
        }
        // Woken when the due timers' read model takes new events here.
        let woken = match self.consumer(annals_projections::due_timers::NAME) {
            Some(due) => due.applied_changes(),
            None => watch::channel(0).1,
        };
        let scheduler = self.scheduler.clone();
        let stopped_scheduler = stopped.clone();
        tasks.push(tokio::spawn(async move {
            scheduler.run_until_stopped(stopped_scheduler, woken).await
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

/// The processes' settings from the environment, each a duration such as `30s`, `15m`,
/// `24h` or `7d`: `ANNALS_LEAD_RESPONSE_DEADLINE` (24 hours when unset) and
/// `ANNALS_PAYMENT_TIMEOUT` (7 days when unset).
pub fn process_settings() -> Result<ProcessSettings, ApiError> {
    let mut settings = ProcessSettings::default();
    for (name, setting) in [
        (
            "ANNALS_LEAD_RESPONSE_DEADLINE",
            &mut settings.lead_response_deadline,
        ),
        ("ANNALS_PAYMENT_TIMEOUT", &mut settings.payment_timeout),
    ] {
        if let Ok(text) = std::env::var(name) {
            *setting = duration(&text).ok_or_else(|| {
                ApiError::InvalidSettings(format!(
                    "{name} is {text:?}: a whole number and a unit, ms, s, m, h or d \
                     (say 30s or 24h), more than zero"
                ))
            })?;
        }
    }
    Ok(settings)
}

/// A duration written as a whole number and a unit (`ms`, `s`, `m`, `h`, `d`), more than
/// zero and at most 10 years.
pub fn duration(text: &str) -> Option<chrono::Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: i64 = number.parse().ok().filter(|n| *n > 0)?;
    let millis = match unit {
        "ms" => Some(1),
        "s" => Some(1_000),
        "m" => Some(60_000),
        "h" => Some(3_600_000),
        "d" => Some(86_400_000),
        _ => None,
    }?;
    let millis = number.checked_mul(millis)?;
    (millis <= 10 * 366 * 86_400_000).then(|| chrono::Duration::milliseconds(millis))
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

#[cfg(test)]
mod tests {
    use super::duration;

    #[test]
    fn durations_are_a_whole_number_and_a_unit() {
        let seconds = |text: &str| duration(text).map(|d| d.num_milliseconds());
        assert_eq!(seconds("250ms"), Some(250));
        assert_eq!(seconds("30s"), Some(30_000));
        assert_eq!(seconds(" 15m "), Some(900_000));
        assert_eq!(seconds("24h"), Some(86_400_000));
        assert_eq!(seconds("7d"), Some(604_800_000));
        for bad in [
            "",
            "s",
            "0s",
            "1",
            "1x",
            "-1s",
            "1.5h",
            "1 h",
            "99999999999999999999d",
            "4000d",
        ] {
            assert_eq!(duration(bad), None, "{bad}");
        }
    }
}
