//! Durable timers: how a process asks to be woken at a time, and the scheduler that fires
//! the timers when they are due.
//!
//! A process schedules a timer with a command (`TimerScheduled` in stream `timer-{id}`,
//! its id derived from the causing event, so a retry schedules nothing twice); the
//! `due_timers` read model keeps the timers waiting; the scheduler fires each one due
//! (`TimerFired`, decided by the timer itself); and the process is woken by reading
//! `TimerFired` in the log, like any other event it follows.
//!
//! Invariants: a timer fires at most once, never before its time, and never once
//! cancelled: the timer's own stream decides, with its expected version, so two
//! schedulers (two servers) or a scheduler and a cancel racing leave one outcome. A
//! timer due while no scheduler ran fires at the next start, since the log and the read
//! model keep it. Time comes from a `Clock`, which tests control.

use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use annals_commands::{CommandContext, CommandError, CommandHandler, Handlers};
use annals_domain::timer::{Timer, TimerCommand, TimerEvent, timer_id};
use annals_domain::{DecodeError, DomainError, Event, StoredForm};
use annals_store::RecordedEvent;
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::watch;
use uuid::Uuid;

use annals_engine::duty::{self, Duty};
use annals_engine::{ConsumerError, Fence, LEASE_LIFE, ReadDatabase};
use async_trait::async_trait;

use crate::processes::actor;
use crate::read_models::due_timers;

/// Where the time comes from: the real clock in production; a clock a test sets.
pub trait Clock: Send + Sync + Debug {
    fn now(&self) -> DateTime<Utc>;
}

/// The machine's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that stands still until it is moved: for tests, and for a demo's history.
#[derive(Debug)]
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    pub fn at(now: DateTime<Utc>) -> Self {
        ManualClock(Mutex::new(now))
    }

    pub fn advance(&self, by: chrono::Duration) {
        *self.now_mut() += by;
    }

    fn now_mut(&self) -> std::sync::MutexGuard<'_, DateTime<Utc>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now_mut()
    }
}

/// The lease the scheduler runs under: one server fires at a time (the timers' own
/// streams would keep two from firing one timer twice anyway).
const SCHEDULER: &str = "timer_scheduler";

/// Schedules, for `process`, a timer due at `due_at` that hands `payload` back; `key`
/// names the step that schedules it (the causing event's id, say), so every retry of
/// that step schedules the same timer. Scheduling it again is no error.
pub async fn schedule(
    timers: &CommandHandler<Timer>,
    process: &str,
    key: &str,
    due_at: DateTime<Utc>,
    payload: Value,
    context: &CommandContext,
) -> Result<Uuid, CommandError> {
    let id = timer_id(process, key);
    let command = TimerCommand::Schedule {
        timer_id: id,
        process: process.to_owned(),
        due_at,
        payload,
    };
    match timers.execute(id, command, context).await {
        Ok(_) | Err(CommandError::Domain(DomainError::TimerExists(_))) => Ok(id),
        Err(error) => Err(error),
    }
}

/// The payload of a `TimerFired` for `process`, if `event` is one (`None` for another
/// process's timer or another event).
pub fn fired_for(process: &str, event: &RecordedEvent) -> Result<Option<Value>, DecodeError> {
    if event.event_type != "TimerFired" {
        return Ok(None);
    }
    let stored = StoredForm {
        event_type: event.event_type.clone(),
        schema_version: event.schema_version,
        data: event.data.clone(),
    };
    match TimerEvent::decode(&stored)? {
        TimerEvent::TimerFired {
            process: woken,
            payload,
            ..
        } if woken == process => Ok(Some(payload)),
        _ => Ok(None),
    }
}

/// Fires the timers that are due, under a lease across processes.
#[derive(Debug)]
pub struct TimerScheduler {
    db: ReadDatabase,
    timers: Arc<CommandHandler<Timer>>,
    clock: Arc<dyn Clock>,
    /// Timers fired per round (and read per query).
    batch: usize,
    /// The longest wait between two looks at the due timers: the bound on a timer's
    /// delay when the read model that learns of it runs on another server.
    poll: Duration,
    /// How long the scheduler's lease lives unless renewed.
    lease_life: Duration,
}

impl TimerScheduler {
    pub fn new(db: ReadDatabase, handlers: &Handlers, clock: Arc<dyn Clock>) -> Self {
        TimerScheduler {
            db,
            timers: handlers.of::<Timer>(),
            clock,
            batch: 256,
            poll: Duration::from_millis(250),
            lease_life: LEASE_LIFE,
        }
    }

    /// How long the scheduler's lease lives unless renewed (10 s unless set; every
    /// process of a deployment must use the same).
    pub fn with_lease_life(mut self, life: Duration) -> Self {
        self.lease_life = life.max(Duration::from_millis(30));
        self
    }

    /// How many timers it reads per page, and fires at once (256 unless set).
    pub fn with_batch_size(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Fires every timer due now (as the read model knows them), a page at a time, the
    /// earliest first; returns how many it fired. A timer already fired or cancelled (the
    /// read model had not caught up yet, or another scheduler fired it) is left. Under no
    /// lease: for tests; beside servers, only `run_until_stopped` fires timers.
    pub async fn fire_due(&self) -> Result<usize, ConsumerError> {
        self.fire_due_under(None).await
    }

    /// `fire_due`, page by page only while `fence` (the scheduler's lease) is valid.
    async fn fire_due_under(&self, fence: Option<&Fence>) -> Result<usize, ConsumerError> {
        let now = self.clock.now();
        let mut fired = 0;
        let mut after: Option<(i64, String)> = None;
        loop {
            if fence.is_some_and(|fence| !fence.may_act()) {
                return Err(ConsumerError::LeaseLost(SCHEDULER.to_owned()));
            }
            let page = due_timers::due(
                &self.db,
                now.timestamp_micros(),
                after.as_ref().map(|(micros, id)| (*micros, id.as_str())),
                self.batch,
            )
            .await?;
            let tries = page.iter().map(|timer| self.fire(&timer.timer_id, now));
            for outcome in futures::future::join_all(tries).await {
                fired += usize::from(outcome?);
            }
            match page.last() {
                Some(last) if page.len() == self.batch => {
                    after = Some((last.due_micros, last.timer_id.clone()));
                }
                _ => return Ok(fired),
            }
        }
    }

    /// Fires one timer; whether it fired now.
    async fn fire(&self, id: &str, now: DateTime<Utc>) -> Result<bool, ConsumerError> {
        let id = Uuid::parse_str(id).map_err(|e| ConsumerError::Corrupt(e.to_string()))?;
        let context = CommandContext {
            actor: actor(SCHEDULER),
            ..CommandContext::default()
        };
        match self
            .timers
            .execute(id, TimerCommand::Fire { now }, &context)
            .await
        {
            Ok(_) => Ok(true),
            Err(CommandError::Domain(
                DomainError::TimerClosed { .. } | DomainError::TimerNotDue { .. },
            )) => Ok(false),
            Err(error) => Err(ConsumerError::Action(crate::processes::action_error(error))),
        }
    }

    /// How long to wait before looking again: until the next timer is due, at most
    /// `poll`.
    async fn wait(&self) -> Duration {
        match due_timers::next_due(&self.db).await {
            Ok(Some(next)) => {
                let now = self.clock.now().timestamp_micros();
                let micros = u64::try_from(next.saturating_sub(now)).unwrap_or(0);
                Duration::from_micros(micros).min(self.poll)
            }
            Ok(None) => self.poll,
            Err(error) => {
                tracing::warn!(%error, "reading the next due timer failed");
                self.poll
            }
        }
    }

    /// Fires timers as they fall due until `stop` turns true, while this process holds
    /// the scheduler's lease (taking it over when its holder dies); `woken` (the due
    /// timers' read model's progress, when it runs here) cuts a wait short when a new
    /// timer may have arrived.
    pub async fn run_until_stopped(
        &self,
        stop: watch::Receiver<bool>,
        woken: watch::Receiver<u64>,
    ) {
        let firing = Firing {
            scheduler: self,
            woken: tokio::sync::Mutex::new(woken),
        };
        duty::run_until_stopped(&firing, &self.db, self.lease_life, stop).await;
    }
}

/// The scheduler's rounds under its lease: fire what is due, then rest until the next
/// timer is due (at most `poll`), or the due timers' read model takes new events.
struct Firing<'a> {
    scheduler: &'a TimerScheduler,
    woken: tokio::sync::Mutex<watch::Receiver<u64>>,
}

#[async_trait]
impl Duty for Firing<'_> {
    fn name(&self) -> &'static str {
        SCHEDULER
    }

    async fn round(&self, fence: &Fence) -> Result<Duration, ConsumerError> {
        let scheduler = self.scheduler;
        let fired = scheduler.fire_due_under(Some(fence)).await?;
        Ok(match scheduler.wait().await {
            // Due, yet none fired: the read model has not seen them fire yet (or another
            // scheduler fired them); not a busy loop.
            wait if wait.is_zero() && fired == 0 => scheduler.poll,
            wait => wait,
        })
    }

    async fn rest(&self, at_most: Duration) {
        let mut woken = self.woken.lock().await;
        tokio::select! {
            // Not when the read model's runner is gone: then only the poll wakes it.
            Ok(()) = woken.changed() => {}
            () = tokio::time::sleep(at_most) => {}
        }
    }
}
