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

use std::any::{Any, TypeId};
use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use annals_domain::{Aggregate, ClaimChange, Command, Event, StoredForm};
use annals_store::{
    AppendRequest, Claim, Direction, EventStore, ExpectedVersion, IdempotencyKey,
    IdempotencyRecord, Metadata, NewEvent, RecordedEvent, Snapshot, StoreError, StreamName,
};
use chrono::{DateTime, Utc};
use lru::LruCache;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub use error::CommandError;

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

/// The idempotency keys whose requests a handler is carrying out now.
#[derive(Debug, Default)]
struct InFlight(Mutex<HashSet<String>>);

impl InFlight {
    /// Takes the key for one request, or `None` when another request holds it.
    fn take(&self, key: &str) -> Option<TakenKey<'_>> {
        let mut keys = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        keys.insert(key.to_owned()).then(|| TakenKey {
            keys: self,
            key: key.to_owned(),
        })
    }
}

/// A key held by one request, given back when dropped: however the request ends
/// (answered, failed, or cancelled by a timeout or a closed connection).
struct TakenKey<'a> {
    keys: &'a InFlight,
    key: String,
}

impl Drop for TakenKey<'_> {
    fn drop(&mut self) {
        let mut keys = self.keys.0.lock().unwrap_or_else(PoisonError::into_inner);
        keys.remove(&self.key);
    }
}

/// The aggregates whose commands a handler is carrying out now, each with the queue of
/// those waiting for their turn: commands to one aggregate are decided and appended one
/// at a time, in the order they came (a fair lock), so they never race each other on one
/// server; commands to other aggregates go on at once. An aggregate's entry is dropped
/// with the last turn that holds or awaits it.
#[derive(Debug, Default)]
struct Turns(Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>);

impl Turns {
    /// Waits for the aggregate's turn.
    async fn take(&self, id: Uuid) -> Turn<'_> {
        let queue = {
            let mut queues = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            // A waiter cancelled before its turn came leaves its aggregate's entry
            // behind, held by the map alone: swept now and then, as the map doubles.
            if queues.len() >= 1_024 && queues.len().is_power_of_two() {
                queues.retain(|_, queue| Arc::strong_count(queue) > 1);
            }
            queues.entry(id).or_default().clone()
        };
        let held = queue.clone().lock_owned().await;
        Turn {
            turns: self,
            id,
            queue,
            held: Some(held),
        }
    }
}

/// An aggregate's turn, given to the next command waiting when dropped (however the
/// command ends, a cancelled request's too).
struct Turn<'a> {
    turns: &'a Turns,
    id: Uuid,
    queue: Arc<tokio::sync::Mutex<()>>,
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut queues = self.turns.0.lock().unwrap_or_else(PoisonError::into_inner);
        // The map's, this turn's and its guard's: no one else holds or awaits the turn.
        if Arc::strong_count(&self.queue) == 3 {
            queues.remove(&self.id);
        }
        self.held.take();
    }
}

/// How long to wait before deciding a command again after its `attempt`-th append lost a
/// race: up to 1, 2, 4, … 32 ms, at random, so that writers on several servers stop
/// A step before a command's append, given up with `TimedOut` when the caller's
/// deadline passes first (nothing is written before the append).
async fn in_time<T>(
    deadline: Option<tokio::time::Instant>,
    step: impl Future<Output = Result<T, CommandError>>,
) -> Result<T, CommandError> {
    match deadline {
        None => step.await,
        Some(deadline) => tokio::time::timeout_at(deadline, step)
            .await
            .map_err(|_| CommandError::TimedOut)?,
    }
}

/// meeting at the same instant.
fn lost_race_backoff(attempt: u32) -> Duration {
    let ceiling = 1u64 << attempt.saturating_sub(1).min(5);
    let random = Uuid::new_v4().as_u128() as u64;
    Duration::from_micros(random % (ceiling * 1_000 + 1))
}

/// Event ids derived from an idempotency key live in this namespace.
const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a0d_5e2c_3c1b_4f8e_9a57_1d2e_8b4c_0f31);
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

    /// Decides the command on the aggregate's state and appends the result.
    pub async fn execute(
        &self,
        id: Uuid,
        command: A::Command,
        context: &CommandContext,
    ) -> Result<CommandOutcome, CommandError> {
        let stream = Self::stream(id)?;
        let command_id = Uuid::now_v7().to_string();
        let key = context
            .idempotency_key
            .as_ref()
            .map(|key| format!("{}/{key}", context.actor));
        let request_hash = context
            .request_hash
            .clone()
            .unwrap_or_else(|| request_hash(&stream, &command, &self.config.request_digest));
        // Held until this request is answered: a duplicate sent meanwhile is told to come
        // back, rather than deciding ids of its own (a create's id, a conversion's deal)
        // for the same key.
        let _taken = match &key {
            Some(key) => Some(
                self.in_flight
                    .take(key)
                    .ok_or(CommandError::IdempotencyKeyInUse)?,
            ),
            None => None,
        };
        // Until the append, the command is given up when the caller's deadline passes.
        let deadline = context.deadline;
        if let Some(key) = &key
            && let Some(record) = in_time(deadline, async {
                Ok(self.store.find_idempotency(key).await?)
            })
            .await?
        {
            return replay(&record, &request_hash, id);
        }
        let metadata = Metadata {
            correlation_id: Some(
                context
                    .correlation_id
                    .clone()
                    .unwrap_or_else(|| command_id.clone()),
            ),
            causation_id: Some(
                context
                    .causation_id
                    .clone()
                    .unwrap_or_else(|| command_id.clone()),
            ),
            actor: Some(context.actor.clone()),
            extra: [("command".to_owned(), Value::from(command.name()))]
                .into_iter()
                .collect(),
        };

        // Commands to this aggregate through this handler take turns from here.
        let _turn = in_time(deadline, async {
            tokio::time::timeout(self.config.turn_wait, self.turns.take(id))
                .await
                .map_err(|_| CommandError::ConcurrencyConflict { attempts: 0 })
        })
        .await?;
        let started = std::time::Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut loaded = in_time(deadline, self.load(id)).await?;
            if let Some(expected) = context.expected_version
                && loaded.version != expected
            {
                // The cache may be behind writers in other processes: ask the store
                // before telling the caller it named the wrong version.
                self.forget(id);
                loaded = in_time(deadline, self.load(id)).await?;
                if loaded.version != expected {
                    return Err(CommandError::VersionMismatch {
                        expected,
                        actual: loaded.version,
                    });
                }
            }
            let events = match loaded.state.decide(command.clone()) {
                Ok(events) => events,
                Err(refusal) => {
                    // The cache may be behind writers in other processes (another
                    // server's process invoiced the order this one cached as placed): a
                    // refusal stands only when the store's state refuses too.
                    let stored = in_time(deadline, self.current(id)).await?;
                    if stored.version == loaded.version {
                        return Err(refusal.into());
                    }
                    loaded = stored;
                    loaded.state.decide(command.clone())?
                }
            };
            let names: Vec<String> = events.iter().map(|e| e.event_type().to_owned()).collect();
            // Tests that force a race read this to know every contender has decided.
            tracing::debug!(%stream, version = loaded.version, events = ?names, "decided");
            let mut claims = Vec::new();
            let mut before = loaded.state.clone();
            let new_events = events
                .iter()
                .enumerate()
                .map(|(i, event)| {
                    claims.extend(before.claims(event).into_iter().map(|c| match c {
                        ClaimChange::Take(key) => Claim::Take(key),
                        ClaimChange::Release(key) => Claim::Release(key),
                    }));
                    before = std::mem::take(&mut before).evolve(event);
                    let stored = event.encode();
                    let event_id = match &key {
                        // A retry decides the same events at the same version with the
                        // same ids, so the store recognises it even if the first answer
                        // was lost. The request, the stream and the version are in the
                        // name: a key reused after its record was purged makes new ids,
                        // and so do two tries of a create whose ids the server made.
                        Some(key) => Uuid::new_v5(
                            &EVENT_ID_NAMESPACE,
                            format!("{key}/{request_hash}/{stream}/{}/{i}", loaded.version)
                                .as_bytes(),
                        ),
                        None => Uuid::now_v7(),
                    };
                    NewEvent::new(stored.event_type, stored.data)
                        .with_id(event_id)
                        .with_schema_version(stored.schema_version)
                        .with_metadata(metadata.clone())
                })
                .collect();
            let mut request = AppendRequest::new(
                stream.clone(),
                ExpectedVersion::Exact(loaded.version),
                new_events,
            )
            .with_claims(claims);
            if events.iter().any(Event::erases_subject) {
                // The stream's data key goes with the erasure, in its transaction.
                request = request.with_shredded(vec![stream.as_str().to_owned()]);
            }
            if let Some(key) = &key {
                request = request.with_idempotency(IdempotencyKey {
                    key: key.clone(),
                    request_hash: request_hash.clone(),
                    payload: json!({ "id": id, "events": names }),
                });
            }
            // From here on the command is carried out to the end, deadline or not: an
            // append once sent may commit, and the caller is told what the store did.
            if deadline.is_some_and(|deadline| tokio::time::Instant::now() >= deadline) {
                return Err(CommandError::TimedOut);
            }
            let appended = self.store.append(request).await;
            if let (Some(key), Err(error)) = (&key, &appended)
                && carried_out_elsewhere(error)
                && let Some(record) = self.store.find_idempotency(key).await?
            {
                // Another process carried out the same key meanwhile: its events (a
                // conversion with another deal id), its claim (a create's email, on
                // another id) or its version are in the way. Its outcome is ours.
                tracing::debug!(%stream, %error, "the key's request was carried out elsewhere");
                self.forget(id);
                return replay(&record, &request_hash, id);
            }
            match appended {
                Ok(outcome) => {
                    let state = loaded.state.replay(&events);
                    self.after_append(id, &stream, loaded.version, state, outcome.version)
                        .await;
                    return Ok(CommandOutcome {
                        id,
                        version: outcome.version,
                        position: outcome.last_position(),
                        events: names,
                    });
                }
                Err(StoreError::IdempotencyKeyUsed { record }) => {
                    // The same key committed meanwhile, from a concurrent request.
                    self.forget(id);
                    return replay(&record, &request_hash, id);
                }
                Err(StoreError::EventIdReused { .. }) if key.is_some() => {
                    // The ids are the key's, so their request has committed; its record is
                    // not to be seen (yet): come back for its answer.
                    self.forget(id);
                    return Err(CommandError::IdempotencyKeyInUse);
                }
                Err(StoreError::WrongExpectedVersion { actual, .. }) => {
                    self.forget(id);
                    if let Some(expected) = context.expected_version {
                        return Err(CommandError::VersionMismatch { expected, actual });
                    }
                    if attempt >= self.config.max_attempts
                        && started.elapsed() >= self.config.conflict_wait
                    {
                        return Err(CommandError::ConcurrencyConflict { attempts: attempt });
                    }
                    tracing::debug!(%stream, attempt, "append lost a race; deciding again");
                    in_time(deadline, async {
                        tokio::time::sleep(lost_race_backoff(attempt)).await;
                        Ok(())
                    })
                    .await?;
                }
                Err(StoreError::ClaimHeld { key, holder }) => {
                    return Err(A::claim_held(&key, &holder).into());
                }
                Err(error) => {
                    self.forget(id);
                    return Err(error.into());
                }
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

/// The default request digest: the stream, the command's name and its full content,
/// through the configured keyed digest when there is one.
fn request_hash<C: Command>(
    stream: &StreamName,
    command: &C,
    keyed: &Option<RequestDigest>,
) -> String {
    let content = [
        stream.as_str().as_bytes(),
        &[0],
        command.name().as_bytes(),
        &[0],
        format!("{command:?}").as_bytes(),
    ]
    .concat();
    match keyed {
        Some(RequestDigest(digest)) => digest(&content),
        None => hex::encode(Sha256::digest(&content)),
    }
}

/// Whether an append's refusal may come from another request with the same key that
/// committed first (then its stored record is the answer).
fn carried_out_elsewhere(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::WrongExpectedVersion { .. }
            | StoreError::ClaimHeld { .. }
            | StoreError::EventIdReused { .. }
    )
}

/// The first outcome of an idempotent command, or why the key cannot be reused.
fn replay(
    record: &IdempotencyRecord,
    request_hash: &str,
    id: Uuid,
) -> Result<CommandOutcome, CommandError> {
    if record.request_hash != request_hash {
        return Err(CommandError::IdempotencyKeyReused);
    }
    let events = record.payload["events"]
        .as_array()
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    // A create whose id the server made finds the id of the first attempt here.
    let id = record.payload["id"]
        .as_str()
        .and_then(|stored| Uuid::parse_str(stored).ok())
        .unwrap_or(id);
    Ok(CommandOutcome {
        id,
        version: record.version,
        position: record.last_position,
        events,
    })
}
