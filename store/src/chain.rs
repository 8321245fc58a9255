//! The tamper-evident hash chains of the log, and the canonical JSON they are computed over.
//!
//! Two chains, both over exactly what is stored, so they can be re-checked from the rows
//! alone by any backend:
//!
//! - **Each stream**: `hash(n) = SHA-256(hash(n-1) ‖ fields of event n)`, with 32 zero
//!   bytes before the stream's first event. The fields are length-prefixed: stream,
//!   version, event id, type, schema version, data, metadata, recorded-at in
//!   microseconds. Data and metadata are hashed as the JSON *text* the store wrote (object
//!   keys sorted, no whitespace, numbers as serde_json writes them), never as a database
//!   re-renders them: PostgreSQL's `jsonb` turns `1e16` into `10000000000000000` and
//!   `-0.0` into `0`, so that backend keeps the text beside the `jsonb` (see the
//!   migration `20261127000100_log_chain.sql`).
//! - **The whole log**: `log(p) = SHA-256(log(p') ‖ p ‖ category ‖ hash(p))`, where `p'`
//!   is the position before `p` in the log (32 zero bytes before position 1). It binds
//!   every event to its position and category and to everything before it in the log, so
//!   the stored `log_hash` of the last event stands for the whole log. The writer keeps
//!   the last position and its log hash in the `log_head` row, in the same transaction
//!   as the events, and takes the next position from there, never from `MAX(position)`:
//!   a position once given is never given again, even when its row was deleted.
//!
//! What an audit of these chains can and cannot prove is stated in `audit`.

use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub(crate) type Hash = [u8; 32];

pub(crate) const GENESIS: Hash = [0; 32];

/// The fields of an event that the chain covers.
pub(crate) struct Link<'a> {
    pub stream: &'a str,
    pub version: u64,
    pub event_id: Uuid,
    pub event_type: &'a str,
    pub schema_version: u32,
    /// Canonical JSON (see `canonical_json`).
    pub data: &'a str,
    /// Canonical JSON (see `canonical_json`).
    pub metadata: &'a str,
    pub recorded_at_micros: i64,
}

pub(crate) fn link_hash(previous: &Hash, link: &Link<'_>) -> Hash {
    fn field(hasher: &mut Sha256, bytes: &[u8]) {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    }
    let mut hasher = Sha256::new();
    hasher.update(previous);
    field(&mut hasher, link.stream.as_bytes());
    hasher.update(link.version.to_be_bytes());
    hasher.update(link.event_id.as_bytes());
    field(&mut hasher, link.event_type.as_bytes());
    hasher.update(link.schema_version.to_be_bytes());
    field(&mut hasher, link.data.as_bytes());
    field(&mut hasher, link.metadata.as_bytes());
    hasher.update(link.recorded_at_micros.to_be_bytes());
    hasher.finalize().into()
}

/// The link of the log chain at `position` (see the module docs): it covers the event's
/// position and category, and through its stream hash every other field.
pub(crate) fn log_link_hash(
    previous: &Hash,
    position: u64,
    category: &str,
    stream_hash: &[u8],
) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update(previous);
    hasher.update(position.to_be_bytes());
    hasher.update((category.len() as u64).to_be_bytes());
    hasher.update(category.as_bytes());
    hasher.update((stream_hash.len() as u64).to_be_bytes());
    hasher.update(stream_hash);
    hasher.finalize().into()
}

/// JSON text with object keys in byte order and no whitespace. Numbers and strings are
/// written by serde_json, so the text parses back to the same value; this does not rely
/// on serde_json's map type, which a feature elsewhere in the build may change.
pub(crate) fn canonical_json(value: &Value) -> String {
    let mut out = String::with_capacity(128);
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_scalar(&Value::String(key.clone()), out);
                out.push(':');
                write_canonical(value, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(value: &Value, out: &mut String) {
    // Serialising a scalar `Value` cannot fail; the fallback keeps this total anyway.
    out.push_str(&serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned()));
}

/// Whether any string or key in the value holds a NUL character, which PostgreSQL's
/// `jsonb` cannot store; refusing it on every backend keeps them alike.
pub(crate) fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn canonical_json_sorts_keys_at_every_depth_and_parses_back() {
        let value = json!({"b": 1, "a": {"z": [true, null, 1.5], "y": "é\"\n"}});
        let text = canonical_json(&value);
        assert_eq!(text, r#"{"a":{"y":"é\"\n","z":[true,null,1.5]},"b":1}"#);
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, value);
        assert_eq!(canonical_json(&back), text);
    }

    #[test]
    fn every_field_changes_the_hash() {
        let id = Uuid::nil();
        let base = Link {
            stream: "lead-1",
            version: 1,
            event_id: id,
            event_type: "LeadCaptured",
            schema_version: 1,
            data: "{}",
            metadata: "{}",
            recorded_at_micros: 7,
        };
        let h = link_hash(&GENESIS, &base);
        let variants = [
            Link {
                stream: "lead-2",
                ..base
            },
            Link { version: 2, ..base },
            Link {
                event_id: Uuid::max(),
                ..base
            },
            Link {
                event_type: "LeadAssigned",
                ..base
            },
            Link {
                schema_version: 2,
                ..base
            },
            Link {
                data: r#"{"a":1}"#,
                ..base
            },
            Link {
                metadata: r#"{"a":1}"#,
                ..base
            },
            Link {
                recorded_at_micros: 8,
                ..base
            },
        ];
        for variant in &variants {
            assert_ne!(link_hash(&GENESIS, variant), h);
        }
        assert_ne!(link_hash(&[1; 32], &base), h);
        // Length prefixes keep field boundaries: moving a character between fields matters.
        let shifted = Link {
            stream: "lead-1L",
            event_type: "eadCaptured",
            ..base
        };
        assert_ne!(link_hash(&GENESIS, &shifted), h);
    }

    #[test]
    fn every_input_changes_the_log_link() {
        let h = log_link_hash(&GENESIS, 3, "lead", &[7; 32]);
        assert_ne!(log_link_hash(&[1; 32], 3, "lead", &[7; 32]), h);
        assert_ne!(log_link_hash(&GENESIS, 4, "lead", &[7; 32]), h);
        assert_ne!(log_link_hash(&GENESIS, 3, "deal", &[7; 32]), h);
        assert_ne!(log_link_hash(&GENESIS, 3, "lead", &[8; 32]), h);
    }
}
