//! The durable timer: a process asks to be woken at a time with a payload, and the
//! scheduler fires the timer once it is due. Stream `timer-{id}`.
//!
//! Invariants: a timer fires at most once, never before its time, and never once
//! cancelled; a fired or cancelled timer never changes. The time is a fact from outside:
//! the scheduler's `now` arrives in `Fire`, the domain reads no clock.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{Aggregate, Command, DomainError, Event};

/// The namespace of the ids `timer_id` derives (a UUIDv5 namespace chosen once for
/// Annals' timers; changing it would give every retried schedule a new timer).
pub const TIMER_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2a9e_5b7d_4c3a_9e0f_8d2b_1a47_c5e3);

/// The id of the timer `process` schedules for `key` (say, the id of the event that
/// causes it): a UUIDv5 of `"{process}/{key}"` in `TIMER_NAMESPACE`, so every retry of
/// the same step schedules the same timer, and the second attempt is refused as
/// `TimerExists` instead of waking the process twice. A process's name has no `/`, so
/// the name and the key never run into each other.
pub fn timer_id(process: &str, key: &str) -> Uuid {
    Uuid::new_v5(&TIMER_NAMESPACE, format!("{process}/{key}").as_bytes())
}

/// The longest name of a process a timer wakes.
pub const MAX_PROCESS_LEN: usize = 100;

/// Whether `process` names a consumer of the log: 1–100 characters of `a-z`, `0-9`, `_`.
fn valid_process(process: &str) -> bool {
    (1..=MAX_PROCESS_LEN).contains(&process.len())
        && process
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimerStatus {
    /// Not scheduled yet: the stream is empty.
    #[default]
    Absent,
    Scheduled,
    Fired,
    Cancelled,
}

impl TimerStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TimerStatus::Absent => "absent",
            TimerStatus::Scheduled => "scheduled",
            TimerStatus::Fired => "fired",
            TimerStatus::Cancelled => "cancelled",
        }
    }

    /// The status after `event`.
    pub fn after(self, event: &TimerEvent) -> TimerStatus {
        match event {
            TimerEvent::TimerScheduled { .. } => TimerStatus::Scheduled,
            TimerEvent::TimerCancelled {} => TimerStatus::Cancelled,
            TimerEvent::TimerFired { .. } => TimerStatus::Fired,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum TimerCommand {
    /// `process` is the consumer to wake; `payload` is handed back to it when the timer
    /// fires.
    Schedule {
        timer_id: Uuid,
        process: String,
        due_at: DateTime<Utc>,
        payload: Value,
    },
    Cancel {},
    /// `now` is the scheduler's clock.
    Fire {
        now: DateTime<Utc>,
    },
}

impl Command for TimerCommand {
    fn name(&self) -> &'static str {
        match self {
            TimerCommand::Schedule { .. } => "ScheduleTimer",
            TimerCommand::Cancel {} => "CancelTimer",
            TimerCommand::Fire { .. } => "FireTimer",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum TimerEvent {
    TimerScheduled {
        timer_id: Uuid,
        process: String,
        due_at: DateTime<Utc>,
        payload: Value,
    },
    TimerCancelled {},
    /// Carries what the woken process needs, so it reads no other event of the timer.
    TimerFired {
        process: String,
        due_at: DateTime<Utc>,
        payload: Value,
    },
}

impl Event for TimerEvent {
    fn event_type(&self) -> &'static str {
        match self {
            TimerEvent::TimerScheduled { .. } => "TimerScheduled",
            TimerEvent::TimerCancelled {} => "TimerCancelled",
            TimerEvent::TimerFired { .. } => "TimerFired",
        }
    }

    fn current_version(_event_type: &str) -> u32 {
        1
    }
}

/// A timer as its events left it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timer {
    pub id: Option<Uuid>,
    /// The consumer the timer wakes; set once, by `TimerScheduled`.
    pub process: Option<String>,
    /// The timer fires at or after this time, never before.
    pub due_at: Option<DateTime<Utc>>,
    pub payload: Value,
    pub status: TimerStatus,
}

impl Timer {
    /// The process and due time of a scheduled timer, or why the timer cannot change.
    fn scheduled(&self) -> Result<(&str, DateTime<Utc>), DomainError> {
        match (self.status, &self.process, self.due_at) {
            (TimerStatus::Scheduled, Some(process), Some(due_at)) => Ok((process, due_at)),
            (TimerStatus::Fired | TimerStatus::Cancelled, ..) => Err(DomainError::TimerClosed {
                status: self.status.as_str(),
            }),
            _ => Err(DomainError::TimerNotFound),
        }
    }
}

impl Aggregate for Timer {
    type Command = TimerCommand;
    type Event = TimerEvent;
    const CATEGORY: &'static str = "timer";
    const SNAPSHOT_VERSION: u32 = 1;

    fn decide(&self, command: TimerCommand) -> Result<Vec<TimerEvent>, DomainError> {
        match command {
            TimerCommand::Schedule {
                timer_id,
                process,
                due_at,
                payload,
            } => {
                if !valid_process(&process) {
                    return Err(DomainError::InvalidProcess(process));
                }
                if let Some(id) = self.id {
                    return Err(DomainError::TimerExists(id));
                }
                Ok(vec![TimerEvent::TimerScheduled {
                    timer_id,
                    process,
                    due_at,
                    payload,
                }])
            }
            TimerCommand::Cancel {} => {
                self.scheduled()?;
                Ok(vec![TimerEvent::TimerCancelled {}])
            }
            TimerCommand::Fire { now } => {
                let (process, due_at) = self.scheduled()?;
                if now < due_at {
                    return Err(DomainError::TimerNotDue { due_at });
                }
                Ok(vec![TimerEvent::TimerFired {
                    process: process.to_owned(),
                    due_at,
                    payload: self.payload.clone(),
                }])
            }
        }
    }

    fn evolve(mut self, event: &TimerEvent) -> Self {
        self.status = self.status.after(event);
        match event {
            TimerEvent::TimerScheduled {
                timer_id,
                process,
                due_at,
                payload,
            } => {
                self.id = Some(*timer_id);
                self.process = Some(process.clone());
                self.due_at = Some(*due_at);
                self.payload = payload.clone();
            }
            TimerEvent::TimerCancelled {} | TimerEvent::TimerFired { .. } => {}
        }
        self
    }
}
