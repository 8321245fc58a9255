//! Command handling: load an aggregate (snapshot, cache, events), `decide`, and append
//! with the version it was decided on; decide again on the new state when the append
//! loses a race; idempotency keys stored in the same transaction as the events.
//!
//! Invariants: a command is only ever decided on the state at the version it appends
//! at, so concurrent commands never lose an update; a command with an idempotency key
//! appends at most once, whatever the retries and restarts. While a handler carries out
//! a key's request, another request with that key on the same handler is refused at
//! once (`IdempotencyKeyInUse`); on another handler or process it may run, but only one
//! of them appends, and the others answer its stored outcome (or `IdempotencyKeyInUse`
//! if they cannot see it yet), never a store error. Commands to one aggregate through one
//! handler take turns (they queue, never race); across handlers a lost race is decided
//! again after a jittered backoff, for a bounded time. This crate holds no business
//! rules (they are `annals-domain`'s) and no SQL (that is `annals-store`'s).

pub mod conversion;
mod error;
mod execute;

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use annals_domain::{Aggregate, Event, StoredForm};
use annals_store::{Direction, EventStore, RecordedEvent, Snapshot, StreamName};
use chrono::{DateTime, Utc};
use lru::LruCache;
use uuid::Uuid;

pub use error::CommandError;
use execute::{InFlight, Turns};

/// How a handler behaves.
#[derive(Debug, Clone)]
pub struct HandlerConfig {
    /// Aggregates kept in memory (state and version), most recently used first.
    pub cache_capacity: NonZeroUsize,
    /// A snapshot is saved each time an aggregate's version crosses a multiple of this.
    pub snapshot_every: u64,
    /// How many times a command is decided at least, when its appends keep losing races
    /// to other writers (another server: within a handler, commands to one aggregate
    /// take turns and never race).
    pub max_attempts: u32,
    /// How long a command whose appends keep losing races is decided again, after a
    /// jittered backoff each time, before it gives up (`ConcurrencyConflict`), once it
    /// has also been decided `max_attempts` times.
    pub conflict_wait: Duration,
    /// How long a command waits for its aggregate's turn (the commands before it to that
    /// aggregate on this handler) before it gives up (`ConcurrencyConflict`): a store
    /// that hangs under one command never holds the others for ever.
    pub turn_wait: Duration,
    /// How long idempotency keys are kept.
    pub idempotency_retention: Duration,
    /// What turns a command into the digest its idempotency record keeps, when the
    /// caller gives none: a keyed hash where commands carry personal data (the
    /// store's); a plain SHA-256 otherwise.
    pub request_digest: Option<RequestDigest>,
}

/// A keyed digest of a command's content (see `HandlerConfig::request_digest`).
#[derive(Clone)]
pub struct RequestDigest(Arc<DigestFn>);

type DigestFn = dyn Fn(&[u8]) -> String + Send + Sync;

impl RequestDigest {
    pub fn new(digest: impl Fn(&[u8]) -> String + Send + Sync + 'static) -> Self {
        RequestDigest(Arc::new(digest))
    }
}

impl std::fmt::Debug for RequestDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestDigest(…)")
    }
}

impl Default for HandlerConfig {
    fn default() -> Self {
        HandlerConfig {
            cache_capacity: NonZeroUsize::new(10_000).unwrap_or(NonZeroUsize::MIN),
            snapshot_every: 100,
            max_attempts: 5,
            conflict_wait: Duration::from_secs(1),
            turn_wait: Duration::from_secs(30),
            idempotency_retention: Duration::from_secs(24 * 60 * 60),
            request_digest: None,
        }
    }
}

/// Who sends a command and in what context.
#[derive(Debug, Clone, Default)]
pub struct CommandContext {
    /// Who is acting (a token's name or role); recorded on every event.
    pub actor: String,
    /// Ties together everything one request caused; a new one when not given.
    pub correlation_id: Option<String>,
    /// What caused the command (an event id, for a process); the command's own id when
    /// not given.
    pub causation_id: Option<String>,
    /// Apply only at exactly this version (HTTP `If-Match`); never retried.
    pub expected_version: Option<u64>,
    /// The client's idempotency key; scoped by the actor.
    pub idempotency_key: Option<String>,
    /// A digest of the request that tells a retry from another request with the same
    /// key; when not given, one is made from the aggregate and the command.
    pub request_hash: Option<String>,
    /// When the caller stops waiting. The command is given up only before its append
    /// (`CommandError::TimedOut`: nothing was written); once its append is on its way,
    /// it is carried out to the end and answered with what the store did.
    pub deadline: Option<tokio::time::Instant>,
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutcome {
    pub id: Uuid,
    /// The aggregate's version after the command.
    pub version: u64,
    /// The global position of the last event appended: the consistency token.
    pub position: u64,
    /// The type names of the events appended, in order.
    pub events: Vec<String>,
}

/// An aggregate's state and the version it is at.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded<A> {
    pub state: A,
    pub version: u64,
}

/// Carries out commands for one kind of aggregate.
#[derive(Debug)]
pub struct CommandHandler<A: Aggregate> {
    store: Arc<dyn EventStore>,
    config: HandlerConfig,
    cache: Mutex<LruCache<Uuid, Loaded<A>>>,
    in_flight: InFlight,
    turns: Turns,
}

/// The command handlers of a process, one per aggregate type, each made on first use and
/// then shared: every caller through it (the routes, the demo) sees one cache and one set
/// of idempotency keys in flight per aggregate. A new aggregate needs no line here.
#[derive(Debug)]
pub struct Handlers {
    store: Arc<dyn EventStore>,
    config: HandlerConfig,
    made: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl Handlers {
    pub fn new(store: Arc<dyn EventStore>, config: HandlerConfig) -> Self {
        Handlers {
            store,
            config,
            made: Mutex::default(),
        }
    }

    /// The handler of `A`'s commands.
    /// The event store every handler appends to.
    pub fn store(&self) -> Arc<dyn EventStore> {
        self.store.clone()
    }

    pub fn of<A: Aggregate + 'static>(&self) -> Arc<CommandHandler<A>> {
        let mut made = self.made.lock().unwrap_or_else(PoisonError::into_inner);
        let key = TypeId::of::<A>();
        if let Some(Ok(handler)) = made.get(&key).map(|h| h.clone().downcast()) {
            return handler;
        }
        let handler = Arc::new(CommandHandler::<A>::new(
            self.store.clone(),
            self.config.clone(),
        ));
        made.insert(key, handler.clone());
        handler
    }
}

const PAGE: usize = 1_000;

impl<A: Aggregate> CommandHandler<A> {
    pub fn new(store: Arc<dyn EventStore>, config: HandlerConfig) -> Self {
        let cache = Mutex::new(LruCache::new(config.cache_capacity));
        CommandHandler {
            store,
            config,
            cache,
            in_flight: InFlight::default(),
            turns: Turns::default(),
        }
    }

    pub fn stream(id: Uuid) -> Result<StreamName, CommandError> {
        StreamName::parse(A::stream_name(id)).map_err(|_| CommandError::InvalidId(id.to_string()))
    }

    /// Whether the aggregate has any event.
    pub async fn exists(&self, id: Uuid) -> Result<bool, CommandError> {
        Ok(self.load(id).await?.version > 0)
    }

    /// The aggregate as it is now: from the cache, or its latest snapshot and the events
    /// after it.
    pub async fn load(&self, id: Uuid) -> Result<Loaded<A>, CommandError> {
        if let Some(hit) = self.cached(id) {
            return Ok(hit);
        }
        self.current(id).await
    }

    /// The aggregate as the store has it now, read past the cache (which another
    /// server's writes may have outdated): for a decision that appends nothing to the
    /// aggregate, where no expected version would catch a stale state. The cache keeps
    /// what it read.
    pub async fn current(&self, id: Uuid) -> Result<Loaded<A>, CommandError> {
        let stream = Self::stream(id)?;
        let snapshot = self.latest_snapshot(&stream).await?;
        let loaded = self.replay_onto(&stream, snapshot, |_| false).await?;
        // An absence is never cached: another handler or process may create the
        // aggregate, and `exists` must then see it. (A cached state that exists can only
        // be behind, which the append's expected version catches.)
        if loaded.version > 0 {
            self.remember(id, loaded.clone());
        }
        Ok(loaded)
    }

    /// The aggregate rebuilt from its events alone, up to a version or a time (history).
    pub async fn load_as_of(
        &self,
        id: Uuid,
        version: Option<u64>,
        time: Option<DateTime<Utc>>,
    ) -> Result<Loaded<A>, CommandError> {
        let stream = Self::stream(id)?;
        let empty = Loaded {
            state: A::default(),
            version: 0,
        };
        self.replay_onto(&stream, empty, |recorded| {
            version.is_some_and(|v| recorded.version > v)
                || time.is_some_and(|t| recorded.recorded_at > t)
        })
        .await
    }

    /// Applies the stream's events after `loaded.version`, in pages, until the stream
    /// ends or `stop` says an event is past the point wanted.
    async fn replay_onto(
        &self,
        stream: &StreamName,
        mut loaded: Loaded<A>,
        stop: impl Fn(&RecordedEvent) -> bool,
    ) -> Result<Loaded<A>, CommandError> {
        loop {
            let events = self
                .store
                .read_stream(stream, loaded.version + 1, Direction::Forwards, PAGE)
                .await?;
            let done = events.len() < PAGE;
            for recorded in events {
                if stop(&recorded) {
                    return Ok(loaded);
                }
                loaded.state = loaded.state.evolve(&decode::<A>(&recorded)?);
                loaded.version = recorded.version;
            }
            if done {
                return Ok(loaded);
            }
        }
    }

    /// Forgets idempotency keys older than the retention.
    pub async fn purge_expired_idempotency_keys(
        &self,
        now: DateTime<Utc>,
    ) -> Result<u64, CommandError> {
        let retention = chrono::Duration::from_std(self.config.idempotency_retention)
            .unwrap_or(chrono::Duration::MAX);
        let before = now
            .checked_sub_signed(retention)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        Ok(self.store.purge_idempotency(before).await?)
    }

    async fn latest_snapshot(&self, stream: &StreamName) -> Result<Loaded<A>, CommandError> {
        let empty = Loaded {
            state: A::default(),
            version: 0,
        };
        let Some(snapshot) = self.store.load_snapshot(stream).await? else {
            return Ok(empty);
        };
        if snapshot.schema_version != A::SNAPSHOT_VERSION {
            return Ok(empty);
        }
        match serde_json::from_value::<A>(snapshot.state) {
            Ok(state) => Ok(Loaded {
                state,
                version: snapshot.version,
            }),
            Err(error) => {
                tracing::warn!(%stream, %error, "snapshot unreadable; rebuilding from events");
                Ok(empty)
            }
        }
    }

    async fn after_append(
        &self,
        id: Uuid,
        stream: &StreamName,
        previous_version: u64,
        state: A,
        version: u64,
    ) {
        let every = self.config.snapshot_every.max(1);
        if version / every > previous_version / every {
            match serde_json::to_value(&state) {
                Ok(value) => {
                    let snapshot = Snapshot {
                        stream: stream.as_str().to_owned(),
                        version,
                        schema_version: A::SNAPSHOT_VERSION,
                        state: value,
                    };
                    // A snapshot only saves time; failing to save one fails nothing.
                    if let Err(error) = self.store.save_snapshot(&snapshot).await {
                        tracing::warn!(%stream, %error, "snapshot not saved");
                    }
                }
                Err(error) => tracing::warn!(%stream, %error, "state does not serialise"),
            }
        }
        self.remember(id, Loaded { state, version });
    }

    fn cached(&self, id: Uuid) -> Option<Loaded<A>> {
        self.cache.lock().ok()?.get(&id).cloned()
    }

    fn remember(&self, id: Uuid, loaded: Loaded<A>) {
        if let Ok(mut cache) = self.cache.lock() {
            // Never replace a newer state with an older one read concurrently.
            if cache
                .peek(&id)
                .is_none_or(|held| held.version <= loaded.version)
            {
                cache.put(id, loaded);
            }
        }
    }

    fn forget(&self, id: Uuid) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.pop(&id);
        }
    }
}

fn decode<A: Aggregate>(recorded: &RecordedEvent) -> Result<A::Event, CommandError> {
    Ok(A::Event::decode(&StoredForm {
        event_type: recorded.event_type.clone(),
        schema_version: recorded.schema_version,
        data: recorded.data.clone(),
    })?)
}
