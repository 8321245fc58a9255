//! The running system, assembled from a database URL: the event store, a command handler
//! per aggregate, and a runner per consumer of the log (read models, processes). The
//! server and the operator CLI share it, so both see the same consumers under the same
//! names.
//!
//! Invariant: background work (the consumers, the idempotency purge) runs only between
//! `start` and `Background::stop`, and stops at a checkpoint.

use std::sync::Arc;
use std::time::Duration;

use annals_commands::{CommandHandler, HandlerConfig, Handlers, RequestDigest};
use annals_consumers::timers::{Clock, SystemClock, TimerScheduler};
use annals_domain::Aggregate;
use annals_domain::Event;
use annals_domain::lead::Lead;
use annals_engine::duty::{self, Duty};
use annals_engine::{ConsumerError, ConsumerKind, ConsumerRunner, Fence, ReadDatabase};
use annals_store::vault::MasterKey;
use annals_store::{DataKeys, EncryptedStore, EventStore, PersonalFields, StoreConfig, StoreError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::ApiError;
use crate::registry::{ConsumerSettings, consumers};

#[derive(Debug)]
pub struct System {
    /// The event log, its personal fields sealed at rest and opened as read.
    pub store: Arc<dyn EventStore>,
    /// The same store, for what only it does: keyed hashes of personal values.
    pub personal: Arc<EncryptedStore>,
    /// The data keys, and what the database keeps of overwritten data.
    pub keys: Arc<dyn DataKeys>,
    pub db: ReadDatabase,
    /// A command handler per aggregate (`System::handler`).
    handlers: Handlers,
    /// Every consumer of the log, in the registry's order.
    pub consumers: Vec<Arc<ConsumerRunner>>,
    /// Fires the processes' timers when they fall due.
    pub scheduler: Arc<TimerScheduler>,
    /// How long a lease on background work lives unless renewed.
    lease_life: Duration,
}

impl System {
    /// Opens the store a URL names (`sqlite:` or `postgres://`), applying migrations,
    /// and creates the read models' tables that do not exist yet.
    pub async fn open(url: &str) -> Result<Self, ApiError> {
        Self::open_with(url, consumer_settings()?, Arc::new(SystemClock)).await
    }

    /// `open`, with the consumers' settings and the timers' clock given.
    pub async fn open_with(
        url: &str,
        settings: ConsumerSettings,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ApiError> {
        // Every process of a deployment uses the same life (`ANNALS_LEASE_TTL`).
        let lease_life = settings
            .lease_life
            .to_std()
            .unwrap_or(annals_engine::LEASE_LIFE);
        // A session frozen inside a transaction (a stalled lease holder in the middle of
        // a batch) holds its checkpoint's and its lease's rows: the server ends it within
        // a lease's life, so that a take-over waits no longer than that for them.
        let defaults = StoreConfig::default();
        let config = StoreConfig {
            idle_in_transaction_timeout: defaults.idle_in_transaction_timeout.min(lease_life),
            ..defaults
        };
        let backend = annals_store::open(url, config)
            .await?
            .with_personal_data(&master_key(url)?, personal_fields())
            .await
            .map_err(|error| match error {
                StoreError::MasterKey(reason) => ApiError::InvalidSettings(format!(
                    "the master key (ANNALS_MASTER_KEY, ANNALS_MASTER_KEY_FILE or the key \
                     file beside the SQLite database): {reason}"
                )),
                other => other.into(),
            })?;
        let store = backend.event_store();
        let personal = backend
            .personal_data()
            .ok_or_else(|| ApiError::InvalidSettings("personal data is not sealed".into()))?;
        let db = ReadDatabase::of(&backend);
        // Commands may carry personal data: the digests their idempotency records keep
        // are keyed hashes.
        let keyed = personal.clone();
        let config = HandlerConfig {
            request_digest: Some(RequestDigest::new(move |content| keyed.keyed_hash(content))),
            ..HandlerConfig::default()
        };
        let handlers = Handlers::new(store.clone(), config);
        let consumers: Vec<_> = consumers(&handlers, &settings, clock.clone())
            .into_iter()
            .map(|consumer| {
                Arc::new(
                    ConsumerRunner::new(store.clone(), db.clone(), consumer)
                        .with_lease_life(lease_life),
                )
            })
            .collect();
        for consumer in &consumers {
            consumer.register().await?;
        }
        Ok(System {
            scheduler: Arc::new(
                TimerScheduler::new(db.clone(), &handlers, clock).with_lease_life(lease_life),
            ),
            handlers,
            consumers,
            db,
            lease_life,
            store,
            personal,
            keys: backend.data_keys(),
        })
    }

    /// After an erasure at `position`: waits (5 s at most) for the lead board to forget
    /// what it showed of the lead, then has the database drop the old images of what it
    /// overwrote (`DataKeys::purge_overwritten`), again while readers keep it from that.
    /// An erasure the board applies later is purged by the next erasure.
    pub async fn forget_erased(&self, position: u64) {
        // The lead board is the read model that shows personal data; its checkpoint is
        // read from the database, whichever process runs it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        if let Some(board) = self.projection(annals_consumers::read_models::lead_board::NAME) {
            while tokio::time::Instant::now() < deadline
                && board.checkpoint().await.is_ok_and(|at| at < position)
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        loop {
            match self.keys.purge_overwritten().await {
                Ok(true) => return,
                Ok(false) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(false) => {
                    tracing::warn!("readers kept the write-ahead log from being truncated");
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, "dropping the old images of erased data failed");
                    return;
                }
            }
        }
    }

    /// Waits until the consumer `name` has taken the log up to `position`, whichever
    /// process runs it (its checkpoint is read from the database), for `within` at most;
    /// whether it has. How a tool beside a server waits for a process's effects rather
    /// than running the process itself.
    pub async fn wait_for_consumer(
        &self,
        name: &str,
        position: u64,
        within: Duration,
    ) -> Result<bool, ApiError> {
        let Some(consumer) = self.consumer(name) else {
            return Ok(false);
        };
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if consumer.applied() >= position || consumer.checkpoint().await? >= position {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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
        let woken = match self.consumer(annals_consumers::read_models::due_timers::NAME) {
            Some(due) => due.applied_changes(),
            None => watch::channel(0).1,
        };
        let scheduler = self.scheduler.clone();
        let stopped_scheduler = stopped.clone();
        tasks.push(tokio::spawn(async move {
            scheduler.run_until_stopped(stopped_scheduler, woken).await
        }));
        let purge = IdempotencyPurge::new(self.handler::<Lead>(), Duration::from_secs(15 * 60));
        let (db, life) = (self.db.clone(), self.lease_life);
        tasks.push(tokio::spawn(async move {
            duty::run_until_stopped(&purge, &db, life, stopped).await
        }));
        Background { stop, tasks }
    }
}

/// The purge of expired idempotency keys, every `every`, on the leased loop: one server
/// of several purges at a time. A purge that fails is tried again at the next turn, not
/// sooner (it is one unbounded `DELETE`; retrying it at once would repeat the load that
/// made it fail). One that takes longer than two thirds of a lease's life loses its lease
/// (its holder did not come back to the loop): harmless, as a purge deletes only what has
/// expired, and another server purges in its place.
struct IdempotencyPurge {
    /// Any handler purges every aggregate's keys.
    handler: Arc<CommandHandler<Lead>>,
    every: Duration,
    /// When the next purge is due.
    next: std::sync::Mutex<tokio::time::Instant>,
}

impl IdempotencyPurge {
    /// A purge due at once, then every `every`.
    fn new(handler: Arc<CommandHandler<Lead>>, every: Duration) -> Self {
        IdempotencyPurge {
            handler,
            every,
            next: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    fn next(&self) -> std::sync::MutexGuard<'_, tokio::time::Instant> {
        self.next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait::async_trait]
impl Duty for IdempotencyPurge {
    fn name(&self) -> &'static str {
        "idempotency_purge"
    }

    async fn round(&self, _fence: &Fence) -> Result<Duration, ConsumerError> {
        let due = *self.next();
        let now = tokio::time::Instant::now();
        if now < due {
            return Ok(due - now);
        }
        match self
            .handler
            .purge_expired_idempotency_keys(chrono::Utc::now())
            .await
        {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "expired idempotency keys purged"),
            Err(error) => tracing::warn!(%error, "purging idempotency keys failed"),
        }
        *self.next() = now + self.every;
        Ok(self.every)
    }
}

/// The personal fields of every event type (`Event::PERSONAL_FIELDS`), by the category
/// of the streams that hold them. A new aggregate with personal data adds a line here.
pub fn personal_fields() -> PersonalFields {
    let mut declared = Vec::new();
    for (event_type, fields) in <Lead as Aggregate>::Event::PERSONAL_FIELDS {
        declared.push((Lead::CATEGORY, *event_type, *fields));
    }
    PersonalFields::new(&declared)
}

/// The master key (`domain.md`, Erasure): `ANNALS_MASTER_KEY` (64 hex characters), or
/// the file `ANNALS_MASTER_KEY_FILE` names; with SQLite and neither, the file beside the
/// database (`annals.db.key`), made with a new key, readable by its owner only, the
/// first time. PostgreSQL refuses to start without one: its servers must share the key.
pub fn master_key(url: &str) -> Result<MasterKey, ApiError> {
    let invalid =
        |what: &str, error: StoreError| ApiError::InvalidSettings(format!("{what}: {error}"));
    if let Ok(hex) = std::env::var("ANNALS_MASTER_KEY") {
        return MasterKey::from_hex(&hex).map_err(|e| invalid("ANNALS_MASTER_KEY", e));
    }
    let Some(file) = master_key_file(url) else {
        if url.starts_with("sqlite:") {
            // An in-memory database lives as long as the process, and its key with it.
            return Ok(MasterKey::generate());
        }
        return Err(ApiError::InvalidSettings(
            "PostgreSQL needs a master key shared by its servers: set ANNALS_MASTER_KEY \
             (64 hex characters) or ANNALS_MASTER_KEY_FILE (`annals keys generate` makes one)"
                .into(),
        ));
    };
    if std::env::var_os("ANNALS_MASTER_KEY_FILE").is_none() {
        make_key_file(&file)?;
    }
    let text = std::fs::read_to_string(&file).map_err(|e| {
        ApiError::InvalidSettings(format!("the master key file {}: {e}", file.display()))
    })?;
    MasterKey::from_hex(&text).map_err(|e| invalid(&format!("the key file {}", file.display()), e))
}

/// The file the master key is read from when `ANNALS_MASTER_KEY` is not set:
/// `ANNALS_MASTER_KEY_FILE`, or beside a SQLite database file (`annals.db.key`).
pub fn master_key_file(url: &str) -> Option<std::path::PathBuf> {
    if std::env::var_os("ANNALS_MASTER_KEY").is_some() {
        return None;
    }
    if let Some(file) = std::env::var_os("ANNALS_MASTER_KEY_FILE") {
        return Some(file.into());
    }
    let mut file = sqlite_file(url)?.into_os_string();
    file.push(".key");
    Some(file.into())
}

/// The file of a SQLite URL (`sqlite://annals.db`, `sqlite:annals.db?mode=rwc`); `None`
/// for an in-memory database.
fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && !path.contains(":memory:")).then(|| path.into())
}

/// Writes a new master key to `file`, readable by its owner only, unless it exists.
fn make_key_file(file: &std::path::Path) -> Result<(), ApiError> {
    use std::io::Write;
    let failed = |e: std::io::Error| {
        ApiError::InvalidSettings(format!("the master key file {}: {e}", file.display()))
    };
    let Some(mut out) = annals_store::sqlite::create_private(file).map_err(failed)? else {
        return Ok(());
    };
    writeln!(out, "{}", MasterKey::generate().to_hex()).map_err(failed)?;
    out.sync_all().map_err(failed)?;
    tracing::info!(file = %file.display(), "a new master key was written beside the database");
    Ok(())
}

/// The consumers' settings from the environment, each a duration such as `30s`, `15m`,
/// `24h` or `7d`: `ANNALS_LEAD_RESPONSE_DEADLINE` (24 hours when unset),
/// `ANNALS_PAYMENT_TIMEOUT` (7 days when unset) and `ANNALS_LEASE_TTL`, the life of a
/// lease on a consumer or the timer scheduler unless renewed (10 s when unset, at least
/// 1 s).
pub fn consumer_settings() -> Result<ConsumerSettings, ApiError> {
    let mut settings = ConsumerSettings::default();
    for (name, setting) in [
        (
            "ANNALS_LEAD_RESPONSE_DEADLINE",
            &mut settings.processes.lead_response_deadline,
        ),
        (
            "ANNALS_PAYMENT_TIMEOUT",
            &mut settings.processes.payment_timeout,
        ),
        ("ANNALS_LEASE_TTL", &mut settings.lease_life),
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
    // Shorter, renewals (every third of it) and the sessions' idle-in-transaction bound
    // (at most the life) would cut a healthy server's own work.
    if settings.lease_life < chrono::Duration::seconds(1) {
        return Err(ApiError::InvalidSettings(format!(
            "ANNALS_LEASE_TTL is {}ms: a lease lives at least 1s",
            settings.lease_life.num_milliseconds()
        )));
    }
    Ok(settings)
}

/// A database URL as logs show it: its password, if any, masked
/// (`postgres://annals:***@db/annals`).
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((credentials, host)) => {
            let user = credentials
                .split_once(':')
                .map_or(credentials, |(user, _)| user);
            let masked = if credentials.contains(':') {
                ":***"
            } else {
                ""
            };
            // A password in the query (`?password=`) is masked too.
            format!("{scheme}://{user}{masked}@{host}{}", mask_query(path))
        }
        None => format!("{scheme}://{authority}{}", mask_query(path)),
    }
}

fn mask_query(path: &str) -> String {
    let Some((path, query)) = path.split_once('?') else {
        return path.to_owned();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if name.eq_ignore_ascii_case("password") => format!("{name}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{path}?{}", query.join("&"))
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
    use super::*;

    #[test]
    fn a_database_urls_password_is_never_shown() {
        for (url, shown) in [
            (
                "postgres://annals:hunter2@db:5432/annals",
                "postgres://annals:***@db:5432/annals",
            ),
            (
                "postgres://annals:p@ss@db/annals?sslmode=require",
                "postgres://annals:***@db/annals?sslmode=require",
            ),
            (
                "postgres://db/annals?user=a&password=hunter2",
                "postgres://db/annals?user=a&password=***",
            ),
            ("postgres://annals@db/annals", "postgres://annals@db/annals"),
            ("sqlite://annals.db", "sqlite://annals.db"),
        ] {
            assert_eq!(redacted(url), shown);
            assert!(!redacted(url).contains("hunter2"));
        }
    }

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

    /// The purge runs on the leased loop: left running, it forgets a key past its
    /// retention by itself, and stops when told.
    #[tokio::test]
    async fn the_running_purge_forgets_expired_idempotency_keys() {
        use annals_commands::CommandContext;
        use annals_domain::lead::LeadCommand;
        use annals_domain::values::{Email, PersonName, Source};

        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("purge.db").display());
        let backend = annals_store::open(&url, StoreConfig::default())
            .await
            .unwrap();
        let store = backend.event_store();
        let handler = Arc::new(CommandHandler::<Lead>::new(
            store.clone(),
            HandlerConfig {
                idempotency_retention: Duration::from_millis(1),
                ..HandlerConfig::default()
            },
        ));
        let id = uuid::Uuid::now_v7();
        let capture = LeadCommand::Capture {
            lead_id: id,
            email: Email::parse("q@example.com").unwrap(),
            name: PersonName::parse("Ada").unwrap(),
            company: None,
            source: Source::Web,
        };
        let context = CommandContext {
            actor: "a".into(),
            idempotency_key: Some("short-lived".into()),
            request_hash: Some("short-lived".into()),
            ..CommandContext::default()
        };
        handler.execute(id, capture, &context).await.unwrap();
        assert!(
            store
                .find_idempotency("a/short-lived")
                .await
                .unwrap()
                .is_some()
        );

        let purge = IdempotencyPurge::new(handler, Duration::from_millis(20));
        let (stop, stopped) = watch::channel(false);
        let db = ReadDatabase::of(&backend);
        let running = tokio::spawn(async move {
            duty::run_until_stopped(&purge, &db, Duration::from_secs(1), stopped).await
        });
        let mut purged = false;
        for _ in 0..250 {
            if store
                .find_idempotency("a/short-lived")
                .await
                .unwrap()
                .is_none()
            {
                purged = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.send(true).unwrap();
        running.await.unwrap();
        assert!(purged, "the running purge removed the expired key");
    }

    /// A purge that fails is tried again at its next turn, not at the loop's backoff: the
    /// store refuses every purge here, and in a second of running it is asked once.
    #[tokio::test]
    async fn a_failed_purge_waits_for_its_next_turn() {
        #[derive(Debug)]
        struct RefusingPurges {
            inner: Arc<dyn EventStore>,
            asked: std::sync::atomic::AtomicUsize,
        }

        #[async_trait::async_trait]
        impl annals_store::StoreLayer for RefusingPurges {
            fn inner(&self) -> &dyn EventStore {
                self.inner.as_ref()
            }

            async fn purge_idempotency(
                &self,
                _recorded_before: chrono::DateTime<chrono::Utc>,
            ) -> Result<u64, StoreError> {
                self.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Err(StoreError::Closed)
            }
        }

        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("purge.db").display());
        let backend = annals_store::open(&url, StoreConfig::default())
            .await
            .unwrap();
        let store = Arc::new(RefusingPurges {
            inner: backend.event_store(),
            asked: Default::default(),
        });
        let purge = IdempotencyPurge::new(
            Arc::new(CommandHandler::<Lead>::new(
                store.clone(),
                HandlerConfig::default(),
            )),
            Duration::from_secs(600),
        );
        let (stop, stopped) = watch::channel(false);
        let db = ReadDatabase::of(&backend);
        let running = tokio::spawn(async move {
            duty::run_until_stopped(&purge, &db, Duration::from_secs(3), stopped).await
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.send(true).unwrap();
        running.await.unwrap();
        assert_eq!(store.asked.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
