//! Personal data in the log, encrypted (crypto-shredding, `domain.md` Erasure): a layer
//! (`StoreLayer`) in front of another event store that seals the personal fields of the
//! events it appends under their subject's data key, and opens them in the events it
//! reads.
//!
//! - The subject of an event is its stream (`lead-{id}`); the personal fields are named
//!   per event type (`PersonalFields`, from the domain). Each is stored as `enc:v1:…`
//!   (`vault`), so the hash chains cover the ciphertext and still verify after erasure.
//! - A field whose subject's key is shredded, or never existed, reads as `null`, and the
//!   event's data then says `"erased": true`; so does a field an older build stored in
//!   clear, once its subject is shredded (the tombstone row).
//! - Claim keys (an email's) are stored as a keyed hash: the key's prefix, then the
//!   HMAC of the whole key under a secret kept as a data key of its own
//!   (`annals:claims`), so a rotation of the master key leaves every claim as it was.
//! - Snapshots of a category that holds personal data are neither saved nor read: a
//!   state would hold the fields in clear.
//!
//! Every reader (command handlers, consumers, the API) reads through this, so the key
//! table is read for each page of events: an erasure on one server is seen by every
//! other at its next read, and a rebuild after it finds the fields erased.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::keys::DataKeys;
use crate::model::{
    AppendOutcome, AppendRequest, Claim, Direction, ExpectedVersion, LogFilter, LogPage,
    RecordedEvent, Snapshot, StreamName,
};
use crate::vault::{DataKey, MasterKey, SEALED, Vault};
use crate::{EventStore, StoreError, StoreLayer};

/// The subject whose data key is the secret of the claims' keyed hashes.
const CLAIMS_SUBJECT: &str = "annals:claims";
/// What marks a stored claim key as a keyed hash (see `claim_key`).
const KEYED: &str = "k1:";
/// Events read per page by the reports on clear data.
const PAGE: usize = 1_000;

/// Which fields of which event types are personal, and the categories of their streams.
#[derive(Debug, Clone, Default)]
pub struct PersonalFields {
    fields: HashMap<String, Vec<String>>,
    categories: HashSet<String>,
}

impl PersonalFields {
    /// `(category, event type, fields)`: the fields of that event type, in streams of
    /// that category, that hold personal data.
    pub fn new(declared: &[(&str, &str, &[&str])]) -> Self {
        let mut personal = PersonalFields::default();
        for (category, event_type, fields) in declared {
            personal.categories.insert((*category).to_owned());
            personal.fields.insert(
                (*event_type).to_owned(),
                fields.iter().map(|f| (*f).to_owned()).collect(),
            );
        }
        personal
    }

    fn of(&self, event_type: &str) -> Option<&[String]> {
        self.fields.get(event_type).map(Vec::as_slice)
    }
}

/// The place a field's value is sealed for: its subject, event type and field.
fn place(subject: &str, event_type: &str, field: &str) -> String {
    let mut place = String::new();
    write_place(&mut place, subject, event_type, field);
    place
}

fn write_place(place: &mut String, subject: &str, event_type: &str, field: &str) {
    for part in [subject, "/", event_type, "/", field] {
        place.push_str(part);
    }
}

/// An event store whose personal fields are sealed at rest (see the module).
#[derive(Debug)]
pub struct EncryptedStore {
    inner: Arc<dyn EventStore>,
    keys: Arc<dyn DataKeys>,
    vault: Vault,
    personal: PersonalFields,
    claims: DataKey,
}

impl EncryptedStore {
    /// The store in front of `inner`, once the master key is found to be the one the
    /// database's keys were wrapped with (the first start records it).
    pub async fn open(
        inner: Arc<dyn EventStore>,
        keys: Arc<dyn DataKeys>,
        master: &MasterKey,
        personal: PersonalFields,
    ) -> Result<Self, StoreError> {
        let vault = Vault::new(master);
        if keys.master_key_check(vault.check_value()).await? != vault.check_value() {
            return Err(StoreError::MasterKey(
                "this is not the master key this database was started with".into(),
            ));
        }
        let candidate = vault.wrap(CLAIMS_SUBJECT, &DataKey::generate());
        let wrapped = keys
            .key_for(CLAIMS_SUBJECT, &candidate, vault.check_value())
            .await?
            .ok_or_else(|| StoreError::Corrupt("the claims' secret was shredded".into()))?;
        let claims = vault.unwrap(CLAIMS_SUBJECT, &wrapped)?;
        let store = EncryptedStore {
            inner,
            keys,
            vault,
            personal,
            claims,
        };
        // The claims an older build stored as the domain made them (an email's plain
        // hash) become keyed hashes before anything is appended, so its leads' emails
        // stay taken, and an erasure gives them back.
        let turned = store
            .keys
            .rekey_claims(&|key| (!Self::is_keyed_claim(key)).then(|| store.claim_key(key)))
            .await?;
        if turned > 0 {
            tracing::info!(
                claims = turned,
                "claims of an older build stored as keyed hashes"
            );
        }
        Ok(store)
    }

    /// How a claim key is stored: its prefix (before the first `:`), `k1:` (a keyed
    /// hash, where an older build stored the domain's key as it was), then the keyed hash
    /// of the whole key.
    pub fn claim_key(&self, key: &str) -> String {
        let prefix = key.split_once(':').map_or("claim", |(prefix, _)| prefix);
        let message = [b"claim\0".as_slice(), key.as_bytes()].concat();
        format!("{prefix}:{KEYED}{}", self.claims.keyed_hash(&message))
    }

    /// Whether a stored claim key is a keyed hash (`claim_key`), not an older build's.
    pub fn is_keyed_claim(stored: &str) -> bool {
        stored
            .split_once(':')
            .is_some_and(|(_, rest)| rest.starts_with(KEYED))
    }

    /// The events of `stream` (up to `limit` read) whose personal fields an older build
    /// stored in clear: an erasure cannot make those unreadable in the log, only in
    /// every answer.
    pub async fn events_in_clear(&self, stream: &StreamName) -> Result<u64, StoreError> {
        let mut clear = 0_usize;
        let mut from = 1;
        loop {
            let page = self
                .inner
                .read_stream(stream, from, Direction::Forwards, PAGE)
                .await?;
            clear += page.iter().filter(|e| self.in_clear(e)).count();
            if page.len() < PAGE {
                return Ok(u64::try_from(clear).unwrap_or(u64::MAX));
            }
            from += u64::try_from(page.len()).unwrap_or(u64::MAX);
        }
    }

    /// Every event of the log whose personal fields are stored in clear, as (position,
    /// stream), for an operator's report.
    pub async fn log_in_clear(&self) -> Result<Vec<(u64, String)>, StoreError> {
        let types: Vec<&str> = self.personal.fields.keys().map(String::as_str).collect();
        let filter = LogFilter::event_types(types);
        let mut clear = Vec::new();
        let mut from = 1;
        loop {
            let page = self.inner.read_all(from, PAGE, &filter).await?;
            clear.extend(
                page.events
                    .iter()
                    .filter(|e| self.in_clear(e))
                    .map(|e| (e.position, e.stream.clone())),
            );
            if page.next_position > page.head {
                return Ok(clear);
            }
            from = page.next_position;
        }
    }

    /// Whether a stored event has a personal field that is not sealed.
    fn in_clear(&self, event: &RecordedEvent) -> bool {
        let Some(fields) = self.personal.of(&event.event_type) else {
            return false;
        };
        fields.iter().any(|field| match event.data.get(field) {
            Some(Value::String(value)) => !value.starts_with(SEALED),
            Some(Value::Null) | None => false,
            Some(_) => true,
        })
    }

    /// A keyed hash of a request that may carry personal data (its idempotency digest),
    /// under the claims' secret, apart from the claims' own hashes.
    pub fn keyed_hash(&self, message: &[u8]) -> String {
        self.claims
            .keyed_hash(&[b"request\0".as_slice(), message].concat())
    }

    /// Seals the request's personal fields under its stream's key (made on first use),
    /// and turns its claim keys into keyed hashes.
    async fn seal(&self, request: &mut AppendRequest) -> Result<(), StoreError> {
        for claim in &mut request.claims {
            match claim {
                Claim::Take(key) | Claim::Release(key) => *key = self.claim_key(key),
            }
        }
        let subject = request.stream.as_str().to_owned();
        let creates = matches!(
            request.expected,
            ExpectedVersion::NoStream | ExpectedVersion::Exact(0)
        );
        let mut key = None;
        let mut new_key = None;
        for event in &mut request.events {
            let Some(fields) = self.personal.of(&event.event_type) else {
                continue;
            };
            let Value::Object(data) = &mut event.data else {
                continue;
            };
            for field in fields {
                let Some(value) = data.get_mut(field).filter(|v| !v.is_null()) else {
                    continue;
                };
                if key.is_none() {
                    key = Some(if creates {
                        // A stream being created has no event under any key: its new
                        // key is stored in the append's transaction (a concurrent
                        // creation loses its version check and stores nothing).
                        let new = DataKey::generate();
                        new_key = Some(self.vault.wrap(&subject, &new));
                        new
                    } else {
                        self.key_of(&subject).await?
                    });
                }
                let Some(key) = &key else {
                    continue;
                };
                let plain = serde_json::to_vec(value).unwrap_or_default();
                *value =
                    Value::String(key.seal(&place(&subject, &event.event_type, field), &plain));
            }
        }
        if let Some(wrapped) = new_key {
            request.new_key = Some((subject, wrapped, self.vault.check_value().to_vec()));
        }
        Ok(())
    }

    /// The subject's data key, made and stored when it has none.
    async fn key_of(&self, subject: &str) -> Result<DataKey, StoreError> {
        let candidate = self.vault.wrap(subject, &DataKey::generate());
        match self
            .keys
            .key_for(subject, &candidate, self.vault.check_value())
            .await?
        {
            Some(wrapped) => self.vault.unwrap(subject, &wrapped),
            None => Err(StoreError::Shredded {
                subject: subject.to_owned(),
            }),
        }
    }

    /// Opens the personal fields of events read from the log (see the module).
    async fn open_events(&self, events: &mut [RecordedEvent]) -> Result<(), StoreError> {
        let subjects: Vec<&str> = {
            let mut subjects = Vec::with_capacity(events.len());
            subjects.extend(
                events
                    .iter()
                    .filter(|e| self.personal.of(&e.event_type).is_some())
                    .map(|e| e.stream.as_str()),
            );
            subjects.sort_unstable();
            subjects.dedup();
            subjects
        };
        if subjects.is_empty() {
            return Ok(());
        }
        let keys = self.keys.keys_of(&subjects).await?;
        // The keys this page opened, each once when a value needs it; none is kept past
        // the page. One buffer for every value's place and one for its opening.
        let mut opened: HashMap<String, DataKey> = HashMap::new();
        let (mut place, mut scratch) = (String::new(), Vec::new());
        for event in events {
            let Some(fields) = self.personal.of(&event.event_type) else {
                continue;
            };
            let stored = keys.get(&event.stream);
            let wrapped = match stored {
                Some(Some(wrapped)) => Some(wrapped),
                _ => None,
            };
            let shredded = matches!(stored, Some(None));
            let Value::Object(data) = &mut event.data else {
                continue;
            };
            let mut erased = false;
            for field in fields {
                let Some(value) = data.get_mut(field) else {
                    continue;
                };
                let sealed = value.as_str().filter(|v| v.starts_with(SEALED));
                match (sealed, wrapped) {
                    (Some(sealed), Some(wrapped)) => {
                        if !opened.contains_key(&event.stream) {
                            let key = self.vault.unwrap(&event.stream, wrapped)?;
                            opened.insert(event.stream.clone(), key);
                        }
                        let key = &opened[&event.stream];
                        place.clear();
                        write_place(&mut place, &event.stream, &event.event_type, field);
                        let plain = key.open_in(&place, sealed, &mut scratch)?;
                        *value = serde_json::from_slice(plain).map_err(|_| {
                            StoreError::Corrupt(format!(
                                "a sealed {field} of {} is not JSON",
                                event.stream
                            ))
                        })?;
                    }
                    // Sealed under a key that is gone: erased.
                    (Some(_), None) => {
                        *value = Value::Null;
                        erased = true;
                    }
                    // Stored in clear by an older build: erased once its subject is.
                    (None, _) if shredded && !value.is_null() => {
                        *value = Value::Null;
                        erased = true;
                    }
                    (None, _) => {}
                }
            }
            if erased || shredded {
                data.insert("erased".to_owned(), Value::Bool(true));
            }
        }
        Ok(())
    }

    fn holds_personal_data(&self, stream: &str) -> bool {
        let category = stream
            .split_once('-')
            .map_or(stream, |(category, _)| category);
        self.personal.categories.contains(category)
    }
}

// Seals what it appends and opens what it reads; keeps snapshots of personal data out
// of the snapshot table. Everything else goes to the inner store as it is.
#[async_trait]
impl StoreLayer for EncryptedStore {
    fn inner(&self) -> &dyn EventStore {
        self.inner.as_ref()
    }

    async fn append(&self, mut request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        self.seal(&mut request).await?;
        self.inner.append(request).await
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        from_version: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut events = self
            .inner
            .read_stream(stream, from_version, direction, limit)
            .await?;
        self.open_events(&mut events).await?;
        Ok(events)
    }

    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
        filter: &LogFilter,
    ) -> Result<LogPage, StoreError> {
        let mut page = self.inner.read_all(from_position, limit, filter).await?;
        self.open_events(&mut page.events).await?;
        Ok(page)
    }

    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        if self.holds_personal_data(&snapshot.stream) {
            return Ok(());
        }
        self.inner.save_snapshot(snapshot).await
    }

    async fn load_snapshot(&self, stream: &StreamName) -> Result<Option<Snapshot>, StoreError> {
        if self.holds_personal_data(stream.as_str()) {
            return Ok(None);
        }
        self.inner.load_snapshot(stream).await
    }
}
