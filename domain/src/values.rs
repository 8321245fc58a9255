//! Value objects: each is built by `parse`, which enforces its rule from `domain.md`, so
//! a command that carries one is valid by construction. Deserialising one (from a stored
//! event) trusts the log: events are facts, even ones recorded under older rules.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::DomainError;

fn text(value: &str, field: &'static str, min: usize, max: usize) -> Result<String, DomainError> {
    // Line breaks and tabs may stand in free text; other control characters (NUL
    // above all, which no database stores in text) may not.
    if value
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    {
        return Err(DomainError::ControlCharacter { field });
    }
    let trimmed = value.trim();
    let len = trimmed.chars().count();
    if len < min || len > max {
        return Err(DomainError::InvalidText { field, min, max });
    }
    Ok(trimmed.to_owned())
}

macro_rules! text_value {
    ($(#[$doc:meta])* $name:ident, $field:literal, $min:literal, $max:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The most characters it keeps once trimmed.
            pub const MAX: usize = $max;

            pub fn parse(value: &str) -> Result<Self, DomainError> {
                text(value, $field, $min, $max).map($name)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

text_value!(
    /// A person's name: 1–200 characters after trimming.
    PersonName, "name", 1, 200
);
text_value!(
    /// The name of an account or a deal: 1–200 characters after trimming.
    Name, "name", 1, 200
);
text_value!(
    /// A company, web domain or industry as free text: 1–200 characters after trimming.
    Label, "text", 1, 200
);
text_value!(
    /// Who owns a lead or a deal: 1–100 characters after trimming.
    Owner, "owner", 1, 100
);
text_value!(
    /// Why a lead was disqualified or a deal lost: 1–500 characters after trimming.
    Reason, "reason", 1, 500
);
text_value!(
    /// The name of a lead routing rule, unique among the rules: 1–100 characters after
    /// trimming.
    RuleName, "rule name", 1, 100
);

text_value!(
    /// The stock-keeping unit an order line sells: 1–64 characters after trimming.
    Sku, "sku", 1, 64
);

/// How many units an order line sells: a whole number from 1 to 1,000,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Quantity(u32);

impl Quantity {
    pub const MIN: u32 = 1;
    pub const MAX: u32 = 1_000_000;

    pub fn parse(value: i64) -> Result<Self, DomainError> {
        u32::try_from(value)
            .ok()
            .filter(|n| (Quantity::MIN..=Quantity::MAX).contains(n))
            .map(Quantity)
            .ok_or(DomainError::OutOfRange {
                field: "quantity",
                min: i64::from(Quantity::MIN),
                max: i64::from(Quantity::MAX),
            })
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An email address, trimmed and lower-cased: one `@`, a dot in the domain part, at
/// most 254 characters as given.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    pub fn parse(value: &str) -> Result<Self, DomainError> {
        let email = value.trim().to_lowercase();
        let valid = value.chars().count() <= 254
            && !email.chars().any(|c| c.is_whitespace() || c.is_control())
            && match email.split_once('@') {
                Some((local, domain)) => {
                    !local.is_empty()
                        && !domain.contains('@')
                        && domain
                            .split_once('.')
                            .is_some_and(|(head, tail)| !head.is_empty() && !tail.is_empty())
                        && !domain.ends_with('.')
                }
                None => false,
            };
        if valid {
            Ok(Email(email))
        } else {
            Err(DomainError::InvalidEmail(value.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The unique key a lead holds for its email while it is not erased. It carries a
    /// hash, never the address, so no personal data sits in the claims table.
    pub fn claim_key(&self) -> String {
        format!(
            "lead-email:{}",
            hex::encode(Sha256::digest(self.0.as_bytes()))
        )
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An email domain a routing rule matches, lower-cased: `example.com` matches exactly
/// that domain, `*.example.com` any of its subdomains (`eu.example.com`,
/// `a.eu.example.com`) but not `example.com` itself. At most 253 characters in all; the
/// domain after the optional `*.` is `a-z`, `0-9`, `.` and `-` (upper-case ASCII letters
/// are taken lower-cased), with at least one dot and no empty label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DomainPattern(String);

impl DomainPattern {
    pub fn parse(value: &str) -> Result<Self, DomainError> {
        // ASCII only, and nothing around it: what the OpenAPI document's pattern says.
        let pattern = value.to_ascii_lowercase();
        let domain = pattern.strip_prefix("*.").unwrap_or(&pattern);
        let valid = (1..=253).contains(&pattern.len())
            && domain
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-'))
            && domain.contains('.')
            && domain.split('.').all(|label| !label.is_empty());
        if valid {
            Ok(DomainPattern(pattern))
        } else {
            Err(DomainError::InvalidDomainPattern(value.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the domain of an email (in any case) is one this pattern names.
    pub fn matches(&self, email_domain: &str) -> bool {
        let domain = email_domain.trim().to_lowercase();
        match self.0.strip_prefix("*.") {
            Some(parent) => domain
                .strip_suffix(parent)
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|subdomain| !subdomain.is_empty()),
            None => domain == self.0,
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An ISO 4217 currency code: three upper-case letters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Currency(String);

impl Currency {
    pub fn parse(value: &str) -> Result<Self, DomainError> {
        if value.len() == 3 && value.chars().all(|c| c.is_ascii_uppercase()) {
            Ok(Currency(value.to_owned()))
        } else {
            Err(DomainError::InvalidCurrency(value.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An amount of money: a currency and a whole, non-negative number of minor units
/// (cents). Never a float.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    pub currency: Currency,
    pub amount_minor: i64,
}

impl Money {
    /// The largest amount, in minor units (ten trillion in major units): sums of many
    /// such amounts still fit in 64 bits.
    pub const MAX_MINOR: i64 = 1_000_000_000_000_000;

    pub fn parse(currency: &str, amount_minor: i64) -> Result<Self, DomainError> {
        let currency = Currency::parse(currency)?;
        if amount_minor < 0 {
            return Err(DomainError::Negative { field: "amount" });
        }
        if amount_minor > Money::MAX_MINOR {
            return Err(DomainError::TooLarge {
                field: "amount",
                max: Money::MAX_MINOR,
            });
        }
        Ok(Money {
            currency,
            amount_minor,
        })
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.amount_minor, self.currency.as_str())
    }
}

macro_rules! word_enum {
    ($(#[$doc:meta])* $name:ident, $field:literal {
        $($(#[$variant_meta:meta])* $variant:ident = $text:literal),+ $(,)?
    }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$variant_meta])* $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn parse(value: &str) -> Result<Self, DomainError> {
                match value {
                    $($text => Ok($name::$variant),)+
                    _ => Err(DomainError::UnknownValue {
                        field: $field,
                        value: value.to_owned(),
                        allowed: concat!($($text, " "),+),
                    }),
                }
            }

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

word_enum!(
    /// Where a lead came from.
    Source, "source" {
        Web = "web",
        Event = "event",
        Referral = "referral",
        Outbound = "outbound",
        Partner = "partner",
    }
);

word_enum!(
    /// What a lead did, worth points towards its score.
    SignalKind, "kind" {
        PageView = "page_view",
        EmailOpen = "email_open",
        EmailClick = "email_click",
        ContentDownload = "content_download",
        WebinarAttended = "webinar_attended",
        PricingPageView = "pricing_page_view",
        DemoRequest = "demo_request",
    }
);

impl SignalKind {
    /// Lead scoring, as `domain.md` sets it.
    pub fn points(self) -> u32 {
        match self {
            SignalKind::PageView | SignalKind::EmailOpen => 1,
            SignalKind::EmailClick => 3,
            SignalKind::ContentDownload => 5,
            SignalKind::WebinarAttended => 8,
            SignalKind::PricingPageView => 10,
            SignalKind::DemoRequest => 25,
        }
    }
}

word_enum!(
    /// Why the routing process gave a lead its owner: the lead qualified without one, or
    /// its owner did not act on it within the response deadline.
    RoutingReason, "reason" {
        Qualified = "qualified",
        #[serde(rename = "response-deadline")]
        ResponseDeadline = "response-deadline",
    }
);

word_enum!(
    /// An account's tier; `standard` unless said otherwise.
    #[derive(Default)]
    Tier, "tier" {
        #[default]
        Standard = "standard",
        Key = "key",
    }
);

word_enum!(
    /// The open stages of a deal, in order (their order is the enum's order). Won and
    /// lost are not stages one advances to: they are `Win` and `Lose`.
    Stage, "stage" {
        Prospecting = "prospecting",
        Qualification = "qualification",
        Demo = "demo",
        Proposal = "proposal",
        Negotiation = "negotiation",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_with_control_characters_is_refused_but_line_breaks_are_kept() {
        assert_eq!(
            Name::parse("Acme\0"),
            Err(DomainError::ControlCharacter { field: "name" })
        );
        assert!(Reason::parse("no budget\nthis year").is_ok());
    }

    #[test]
    fn amounts_are_whole_non_negative_and_bounded() {
        assert!(Money::parse("EUR", Money::MAX_MINOR).is_ok());
        assert_eq!(
            Money::parse("EUR", Money::MAX_MINOR + 1),
            Err(DomainError::TooLarge {
                field: "amount",
                max: Money::MAX_MINOR
            })
        );
        assert_eq!(
            Money::parse("EUR", -1),
            Err(DomainError::Negative { field: "amount" })
        );
    }

    #[test]
    fn emails_are_lower_cased_and_checked() {
        assert_eq!(
            Email::parse(" Ada@Example.COM ").unwrap().as_str(),
            "ada@example.com"
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "ada@@example.com",
            "a@b@example.com",
            "ada@example.",
            "ada@.com",
            "ad a@example.com",
        ] {
            assert_eq!(
                Email::parse(bad),
                Err(DomainError::InvalidEmail(bad.into())),
                "{bad}"
            );
        }
        let long = format!("{}@example.com", "a".repeat(242));
        assert_eq!(long.len(), 254);
        assert!(Email::parse(&long).is_ok());
        assert!(Email::parse(&format!("a{long}")).is_err());
        // The length is the text's as given (what a JSON Schema's maxLength counts).
        assert!(Email::parse(&format!(" {long}")).is_err());
        assert!(Email::parse(&format!(" {}", &long[1..])).is_ok());
    }

    #[test]
    fn the_claim_key_hides_the_address_and_ignores_case() {
        let a = Email::parse("Ada@Example.com").unwrap().claim_key();
        assert_eq!(a, Email::parse("ada@example.com").unwrap().claim_key());
        assert!(a.starts_with("lead-email:") && !a.contains("ada"));
        assert_eq!(a.len(), "lead-email:".len() + 64);
    }

    #[test]
    fn text_values_are_trimmed_and_bounded() {
        assert_eq!(PersonName::parse("  Ada  ").unwrap().as_str(), "Ada");
        assert!(PersonName::parse("   ").is_err());
        assert!(PersonName::parse(&"é".repeat(200)).is_ok());
        assert!(PersonName::parse(&"é".repeat(201)).is_err());
        assert!(Owner::parse(&"o".repeat(100)).is_ok());
        assert!(Owner::parse(&"o".repeat(101)).is_err());
        assert!(Reason::parse(&"r".repeat(500)).is_ok());
        assert_eq!(
            Reason::parse(&"r".repeat(501)),
            Err(DomainError::InvalidText {
                field: "reason",
                min: 1,
                max: 500
            })
        );
    }

    #[test]
    fn domain_patterns_are_lower_cased_and_match_a_domain_or_its_subdomains() {
        let exact = DomainPattern::parse("Example.COM").unwrap();
        assert!(
            DomainPattern::parse(" example.com").is_err(),
            "nothing around it"
        );
        assert_eq!(exact.as_str(), "example.com");
        assert!(exact.matches("example.com") && exact.matches("EXAMPLE.com"));
        assert!(!exact.matches("eu.example.com") && !exact.matches("badexample.com"));
        let any_sub = DomainPattern::parse("*.example.com").unwrap();
        assert!(any_sub.matches("eu.example.com") && any_sub.matches("a.eu.Example.com"));
        for other in [
            "example.com",
            ".example.com",
            "badexample.com",
            "example.org",
        ] {
            assert!(!any_sub.matches(other), "{other}");
        }
        let longest = format!("{}.com", "a".repeat(249));
        assert!(DomainPattern::parse(&longest).is_ok());
        assert!(
            DomainPattern::parse(&format!("*.{longest}")).is_err(),
            "253 in all"
        );
        assert!(DomainPattern::parse(&format!("*.{}", &longest[2..])).is_ok());
        for bad in [
            "",
            "*.",
            "*",
            "com",
            "*.com",
            "example..com",
            ".example.com",
            "example.com.",
            "ex ample.com",
            "exa_mple.com",
            "**.example.com",
            "eu.*.example.com",
            "bücher.de",
            &format!("a{longest}"),
        ] {
            assert_eq!(
                DomainPattern::parse(bad),
                Err(DomainError::InvalidDomainPattern(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn routing_reasons_are_words_with_a_hyphen() {
        assert_eq!(
            serde_json::to_value(RoutingReason::ResponseDeadline).unwrap(),
            serde_json::json!("response-deadline")
        );
        assert_eq!(
            serde_json::to_value(RoutingReason::Qualified).unwrap(),
            serde_json::json!("qualified")
        );
        for reason in RoutingReason::ALL {
            assert_eq!(RoutingReason::parse(reason.as_str()), Ok(*reason));
        }
        assert!(RuleName::parse(&"r".repeat(100)).is_ok());
        assert_eq!(
            RuleName::parse(" "),
            Err(DomainError::InvalidText {
                field: "rule name",
                min: 1,
                max: 100
            })
        );
    }

    #[test]
    fn money_is_an_iso_code_and_non_negative_minor_units() {
        let m = Money::parse("EUR", 129_900).unwrap();
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            serde_json::json!({"currency": "EUR", "amount_minor": 129900})
        );
        assert!(Money::parse("EUR", 0).is_ok());
        assert_eq!(
            Money::parse("EUR", -1),
            Err(DomainError::Negative { field: "amount" })
        );
        for bad in ["eur", "EU", "EURO", "E1R", ""] {
            assert_eq!(
                Money::parse(bad, 1),
                Err(DomainError::InvalidCurrency(bad.into()))
            );
        }
    }

    #[test]
    fn words_parse_from_the_spec_and_signals_score_as_it_says() {
        let points: Vec<(&str, u32)> = SignalKind::ALL
            .iter()
            .map(|k| (k.as_str(), k.points()))
            .collect();
        assert_eq!(
            points,
            vec![
                ("page_view", 1),
                ("email_open", 1),
                ("email_click", 3),
                ("content_download", 5),
                ("webinar_attended", 8),
                ("pricing_page_view", 10),
                ("demo_request", 25),
            ]
        );
        assert_eq!(Source::parse("partner"), Ok(Source::Partner));
        assert!(matches!(
            Source::parse("tv"),
            Err(DomainError::UnknownValue {
                field: "source",
                ..
            })
        ));
        assert!(Stage::Prospecting < Stage::Negotiation);
        assert!(Stage::parse("won").is_err());
        assert_eq!(Tier::parse("key"), Ok(Tier::Key));
        assert_eq!(
            serde_json::to_value(Stage::Demo).unwrap(),
            serde_json::json!("demo")
        );
    }
}
