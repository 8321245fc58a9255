//! Every rule of the subscription (`domain.md`, Subscription), accepted and refused, as
//! given / when / then.

use annals_domain::subscription::{
    Subscription, SubscriptionCommand, SubscriptionEvent, SubscriptionStatus,
};
use annals_domain::values::*;
use annals_domain::{Aggregate, DomainError, RejectionKind};

use crate::rules::{given, id};

fn eur(minor: i64) -> Money {
    Money::parse("EUR", minor).unwrap()
}

fn start(mrr: Money) -> SubscriptionCommand {
    SubscriptionCommand::Start {
        subscription_id: id(70),
        account_id: id(20),
        order_id: id(50),
        mrr,
    }
}

fn started() -> SubscriptionEvent {
    SubscriptionEvent::SubscriptionStarted {
        subscription_id: id(70),
        account_id: id(20),
        order_id: id(50),
        mrr: eur(49_000),
    }
}

fn churned() -> SubscriptionEvent {
    SubscriptionEvent::SubscriptionChurned {
        mrr: eur(49_000),
        reason: None,
        order_id: Some(id(50)),
    }
}

fn expand(mrr: Money) -> SubscriptionCommand {
    SubscriptionCommand::Expand { mrr }
}

fn contract(mrr: Money) -> SubscriptionCommand {
    SubscriptionCommand::Contract { mrr }
}

#[test]
fn start_records_the_subscription_at_its_mrr() {
    let subscription = given::<Subscription>([])
        .when(start(eur(49_000)))
        .then([started()]);
    assert_eq!(subscription.status, SubscriptionStatus::Active);
    assert_eq!(subscription.mrr, Some(eur(49_000)));
    assert_eq!(subscription.order_id, Some(id(50)));
    assert_eq!(subscription.account_id, Some(id(20)));
}

#[test]
fn start_at_an_mrr_of_zero_is_invalid() {
    given::<Subscription>([])
        .when(start(eur(0)))
        .then_err(DomainError::NotPositive { field: "mrr" });
    let zero = DomainError::NotPositive { field: "mrr" };
    assert_eq!(zero.kind(), RejectionKind::Invalid);
    assert_eq!(zero.code(), "non-positive-number");
}

#[test]
fn start_an_existing_subscription_is_a_conflict_even_once_churned() {
    for history in [vec![started()], vec![started(), churned()]] {
        given::<Subscription>(history)
            .when(start(eur(49_000)))
            .then_err(DomainError::SubscriptionExists(id(70)));
    }
    let exists = DomainError::SubscriptionExists(id(70));
    assert_eq!(exists.kind(), RejectionKind::Conflict);
    assert_eq!(exists.code(), "subscription-exists");
}

#[test]
fn expand_to_a_higher_mrr_records_the_expansion() {
    let subscription = given::<Subscription>([started()])
        .when(expand(eur(59_000)))
        .then([SubscriptionEvent::SubscriptionExpanded {
            from: eur(49_000),
            to: eur(59_000),
        }]);
    assert_eq!(subscription.mrr, Some(eur(59_000)));
    assert_eq!(subscription.status, SubscriptionStatus::Active);
}

#[test]
fn expand_to_the_same_or_a_lower_mrr_is_a_conflict() {
    for to in [49_000, 48_999, 0] {
        given::<Subscription>([started()])
            .when(expand(eur(to)))
            .then_err(DomainError::MrrNotHigher {
                from: "49000 EUR".into(),
                to: format!("{to} EUR"),
            });
    }
    let refused = DomainError::MrrNotHigher {
        from: "2 EUR".into(),
        to: "1 EUR".into(),
    };
    assert_eq!(refused.kind(), RejectionKind::Conflict);
    assert_eq!(refused.code(), "mrr-not-higher");
}

#[test]
fn contract_to_a_lower_mrr_above_zero_records_the_contraction() {
    let subscription = given::<Subscription>([started()])
        .when(contract(eur(1)))
        .then([SubscriptionEvent::SubscriptionContracted {
            from: eur(49_000),
            to: eur(1),
        }]);
    assert_eq!(subscription.mrr, Some(eur(1)));
}

#[test]
fn contract_to_the_same_or_a_higher_mrr_is_a_conflict() {
    for to in [49_000, 49_001] {
        given::<Subscription>([started()])
            .when(contract(eur(to)))
            .then_err(DomainError::MrrNotLower {
                from: "49000 EUR".into(),
                to: format!("{to} EUR"),
            });
    }
    let refused = DomainError::MrrNotLower {
        from: "1 EUR".into(),
        to: "2 EUR".into(),
    };
    assert_eq!(refused.kind(), RejectionKind::Conflict);
    assert_eq!(refused.code(), "mrr-not-lower");
}

#[test]
fn contract_to_zero_is_invalid_churn_is_how_a_subscription_ends() {
    given::<Subscription>([started()])
        .when(contract(eur(0)))
        .then_err(DomainError::NotPositive { field: "mrr" });
}

#[test]
fn an_mrr_in_another_currency_is_invalid() {
    let usd = Money::parse("USD", 59_000).unwrap();
    let mismatch = DomainError::MrrCurrencyMismatch {
        subscription: "EUR".into(),
        given: "USD".into(),
    };
    for command in [
        expand(usd.clone()),
        contract(Money::parse("USD", 1).unwrap()),
    ] {
        given::<Subscription>([started()])
            .when(command)
            .then_err(mismatch.clone());
    }
    assert_eq!(mismatch.kind(), RejectionKind::Invalid);
    assert_eq!(mismatch.code(), "currency-mismatch");
}

#[test]
fn churn_an_active_subscription_records_the_mrr_lost() {
    let subscription = given::<Subscription>([started()])
        .when(SubscriptionCommand::Churn { reason: None })
        .then([churned()]);
    assert_eq!(subscription.status, SubscriptionStatus::Churned);
    let expanded = SubscriptionEvent::SubscriptionExpanded {
        from: eur(49_000),
        to: eur(59_000),
    };
    given::<Subscription>([started(), expanded])
        .when(SubscriptionCommand::Churn {
            reason: Some(Reason::parse("moved to a competitor").unwrap()),
        })
        .then([SubscriptionEvent::SubscriptionChurned {
            mrr: eur(59_000),
            reason: Some(Reason::parse("moved to a competitor").unwrap()),
            order_id: Some(id(50)),
        }]);
}

#[test]
fn a_churned_subscription_never_changes() {
    for command in [
        expand(eur(59_000)),
        contract(eur(1)),
        SubscriptionCommand::Churn { reason: None },
    ] {
        given::<Subscription>([started(), churned()])
            .when(command)
            .then_err(DomainError::SubscriptionClosed { status: "churned" });
    }
    let closed = DomainError::SubscriptionClosed { status: "churned" };
    assert_eq!(closed.kind(), RejectionKind::Conflict);
    assert_eq!(closed.code(), "subscription-closed");
}

#[test]
fn commands_on_a_subscription_that_does_not_exist_are_not_found() {
    for command in [
        expand(eur(59_000)),
        contract(eur(1)),
        SubscriptionCommand::Churn { reason: None },
    ] {
        given::<Subscription>([])
            .when(command)
            .then_err(DomainError::SubscriptionNotFound);
    }
    let missing = DomainError::SubscriptionNotFound;
    assert_eq!(missing.kind(), RejectionKind::NotFound);
    assert_eq!(missing.code(), "subscription-not-found");
    assert_eq!(
        Subscription::stream_name(id(70)),
        format!("subscription-{}", id(70))
    );
}

#[test]
fn every_subscription_status_word_names_its_status_and_no_other_word_does() {
    for status in std::iter::once(SubscriptionStatus::Absent)
        .chain(SubscriptionStatus::STARTED.iter().copied())
    {
        assert_eq!(SubscriptionStatus::parse(status.as_str()), Some(status));
    }
    for word in ["", "Active", "active ", "closed", "cancelled"] {
        assert_eq!(SubscriptionStatus::parse(word), None, "{word:?}");
    }
}
