//! Why the business refuses a command. Each rejection is one variant, and says which of
//! the three kinds of `domain.md` it is: the command is *invalid* (422), the aggregate's
//! state forbids it (*conflict*, 409), or the aggregate does not exist (*not found*, 404).

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// The three kinds of rejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectionKind {
    Invalid,
    Conflict,
    NotFound,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    // Invalid: the command itself is malformed.
    /// (The message never repeats the address: it is personal data, even malformed.)
    #[error("the email is not a valid address: one @, a dot after it, at most 254 characters")]
    InvalidEmail(String),
    #[error("{field} must be {min} to {max} characters")]
    InvalidText {
        field: &'static str,
        min: usize,
        max: usize,
    },
    #[error("{field} {value:?} is not one of: {allowed}")]
    UnknownValue {
        field: &'static str,
        value: String,
        allowed: &'static str,
    },
    #[error("currency {0:?} is not an ISO 4217 code (three upper-case letters)")]
    InvalidCurrency(String),
    #[error("{field} must not contain control characters (line breaks and tabs may)")]
    ControlCharacter { field: &'static str },
    #[error("{field} must not be negative")]
    Negative { field: &'static str },
    #[error("{field} must be at most {max}")]
    TooLarge { field: &'static str, max: i64 },
    #[error("the amount is in {given}, the deal is in {deal}")]
    CurrencyMismatch { deal: String, given: String },
    #[error("{field} must have {min} to {max} entries")]
    InvalidCount {
        field: &'static str,
        min: usize,
        max: usize,
    },
    #[error("{field} must not be empty when given (left out, it matches every lead)")]
    EmptyList { field: &'static str },
    #[error("{field} {value:?} is given twice")]
    Duplicate { field: &'static str, value: String },
    #[error(
        "email domain pattern {0:?} must be a domain (1 to 253 characters of a-z, 0-9, \
         '.' and '-', with a dot), or *. and a domain"
    )]
    InvalidDomainPattern(String),
    #[error("process {0:?} must be 1 to 100 characters of a-z, 0-9 and _")]
    InvalidProcess(String),
    #[error("{field} must be {min} to {max}")]
    OutOfRange {
        field: &'static str,
        min: i64,
        max: i64,
    },
    #[error("{field} must be greater than zero")]
    NotPositive { field: &'static str },
    #[error("the payment is {given}, the order's total is {total}")]
    AmountMismatch { total: String, given: String },
    #[error("the MRR is in {given}, the subscription is in {subscription}")]
    MrrCurrencyMismatch { subscription: String, given: String },

    // Conflict: the state forbids the command.
    #[error("lead {0} already exists")]
    LeadExists(Uuid),
    #[error("email already belongs to lead {existing}")]
    DuplicateEmail { existing: Uuid },
    #[error("{0} is already taken")]
    KeyTaken(String),
    #[error("the lead is {status}: closed leads do not change")]
    LeadClosed { status: &'static str },
    #[error("the lead is already assigned to {0}")]
    AlreadyAssigned(String),
    #[error("the lead is {status}, only a qualified lead converts")]
    LeadNotQualified { status: &'static str },
    #[error("account {0} already exists")]
    AccountExists(Uuid),
    #[error("the account is already named {0:?}")]
    SameName(String),
    #[error("the account's tier is already {0}")]
    SameTier(&'static str),
    #[error("deal {0} already exists")]
    DealExists(Uuid),
    #[error("the deal is {status}: closed deals do not change")]
    DealClosed { status: &'static str },
    #[error("a deal moves only to a later stage: {from} to {to} is not")]
    StageNotLater {
        from: &'static str,
        to: &'static str,
    },
    #[error("the deal's amount is already {0}")]
    SameAmount(String),
    #[error("the routing rules are already these")]
    RoutingRulesUnchanged,
    #[error("no routing rule matches the lead")]
    NoRoutingRuleMatches,
    #[error("routing rule {rule:?} is gone or has no other owner to reassign the lead to")]
    NoOtherOwner { rule: String },
    #[error("timer {0} already exists")]
    TimerExists(Uuid),
    #[error("the timer is {status}: it fires at most once, and never once cancelled")]
    TimerClosed { status: &'static str },
    #[error("the timer is due at {due_at}, not before")]
    TimerNotDue { due_at: DateTime<Utc> },
    #[error("order {0} already exists")]
    OrderExists(Uuid),
    #[error("the deal is {status}, only a won deal takes an order")]
    DealNotWon { status: &'static str },
    #[error("the order is {status}: closed orders do not change")]
    OrderClosed { status: &'static str },
    #[error("the order is {status}, and this takes an order that is {required}")]
    OrderNotInStatus {
        status: &'static str,
        required: &'static str,
    },
    #[error("subscription {0} already exists")]
    SubscriptionExists(Uuid),
    #[error("the subscription is {status}: closed subscriptions do not change")]
    SubscriptionClosed { status: &'static str },
    #[error("an expansion raises the MRR: {from} to {to} does not")]
    MrrNotHigher { from: String, to: String },
    #[error("a contraction lowers the MRR: {from} to {to} does not")]
    MrrNotLower { from: String, to: String },

    // Not found.
    #[error("the lead does not exist")]
    LeadNotFound,
    #[error("the account does not exist")]
    AccountNotFound,
    #[error("the deal does not exist")]
    DealNotFound,
    #[error("the timer does not exist")]
    TimerNotFound,
    #[error("the order does not exist")]
    OrderNotFound,
    #[error("the subscription does not exist")]
    SubscriptionNotFound,
}

impl DomainError {
    pub fn kind(&self) -> RejectionKind {
        use DomainError::*;
        match self {
            InvalidEmail(_)
            | InvalidText { .. }
            | UnknownValue { .. }
            | InvalidCurrency(_)
            | ControlCharacter { .. }
            | Negative { .. }
            | TooLarge { .. }
            | CurrencyMismatch { .. }
            | InvalidCount { .. }
            | EmptyList { .. }
            | Duplicate { .. }
            | InvalidDomainPattern(_)
            | InvalidProcess(_)
            | OutOfRange { .. }
            | NotPositive { .. }
            | AmountMismatch { .. }
            | MrrCurrencyMismatch { .. } => RejectionKind::Invalid,
            LeadExists(_)
            | DuplicateEmail { .. }
            | KeyTaken(_)
            | LeadClosed { .. }
            | AlreadyAssigned(_)
            | LeadNotQualified { .. }
            | AccountExists(_)
            | SameName(_)
            | SameTier(_)
            | DealExists(_)
            | DealClosed { .. }
            | StageNotLater { .. }
            | SameAmount(_)
            | RoutingRulesUnchanged
            | NoRoutingRuleMatches
            | NoOtherOwner { .. }
            | TimerExists(_)
            | TimerClosed { .. }
            | TimerNotDue { .. }
            | OrderExists(_)
            | DealNotWon { .. }
            | OrderClosed { .. }
            | OrderNotInStatus { .. }
            | SubscriptionExists(_)
            | SubscriptionClosed { .. }
            | MrrNotHigher { .. }
            | MrrNotLower { .. } => RejectionKind::Conflict,
            LeadNotFound | AccountNotFound | DealNotFound | TimerNotFound | OrderNotFound
            | SubscriptionNotFound => RejectionKind::NotFound,
        }
    }

    /// The stable code clients match on (the `code` of a problem+json answer).
    pub fn code(&self) -> &'static str {
        use DomainError::*;
        match self {
            InvalidEmail(_) => "invalid-email",
            InvalidText { .. } => "invalid-text",
            UnknownValue { .. } => "unknown-value",
            InvalidCurrency(_) => "invalid-currency",
            ControlCharacter { .. } => "invalid-text",
            Negative { .. } => "negative-number",
            TooLarge { .. } => "number-too-large",
            CurrencyMismatch { .. } => "currency-mismatch",
            InvalidCount { .. } => "invalid-count",
            EmptyList { .. } => "empty-list",
            Duplicate { .. } => "duplicate-value",
            InvalidDomainPattern(_) => "invalid-domain-pattern",
            InvalidProcess(_) => "invalid-process",
            OutOfRange { .. } => "number-out-of-range",
            NotPositive { .. } => "non-positive-number",
            AmountMismatch { .. } => "amount-mismatch",
            // The same code as a deal's: to a client both say the money is in the wrong
            // currency.
            MrrCurrencyMismatch { .. } => "currency-mismatch",
            LeadExists(_) => "lead-exists",
            DuplicateEmail { .. } => "duplicate-email",
            KeyTaken(_) => "key-taken",
            LeadClosed { .. } => "lead-closed",
            AlreadyAssigned(_) => "already-assigned",
            LeadNotQualified { .. } => "lead-not-qualified",
            AccountExists(_) => "account-exists",
            SameName(_) => "same-name",
            SameTier(_) => "same-tier",
            DealExists(_) => "deal-exists",
            DealClosed { .. } => "deal-closed",
            StageNotLater { .. } => "invalid-stage-transition",
            SameAmount(_) => "same-amount",
            RoutingRulesUnchanged => "routing-rules-unchanged",
            NoRoutingRuleMatches => "no-routing-rule-matches",
            NoOtherOwner { .. } => "no-other-owner",
            TimerExists(_) => "timer-exists",
            TimerClosed { .. } => "timer-closed",
            TimerNotDue { .. } => "timer-not-due",
            OrderExists(_) => "order-exists",
            DealNotWon { .. } => "deal-not-won",
            OrderClosed { .. } => "order-closed",
            OrderNotInStatus { .. } => "invalid-order-transition",
            SubscriptionExists(_) => "subscription-exists",
            SubscriptionClosed { .. } => "subscription-closed",
            MrrNotHigher { .. } => "mrr-not-higher",
            MrrNotLower { .. } => "mrr-not-lower",
            LeadNotFound => "lead-not-found",
            AccountNotFound => "account-not-found",
            DealNotFound => "deal-not-found",
            TimerNotFound => "timer-not-found",
            OrderNotFound => "order-not-found",
            SubscriptionNotFound => "subscription-not-found",
        }
    }
}
