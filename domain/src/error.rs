//! Why the business refuses a command. Each rejection is one variant, declared once with
//! its message, its kind and its stable code beside it (`refusals!`); the kind is which
//! of the three of `domain.md` it is: the command is *invalid* (422), the aggregate's
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

/// Declares the refusals once: each variant with its message (`#[error]`), its kind and
/// its stable code beside it (`Variant => Kind "code"`), and from that the enum and its
/// `kind` and `code`.
macro_rules! refusals {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $(
                $(#[$variant_meta:meta])*
                $variant:ident $(($($tuple:ty),*))? $({ $($field:ident: $field_type:ty),* $(,)? })?
                    => $kind:ident $code:literal,
            )*
        }
    ) => {
        $(#[$meta])*
        pub enum $name {
            $(
                $(#[$variant_meta])*
                $variant $(($($tuple),*))? $({ $($field: $field_type),* })?,
            )*
        }

        impl $name {
            /// Which of the three kinds of refusal it is.
            pub fn kind(&self) -> RejectionKind {
                match self {
                    $($name::$variant { .. } => RejectionKind::$kind,)*
                }
            }

            /// The stable code clients match on (the `code` of a problem+json answer).
            pub fn code(&self) -> &'static str {
                match self {
                    $($name::$variant { .. } => $code,)*
                }
            }
        }
    };
}

refusals! {
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    // Invalid: the command itself is malformed.
    /// (The message never repeats the address: it is personal data, even malformed.)
    #[error("the email is not a valid address: one @, a dot after it, at most 254 characters")]
    InvalidEmail(String) => Invalid "invalid-email",
    #[error("{field} must be {min} to {max} characters")]
    InvalidText {
        field: &'static str,
        min: usize,
        max: usize,
    } => Invalid "invalid-text",
    #[error("{field} {value:?} is not one of: {allowed}")]
    UnknownValue {
        field: &'static str,
        value: String,
        allowed: &'static str,
    } => Invalid "unknown-value",
    #[error("currency {0:?} is not an ISO 4217 code (three upper-case letters)")]
    InvalidCurrency(String) => Invalid "invalid-currency",
    #[error("{field} must not contain control characters (line breaks and tabs may)")]
    ControlCharacter { field: &'static str } => Invalid "invalid-text",
    #[error("{field} must not be negative")]
    Negative { field: &'static str } => Invalid "negative-number",
    #[error("{field} must be at most {max}")]
    TooLarge { field: &'static str, max: i64 } => Invalid "number-too-large",
    #[error("the amount is in {given}, the deal is in {deal}")]
    CurrencyMismatch { deal: String, given: String } => Invalid "currency-mismatch",
    #[error("{field} must have {min} to {max} entries")]
    InvalidCount {
        field: &'static str,
        min: usize,
        max: usize,
    } => Invalid "invalid-count",
    #[error("{field} must not be empty when given (left out, it matches every lead)")]
    EmptyList { field: &'static str } => Invalid "empty-list",
    #[error("{field} {value:?} is given twice")]
    Duplicate { field: &'static str, value: String } => Invalid "duplicate-value",
    #[error(
        "email domain pattern {0:?} must be a domain (1 to 253 characters of a-z, 0-9, \
         '.' and '-', with a dot), or *. and a domain"
    )]
    InvalidDomainPattern(String) => Invalid "invalid-domain-pattern",
    #[error("process {0:?} must be 1 to 100 characters of a-z, 0-9 and _")]
    InvalidProcess(String) => Invalid "invalid-process",
    #[error("{field} must be {min} to {max}")]
    OutOfRange {
        field: &'static str,
        min: i64,
        max: i64,
    } => Invalid "number-out-of-range",
    #[error("{field} must be greater than zero")]
    NotPositive { field: &'static str } => Invalid "non-positive-number",
    #[error("the payment is {given}, the order's total is {total}")]
    AmountMismatch { total: String, given: String } => Invalid "amount-mismatch",
    #[error("the MRR is in {given}, the subscription is in {subscription}")]
    // The same code as a deal's: to a client both say the money is in the wrong
    // currency.
    MrrCurrencyMismatch { subscription: String, given: String } => Invalid "currency-mismatch",

    // Conflict: the state forbids the command.
    #[error("lead {0} already exists")]
    LeadExists(Uuid) => Conflict "lead-exists",
    #[error("email already belongs to lead {existing}")]
    DuplicateEmail { existing: Uuid } => Conflict "duplicate-email",
    #[error("{0} is already taken")]
    KeyTaken(String) => Conflict "key-taken",
    #[error("the lead is {status}: closed leads do not change")]
    LeadClosed { status: &'static str } => Conflict "lead-closed",
    #[error("the lead is already assigned to {0}")]
    AlreadyAssigned(String) => Conflict "already-assigned",
    #[error("the lead is {status}, only a qualified lead converts")]
    LeadNotQualified { status: &'static str } => Conflict "lead-not-qualified",
    #[error("account {0} already exists")]
    AccountExists(Uuid) => Conflict "account-exists",
    #[error("the account is already named {0:?}")]
    SameName(String) => Conflict "same-name",
    #[error("the account's tier is already {0}")]
    SameTier(&'static str) => Conflict "same-tier",
    #[error("deal {0} already exists")]
    DealExists(Uuid) => Conflict "deal-exists",
    #[error("the deal is {status}: closed deals do not change")]
    DealClosed { status: &'static str } => Conflict "deal-closed",
    #[error("a deal moves only to a later stage: {from} to {to} is not")]
    StageNotLater {
        from: &'static str,
        to: &'static str,
    } => Conflict "invalid-stage-transition",
    #[error("the deal's amount is already {0}")]
    SameAmount(String) => Conflict "same-amount",
    #[error("the routing rules are already these")]
    RoutingRulesUnchanged => Conflict "routing-rules-unchanged",
    #[error("no routing rule matches the lead")]
    NoRoutingRuleMatches => Conflict "no-routing-rule-matches",
    #[error("routing rule {rule:?} is gone or has no other owner to reassign the lead to")]
    NoOtherOwner { rule: String } => Conflict "no-other-owner",
    #[error("timer {0} already exists")]
    TimerExists(Uuid) => Conflict "timer-exists",
    #[error("the timer is {status}: it fires at most once, and never once cancelled")]
    TimerClosed { status: &'static str } => Conflict "timer-closed",
    #[error("the timer is due at {due_at}, not before")]
    TimerNotDue { due_at: DateTime<Utc> } => Conflict "timer-not-due",
    #[error("order {0} already exists")]
    OrderExists(Uuid) => Conflict "order-exists",
    #[error("the deal is {status}, only a won deal takes an order")]
    DealNotWon { status: &'static str } => Conflict "deal-not-won",
    #[error("the order is {status}: closed orders do not change")]
    OrderClosed { status: &'static str } => Conflict "order-closed",
    #[error("the order is {status}, and this takes an order that is {required}")]
    OrderNotInStatus {
        status: &'static str,
        required: &'static str,
    } => Conflict "invalid-order-transition",
    #[error("subscription {0} already exists")]
    SubscriptionExists(Uuid) => Conflict "subscription-exists",
    #[error("the subscription is {status}: closed subscriptions do not change")]
    SubscriptionClosed { status: &'static str } => Conflict "subscription-closed",
    #[error("an expansion raises the MRR: {from} to {to} does not")]
    MrrNotHigher { from: String, to: String } => Conflict "mrr-not-higher",
    #[error("a contraction lowers the MRR: {from} to {to} does not")]
    MrrNotLower { from: String, to: String } => Conflict "mrr-not-lower",

    // Not found.
    #[error("the lead does not exist")]
    LeadNotFound => NotFound "lead-not-found",
    #[error("the account does not exist")]
    AccountNotFound => NotFound "account-not-found",
    #[error("the deal does not exist")]
    DealNotFound => NotFound "deal-not-found",
    #[error("the timer does not exist")]
    TimerNotFound => NotFound "timer-not-found",
    #[error("the order does not exist")]
    OrderNotFound => NotFound "order-not-found",
    #[error("the subscription does not exist")]
    SubscriptionNotFound => NotFound "subscription-not-found",
}
}
