//! The rules of a request that the OpenAPI document states and the server enforces,
//! each written once so the two cannot drift: integers read within the bounds the
//! document gives them (`Bounded`), the patterns of the domain's free text and emails,
//! the forms of the command headers (`If-Match`, `Idempotency-Key`) and of the cursors.
//!
//! Invariant (checked by schemathesis with every check on, `tests/fuzz/run.sh`): a
//! request the document allows gets past every check of the server's (what may still
//! refuse it is the state: 404, 409, 412); a request the document forbids is refused
//! (4xx). A rule the document cannot state is not enforced: it is rewritten into one it
//! can (a name blank after trimming is a name without a non-blank character: a pattern).

use std::fmt;

use serde::de::{Deserialize, Deserializer, Error as _};
use utoipa::PartialSchema;
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa::openapi::{RefOr, Schema};

/// An integer the server reads only within `MIN..=MAX`, and documents so (`minimum`,
/// `maximum`, `int64`). Out of bounds, it does not deserialize: a query parameter is
/// then a 422 `invalid-parameter`, a body field a 422 `invalid-request`.
///
/// Use it for every integer a request carries, through an alias naming the bounds
/// (`Limit`, `Position`, `Count`), and `#[param(inline)]` / `#[schema(inline)]` on the
/// field so the bounds are written into the document where the parameter is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bounded<const MIN: i64, const MAX: i64>(i64);

impl<const MIN: i64, const MAX: i64> Bounded<MIN, MAX> {
    /// The value, within `MIN..=MAX`.
    pub fn get(self) -> i64 {
        self.0
    }

    /// The value as an unsigned number (`MIN` is at least 0 for every alias that asks).
    pub fn unsigned(self) -> u64 {
        u64::try_from(self.0).unwrap_or(0)
    }

    /// `value` when it is within the bounds.
    pub fn new(value: i64) -> Option<Self> {
        (MIN..=MAX).contains(&value).then_some(Bounded(value))
    }
}

impl<'de, const MIN: i64, const MAX: i64> Deserialize<'de> for Bounded<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = integer(deserializer)?;
        Bounded::new(value)
            .ok_or_else(|| D::Error::custom(format!("{value} is not within {MIN} to {MAX}")))
    }
}

/// An integer as JSON Schema counts one: a number without a fractional part, however
/// it is written (`50`, `50.0`, `5e1`, `-0.0`), within `i64`. For `deserialize_with` on
/// a body's `i64` field; `Bounded` reads its value so too.
pub fn integer<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    struct Integer;

    impl serde::de::Visitor<'_> for Integer {
        type Value = i64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an integer")
        }

        fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<i64, E> {
            Ok(value)
        }

        fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<i64, E> {
            i64::try_from(value)
                .map_err(|_| E::custom(format!("{value} is past the largest int64")))
        }

        fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<i64, E> {
            // -2^63 ≤ value < 2^63, both exact in f64.
            const BOUND: f64 = 9_223_372_036_854_775_808.0;
            if value.fract() != 0.0 || !value.is_finite() {
                return Err(E::custom(format!("{value} is not an integer")));
            }
            if !(-BOUND..BOUND).contains(&value) {
                return Err(E::custom(format!("{value} is past the range of int64")));
            }
            #[allow(clippy::cast_possible_truncation)]
            Ok(value as i64)
        }
    }

    deserializer.deserialize_i64(Integer)
}

/// `integer` for an optional field (`null` or absent: `None`; with `#[serde(default)]`).
pub fn optional_integer<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<i64>, D::Error> {
    struct Integer(i64);

    impl<'de> Deserialize<'de> for Integer {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            integer(deserializer).map(Integer)
        }
    }

    Ok(Option::<Integer>::deserialize(deserializer)?.map(|Integer(value)| value))
}

impl<const MIN: i64, const MAX: i64> fmt::Display for Bounded<MIN, MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<const MIN: i64, const MAX: i64> PartialSchema for Bounded<MIN, MAX> {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(MIN))
            .maximum(Some(MAX))
            .into()
    }
}

impl<const MIN: i64, const MAX: i64> utoipa::ToSchema for Bounded<MIN, MAX> {}

/// A page size: 1–500 on every list endpoint.
pub type Limit = Bounded<1, 500>;
/// A log position or an aggregate version a client names: 0 up to the largest `int64`.
pub type Position = Bounded<0, { i64::MAX }>;
/// A first version or position to read: 1 up to the largest `int64`.
pub type FromNumber = Bounded<1, { i64::MAX }>;
/// A count or score that cannot be negative.
pub type Count = Bounded<0, { i64::MAX }>;

/// A character the domain's free text may hold: anything but a control character
/// other than tab, line feed and carriage return (`values::text`).
macro_rules! text_char {
    () => {
        r"[^\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F]"
    };
}

/// A character that is neither white space (Rust's `char::is_whitespace`, written out
/// so every regex dialect reads it alike) nor a control character; the class is left
/// open for more exclusions.
macro_rules! solid_char {
    () => {
        r"[^\x00-\x20\x7F-\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000"
    };
}

/// White space that `trim` removes (as `char::is_whitespace`), control characters
/// among it included.
macro_rules! blank_char {
    () => {
        r"[\t\n\x0B\x0C\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
    };
}

/// Free text as the domain takes it (names, labels, owners, reasons: `values::text`):
/// no control character but tab and line breaks, and 1 to `max` characters once the
/// white space around it is trimmed. As a pattern: blanks, then the trimmed text (a
/// solid character, or two with up to `max - 2` of any between), then blanks.
pub fn text_pattern(max: usize) -> String {
    let blank = r"[\t\n\r \xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]";
    let solid = concat!(solid_char!(), "]");
    let any = text_char!();
    format!(
        "^{blank}*{solid}({any}{{0,{between}}}{solid})?{blank}*$",
        between = max.saturating_sub(2)
    )
}

/// A nested object of a body as JSON writes it: serde's derive would also take a struct
/// from an array of its fields in order, which the document does not allow.
pub fn object<'de, D: Deserializer<'de>, T: serde::de::DeserializeOwned>(
    deserializer: D,
) -> Result<T, D::Error> {
    let map = serde_json::Map::deserialize(deserializer)?;
    serde_json::from_value(serde_json::Value::Object(map)).map_err(D::Error::custom)
}

/// `object` for each item of an array.
pub fn objects<'de, D: Deserializer<'de>, T: serde::de::DeserializeOwned>(
    deserializer: D,
) -> Result<Vec<T>, D::Error> {
    Vec::<serde_json::Map<String, serde_json::Value>>::deserialize(deserializer)?
        .into_iter()
        .map(|map| serde_json::from_value(serde_json::Value::Object(map)).map_err(D::Error::custom))
        .collect()
}

/// An email as the domain takes it (`values::Email`): white space around it is trimmed;
/// one `@` with something before it; after it a name with a dot that neither starts
/// nor ends it; no white space or control character inside. At most 254 characters
/// as sent (`maxLength`).
pub const EMAIL_PATTERN: &str = concat!(
    "^",
    blank_char!(),
    "*",
    solid_char!(),
    "@]+@",
    solid_char!(),
    "@.]+\\.",
    solid_char!(),
    "@]*",
    solid_char!(),
    "@.]",
    blank_char!(),
    "*$"
);

/// Text in a query parameter: anything but NUL, which no database stores in text.
pub const QUERY_TEXT_PATTERN: &str = r"^[^\x00]*$";

/// `If-Match`: a version in double quotes (RFC 9110's strong entity tag), at most 18
/// digits; or nothing (no condition). Spaces and tabs around a header's value are not
/// part of it (RFC 9110 §5.5: the server never sees them), so the pattern allows them.
pub const IF_MATCH_PATTERN: &str = r#"^[ \t]*("[0-9]{1,18}"[ \t]*)?$"#;

/// `Idempotency-Key`: 1–200 visible ASCII characters (spaces only inside); or nothing
/// (no key). Spaces and tabs around it are allowed, as for `If-Match`.
pub const IDEMPOTENCY_KEY_PATTERN: &str = r"^[ \t]*([!-~]([ -~]{0,198}[!-~])?[ \t]*)?$";

/// The version an `If-Match` value names, when it has the documented form. (An empty
/// value is no condition at all: an empty list, RFC 9110 §5.6.1; `CommandMeta` reads it
/// as absent, as it does an empty `Idempotency-Key`.)
pub fn if_match(value: &str) -> Option<u64> {
    let digits = value.strip_prefix('"')?.strip_suffix('"')?;
    if digits.is_empty() || digits.len() > 18 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Whether an `Idempotency-Key` value has the documented form.
pub fn idempotency_key(value: &str) -> bool {
    let bytes = value.as_bytes();
    (1..=200).contains(&bytes.len())
        && bytes.iter().all(|b| (b' '..=b'~').contains(b))
        && bytes.first() != Some(&b' ')
        && bytes.last() != Some(&b' ')
}

/// A numeric cursor (of the log and of a stream): 1–19 decimal digits.
pub const NUMBER_CURSOR_PATTERN: &str = r"^[0-9]{1,19}$";

/// The number a numeric cursor names, when it has the documented form.
pub fn number_cursor(value: &str) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_integers_read_only_within_their_bounds() {
        let read = |text: &str| serde_json::from_str::<Limit>(text).map(Limit::get);
        assert_eq!(read("1").unwrap(), 1);
        assert_eq!(read("500").unwrap(), 500);
        for out in [
            "0",
            "501",
            "-1",
            "9223372036854775808",
            "1.5",
            "\"5\"",
            "1e30",
        ] {
            assert!(read(out).is_err(), "{out}");
        }
        // JSON Schema's integers: a number without a fractional part, however written.
        assert_eq!(read("50.0").unwrap(), 50);
        assert_eq!(read("5e1").unwrap(), 50);
        let count = |text: &str| serde_json::from_str::<Count>(text).map(Count::get);
        assert_eq!(count("-0.0").unwrap(), 0);
        let position = |text: &str| serde_json::from_str::<Position>(text).map(Position::get);
        assert_eq!(position("9223372036854775807").unwrap(), i64::MAX);
        assert!(position("9223372036854775808").is_err());
        assert!(position("-1").is_err());
    }

    /// The patterns written as literals in `dto.rs` attributes are these constants.
    #[test]
    fn the_document_states_the_forms_the_server_reads() {
        let document = serde_json::to_value(crate::server::openapi()).unwrap();
        let pattern = |path: &str, method: &str, name: &str| {
            document["paths"][path][method]["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .unwrap_or_else(|| panic!("{method} {path} has no {name}"))["schema"]["pattern"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path}: {name} has no pattern"))
                .to_owned()
        };
        assert_eq!(pattern("/leads", "post", "If-Match"), IF_MATCH_PATTERN);
        assert_eq!(
            pattern("/deals/{id}/win", "post", "Idempotency-Key"),
            IDEMPOTENCY_KEY_PATTERN
        );
        assert_eq!(
            pattern("/leads", "get", "cursor"),
            annals_consumers::queries::LEAD_CURSOR_PATTERN
        );
        assert_eq!(
            pattern("/deals", "get", "cursor"),
            annals_consumers::queries::DEAL_CURSOR_PATTERN
        );
        assert_eq!(pattern("/events", "get", "cursor"), NUMBER_CURSOR_PATTERN);
        assert_eq!(
            pattern("/streams/{stream}/events", "get", "cursor"),
            NUMBER_CURSOR_PATTERN
        );
        for (path, name) in [
            ("/leads", "owner"),
            ("/deals", "owner"),
            ("/events", "type"),
        ] {
            assert_eq!(pattern(path, "get", name), QUERY_TEXT_PATTERN);
        }
        let body = &document["components"]["schemas"]["CaptureLead"]["properties"];
        assert_eq!(body["email"]["pattern"], EMAIL_PATTERN);
        assert_eq!(body["name"]["pattern"], text_pattern(200).as_str());
        let limit = &document["paths"]["/leads"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "limit")
            .unwrap()["schema"];
        assert_eq!(
            (&limit["minimum"], &limit["maximum"]),
            (&1.into(), &500.into())
        );
    }

    #[test]
    fn the_header_forms_are_read_exactly_as_documented() {
        assert_eq!(if_match("\"3\""), Some(3));
        assert_eq!(if_match("\"000000000000000007\""), Some(7));
        for bad in [
            "3",
            "W/\"3\"",
            "\"3",
            "\"\"",
            "\"-3\"",
            "\"+3\"",
            "\"1234567890123456789\"",
            "*",
        ] {
            assert_eq!(if_match(bad), None, "{bad}");
        }
        assert!(idempotency_key("a"));
        assert!(idempotency_key("a b"));
        assert!(idempotency_key(&"k".repeat(200)));
        for bad in ["", " a", "a ", "a\tb", "é", &"k".repeat(201)] {
            assert!(!idempotency_key(bad), "{bad:?}");
        }
        assert_eq!(number_cursor("0012"), Some(12));
        assert_eq!(
            number_cursor("9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        for bad in ["", "+1", "-1", "1 ", "12345678901234567890"] {
            assert_eq!(number_cursor(bad), None, "{bad}");
        }
    }
}
