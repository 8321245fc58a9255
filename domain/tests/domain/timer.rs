//! Every rule of the durable timer, accepted and refused, as given / when / then.

use annals_domain::timer::{Timer, TimerCommand, TimerEvent, TimerStatus, timer_id};
use annals_domain::{Aggregate, DomainError, RejectionKind};
use chrono::{DateTime, Duration, TimeZone, Utc};
use serde_json::json;

use crate::rules::{given, id};

fn due() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 3, 9, 0, 0).unwrap()
}

fn schedule(process: &str) -> TimerCommand {
    TimerCommand::Schedule {
        timer_id: id(40),
        process: process.into(),
        due_at: due(),
        payload: json!({"order_id": id(50)}),
    }
}

fn scheduled() -> TimerEvent {
    TimerEvent::TimerScheduled {
        timer_id: id(40),
        process: "order_process".into(),
        due_at: due(),
        payload: json!({"order_id": id(50)}),
    }
}

fn fired() -> TimerEvent {
    TimerEvent::TimerFired {
        process: "order_process".into(),
        due_at: due(),
        payload: json!({"order_id": id(50)}),
    }
}

fn fire_at(now: DateTime<Utc>) -> TimerCommand {
    TimerCommand::Fire { now }
}

#[test]
fn schedule_records_the_process_the_time_and_the_payload() {
    let timer = given::<Timer>([])
        .when(schedule("order_process"))
        .then([scheduled()]);
    assert_eq!(timer.status, TimerStatus::Scheduled);
    assert_eq!(timer.id, Some(id(40)));
    assert_eq!(timer.due_at, Some(due()));
}

#[test]
fn schedule_an_existing_timer_is_a_conflict_even_after_it_fired() {
    given::<Timer>([scheduled()])
        .when(schedule("order_process"))
        .then_err(DomainError::TimerExists(id(40)));
    given::<Timer>([scheduled(), fired()])
        .when(schedule("order_process"))
        .then_err(DomainError::TimerExists(id(40)));
    assert_eq!(
        DomainError::TimerExists(id(40)).kind(),
        RejectionKind::Conflict
    );
}

#[test]
fn the_process_is_a_consumers_name_or_the_schedule_is_invalid() {
    given::<Timer>([])
        .when(schedule(&"p".repeat(100)))
        .then([TimerEvent::TimerScheduled {
            timer_id: id(40),
            process: "p".repeat(100),
            due_at: due(),
            payload: json!({"order_id": id(50)}),
        }]);
    for bad in [
        "",
        "Order_process",
        "order-process",
        "order process",
        "ordér",
        &"p".repeat(101),
    ] {
        given::<Timer>([])
            .when(schedule(bad))
            .then_err(DomainError::InvalidProcess(bad.into()));
    }
    let invalid = DomainError::InvalidProcess(String::new());
    assert_eq!(invalid.kind(), RejectionKind::Invalid);
    assert_eq!(invalid.code(), "invalid-process");
}

#[test]
fn cancel_a_scheduled_timer() {
    let timer = given::<Timer>([scheduled()])
        .when(TimerCommand::Cancel {})
        .then([TimerEvent::TimerCancelled {}]);
    assert_eq!(timer.status.as_str(), "cancelled");
}

#[test]
fn cancel_a_timer_never_scheduled_is_not_found() {
    given::<Timer>([])
        .when(TimerCommand::Cancel {})
        .then_err(DomainError::TimerNotFound);
    assert_eq!(DomainError::TimerNotFound.kind(), RejectionKind::NotFound);
    assert_eq!(DomainError::TimerNotFound.code(), "timer-not-found");
}

#[test]
fn cancel_a_fired_or_cancelled_timer_is_a_conflict() {
    for (closing, status) in [
        (fired(), "fired"),
        (TimerEvent::TimerCancelled {}, "cancelled"),
    ] {
        given::<Timer>([scheduled(), closing])
            .when(TimerCommand::Cancel {})
            .then_err(DomainError::TimerClosed { status });
    }
    assert_eq!(
        DomainError::TimerClosed { status: "fired" }.code(),
        "timer-closed"
    );
}

#[test]
fn fire_at_or_after_the_due_time_hands_back_the_process_and_payload() {
    for now in [due(), due() + Duration::days(3)] {
        let timer = given::<Timer>([scheduled()])
            .when(fire_at(now))
            .then([fired()]);
        assert_eq!(timer.status, TimerStatus::Fired);
    }
}

#[test]
fn fire_before_the_due_time_is_a_conflict() {
    given::<Timer>([scheduled()])
        .when(fire_at(due() - Duration::seconds(1)))
        .then_err(DomainError::TimerNotDue { due_at: due() });
    let early = DomainError::TimerNotDue { due_at: due() };
    assert_eq!(early.kind(), RejectionKind::Conflict);
    assert_eq!(early.code(), "timer-not-due");
}

#[test]
fn a_timer_fires_at_most_once_and_never_once_cancelled() {
    given::<Timer>([scheduled(), fired()])
        .when(fire_at(due()))
        .then_err(DomainError::TimerClosed { status: "fired" });
    given::<Timer>([scheduled(), TimerEvent::TimerCancelled {}])
        .when(fire_at(due()))
        .then_err(DomainError::TimerClosed {
            status: "cancelled",
        });
}

#[test]
fn fire_a_timer_never_scheduled_is_not_found() {
    given::<Timer>([])
        .when(fire_at(due()))
        .then_err(DomainError::TimerNotFound);
}

#[test]
fn a_timer_id_is_the_same_for_the_same_process_and_key_and_differs_otherwise() {
    let first = timer_id("order_process", "event-1");
    assert_eq!(first, timer_id("order_process", "event-1"));
    assert_eq!(first.get_version_num(), 5);
    assert_ne!(first, timer_id("order_process", "event-2"));
    assert_ne!(first, timer_id("routing", "event-1"));
    assert_eq!(Timer::stream_name(first), format!("timer-{first}"));
}
