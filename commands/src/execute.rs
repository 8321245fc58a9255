//! Carrying out one command (`CommandHandler::execute`), step by step: the request (its
//! stream, idempotency key, digest and metadata), the stored outcome of a key already
//! carried out, the aggregate's turn, the decision on the state it loads, the append at
//! the version decided on, and the answer; a lost race goes back to the decision.
//!
//! Invariants: every step before the append gives up when the caller's deadline passes
//! (`TimedOut`, nothing written); once the append is sent, the command is carried out to
//! the end and answered with what the store did. Events of a keyed request get ids
//! derived from the key, the request, the stream and the version, so a retry of the same
//! request at the same version is the same append.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use annals_domain::{Aggregate, ClaimChange, Command, Event};
use annals_store::{
    AppendOutcome, AppendRequest, Claim, ExpectedVersion, IdempotencyKey, IdempotencyRecord,
    Metadata, NewEvent, StoreError, StreamName,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{CommandContext, CommandError, CommandHandler, CommandOutcome, Loaded, RequestDigest};

/// The target of the handler's log lines (the crate's, wherever the line is written).
const LOG_TARGET: &str = "annals_commands";

/// Event ids derived from an idempotency key live in this namespace.
const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a0d_5e2c_3c1b_4f8e_9a57_1d2e_8b4c_0f31);

/// One command's request, as its steps see it.
struct Request<'a> {
    id: Uuid,
    stream: StreamName,
    /// The idempotency key, scoped by actor (`actor/key`).
    key: Option<String>,
    /// What the key's record must match for a retry to be the same request.
    request_hash: String,
    /// Given to every event the command appends.
    metadata: Metadata,
    context: &'a CommandContext,
}

/// What an append came to.
enum Appended {
    /// Answered: the command's outcome (its own append's, or the key's first one).
    Done(CommandOutcome),
    /// Another writer moved the aggregate to `actual` first: decide again.
    LostRace { actual: u64 },
}

impl<A: Aggregate> CommandHandler<A> {
    /// Decides the command on the aggregate's state and appends the result.
    pub async fn execute(
        &self,
        id: Uuid,
        command: A::Command,
        context: &CommandContext,
    ) -> Result<CommandOutcome, CommandError> {
        let request = self.request(id, &command, context)?;
        // Held until this request is answered: a duplicate sent meanwhile is told to come
        // back, rather than deciding ids of its own (a create's id, a conversion's deal)
        // for the same key.
        let _taken = match &request.key {
            Some(key) => Some(
                self.in_flight
                    .take(key)
                    .ok_or(CommandError::IdempotencyKeyInUse)?,
            ),
            None => None,
        };
        if let Some(answered) = self.recorded(&request).await? {
            return answered;
        }
        // Commands to this aggregate through this handler take turns from here.
        let _turn = in_time(context.deadline, async {
            tokio::time::timeout(self.config.turn_wait, self.turns.take(id))
                .await
                .map_err(|_| CommandError::ConcurrencyConflict { attempts: 0 })
        })
        .await?;
        let started = std::time::Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (loaded, events) = self.decide(&request, command.clone()).await?;
            match self.append(&request, loaded, events).await? {
                Appended::Done(outcome) => return Ok(outcome),
                Appended::LostRace { actual } => {
                    self.after_lost_race(&request, actual, attempt, started)
                        .await?;
                }
            }
        }
    }

    /// The request's stream, key, digest and metadata.
    fn request<'a>(
        &self,
        id: Uuid,
        command: &A::Command,
        context: &'a CommandContext,
    ) -> Result<Request<'a>, CommandError> {
        let stream = Self::stream(id)?;
        let command_id = Uuid::now_v7().to_string();
        let key = context
            .idempotency_key
            .as_ref()
            .map(|key| format!("{}/{key}", context.actor));
        let request_hash = context
            .request_hash
            .clone()
            .unwrap_or_else(|| request_hash(&stream, command, &self.config.request_digest));
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
        Ok(Request {
            id,
            stream,
            key,
            request_hash,
            metadata,
            context,
        })
    }

    /// The answer stored for the request's key, when it was carried out before (or
    /// `IdempotencyKeyReused` when the key came with another request).
    async fn recorded(
        &self,
        request: &Request<'_>,
    ) -> Result<Option<Result<CommandOutcome, CommandError>>, CommandError> {
        let Some(key) = &request.key else {
            return Ok(None);
        };
        let found = in_time(request.context.deadline, async {
            Ok(self.store.find_idempotency(key).await?)
        })
        .await?;
        Ok(found.map(|record| replay(&record, &request.request_hash, request.id)))
    }

    /// Loads the aggregate (at the caller's expected version, when given) and decides
    /// the command on it: the state decided on, and the events.
    async fn decide(
        &self,
        request: &Request<'_>,
        command: A::Command,
    ) -> Result<(Loaded<A>, Vec<A::Event>), CommandError> {
        let (id, deadline) = (request.id, request.context.deadline);
        let mut loaded = in_time(deadline, self.load(id)).await?;
        if let Some(expected) = request.context.expected_version
            && loaded.version != expected
        {
            // The cache may be behind writers in other processes: ask the store before
            // telling the caller it named the wrong version.
            self.forget(id);
            loaded = in_time(deadline, self.load(id)).await?;
            if loaded.version != expected {
                return Err(CommandError::VersionMismatch {
                    expected,
                    actual: loaded.version,
                });
            }
        }
        match loaded.state.decide(command.clone()) {
            Ok(events) => Ok((loaded, events)),
            Err(refusal) => {
                // The cache may be behind writers in other processes (another server's
                // process invoiced the order this one cached as placed): a refusal
                // stands only when the store's state refuses too.
                let stored = in_time(deadline, self.current(id)).await?;
                if stored.version == loaded.version {
                    return Err(refusal.into());
                }
                let events = stored.state.decide(command)?;
                Ok((stored, events))
            }
        }
    }

    /// Appends the events decided on `loaded`, at its version, and says what that came
    /// to. Given up before it is sent when the caller's deadline has passed; carried out
    /// to the end once sent.
    async fn append(
        &self,
        request: &Request<'_>,
        loaded: Loaded<A>,
        events: Vec<A::Event>,
    ) -> Result<Appended, CommandError> {
        let (id, stream, key) = (request.id, &request.stream, &request.key);
        let names: Vec<String> = events.iter().map(|e| e.event_type().to_owned()).collect();
        // Tests that force a race read this to know every contender has decided: the
        // crate's target, as the server's logs have always named it.
        tracing::debug!(target: LOG_TARGET, %stream, version = loaded.version, events = ?names, "decided");
        let append = self.append_request(request, &loaded, &events, &names);
        // From here on the command is carried out to the end, deadline or not: an append
        // once sent may commit, and the caller is told what the store did.
        if request
            .context
            .deadline
            .is_some_and(|deadline| tokio::time::Instant::now() >= deadline)
        {
            return Err(CommandError::TimedOut);
        }
        let appended = self.store.append(append).await;
        if let (Some(key), Err(error)) = (key, &appended)
            && carried_out_elsewhere(error)
            && let Some(record) = self.store.find_idempotency(key).await?
        {
            // Another process carried out the same key meanwhile: its events (a
            // conversion with another deal id), its claim (a create's email, on another
            // id) or its version are in the way. Its outcome is ours.
            tracing::debug!(target: LOG_TARGET, %stream, %error, "the key's request was carried out elsewhere");
            self.forget(id);
            return replay(&record, &request.request_hash, id).map(Appended::Done);
        }
        match appended {
            Ok(outcome) => Ok(Appended::Done(
                self.answer(request, loaded, &events, names, outcome).await,
            )),
            Err(StoreError::IdempotencyKeyUsed { record }) => {
                // The same key committed meanwhile, from a concurrent request.
                self.forget(id);
                replay(&record, &request.request_hash, id).map(Appended::Done)
            }
            Err(StoreError::EventIdReused { .. }) if key.is_some() => {
                // The ids are the key's, so their request has committed; its record is not
                // to be seen (yet): come back for its answer.
                self.forget(id);
                Err(CommandError::IdempotencyKeyInUse)
            }
            Err(StoreError::WrongExpectedVersion { actual, .. }) => {
                Ok(Appended::LostRace { actual })
            }
            Err(StoreError::ClaimHeld { key, holder }) => Err(A::claim_held(&key, &holder).into()),
            Err(error) => {
                self.forget(id);
                Err(error.into())
            }
        }
    }

    /// The append of the events decided on `loaded`: at its version, with the claims
    /// they take and release, their ids (derived from the key, for a keyed request), the
    /// stream's data key shredded with an erasure, and the key's record.
    fn append_request(
        &self,
        request: &Request<'_>,
        loaded: &Loaded<A>,
        events: &[A::Event],
        names: &[String],
    ) -> AppendRequest {
        let (stream, key) = (&request.stream, &request.key);
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
                let event_id = event_id(request, loaded.version, i);
                NewEvent::new(stored.event_type, stored.data)
                    .with_id(event_id)
                    .with_schema_version(stored.schema_version)
                    .with_metadata(request.metadata.clone())
            })
            .collect();
        let mut append = AppendRequest::new(
            stream.clone(),
            ExpectedVersion::Exact(loaded.version),
            new_events,
        )
        .with_claims(claims);
        if events.iter().any(Event::erases_subject) {
            // The stream's data key goes with the erasure, in its transaction.
            append = append.with_shredded(vec![stream.as_str().to_owned()]);
        }
        if let Some(key) = key {
            append = append.with_idempotency(IdempotencyKey {
                key: key.clone(),
                request_hash: request.request_hash.clone(),
                payload: json!({ "id": request.id, "events": names }),
            });
        }
        append
    }

    /// The outcome of an append that committed, after the state it made is cached (and
    /// snapshotted when due).
    async fn answer(
        &self,
        request: &Request<'_>,
        loaded: Loaded<A>,
        events: &[A::Event],
        names: Vec<String>,
        outcome: AppendOutcome,
    ) -> CommandOutcome {
        let state = loaded.state.replay(events);
        self.after_append(
            request.id,
            &request.stream,
            loaded.version,
            state,
            outcome.version,
        )
        .await;
        CommandOutcome {
            id: request.id,
            version: outcome.version,
            position: outcome.last_position(),
            events: names,
        }
    }

    /// After the `attempt`-th append lost a race to a writer that moved the aggregate to
    /// `actual`: the caller's expected version, when it named one, is now wrong
    /// (`VersionMismatch`); past the attempts and the time allowed, `ConcurrencyConflict`;
    /// else a jittered wait before deciding again.
    async fn after_lost_race(
        &self,
        request: &Request<'_>,
        actual: u64,
        attempt: u32,
        started: std::time::Instant,
    ) -> Result<(), CommandError> {
        self.forget(request.id);
        if let Some(expected) = request.context.expected_version {
            return Err(CommandError::VersionMismatch { expected, actual });
        }
        if attempt >= self.config.max_attempts && started.elapsed() >= self.config.conflict_wait {
            return Err(CommandError::ConcurrencyConflict { attempts: attempt });
        }
        tracing::debug!(target: LOG_TARGET, stream = %request.stream, attempt, "append lost a race; deciding again");
        in_time(request.context.deadline, async {
            tokio::time::sleep(lost_race_backoff(attempt)).await;
            Ok(())
        })
        .await
    }
}

/// The idempotency keys whose requests a handler is carrying out now.
#[derive(Debug, Default)]
pub(crate) struct InFlight(Mutex<HashSet<String>>);

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
pub(crate) struct Turns(Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>);

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

/// The id of the `i`-th event a request appends at `version`. A retry decides the same
/// events at the same version with the same ids, so the store recognises it even if the
/// first answer was lost. The request, the stream and the version are in the name: a key
/// reused after its record was purged makes new ids, and so do two tries of a create
/// whose ids the server made. Without a key, a new id.
fn event_id(request: &Request<'_>, version: u64, i: usize) -> Uuid {
    match &request.key {
        Some(key) => Uuid::new_v5(
            &EVENT_ID_NAMESPACE,
            format!(
                "{key}/{}/{}/{version}/{i}",
                request.request_hash, request.stream
            )
            .as_bytes(),
        ),
        None => Uuid::now_v7(),
    }
}

/// A step before a command's append, given up with `TimedOut` when the caller's deadline
/// passes first (nothing is written before the append).
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

/// How long to wait before deciding a command again after its `attempt`-th append lost a
/// race: up to 1, 2, 4, … 32 ms, at random, so that writers on several servers stop
/// meeting at the same instant.
fn lost_race_backoff(attempt: u32) -> Duration {
    let ceiling = 1u64 << attempt.saturating_sub(1).min(5);
    let random = Uuid::new_v4().as_u128() as u64;
    Duration::from_micros(random % (ceiling * 1_000 + 1))
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
