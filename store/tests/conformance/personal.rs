//! Crypto-shredding (`domain.md`, Erasure), on both backends: a subject's data key is
//! stored once and destroyed in the transaction of the append that shreds it; personal
//! fields are sealed at rest and opened as read, and read as erased once their key is
//! gone, as do fields an older build stored in clear; claims are keyed hashes; the hash
//! chains verify after an erasure; a wrong master key is refused.

use std::sync::Arc;

use annals_store::vault::MasterKey;
use annals_store::{
    AppendRequest, Claim, Direction, EncryptedStore, EventStore, ExpectedVersion, LogFilter,
    NewEvent, PersonalFields, Snapshot, StoreError,
};
use serde_json::{Value, json};

use crate::database::{Fixture, append, stream};

on_both_backends!(
    a_data_key_is_stored_once_and_shredded_only_with_its_append,
    a_new_stream_s_key_is_stored_by_its_append_and_refused_with_it,
    personal_fields_are_sealed_at_rest_and_read_as_erased_once_shredded,
    fields_stored_in_clear_read_as_erased_once_their_subject_is_shredded,
    a_master_key_that_is_not_the_database_s_is_refused,
);

fn personal() -> PersonalFields {
    PersonalFields::new(&[("lead", "LeadCaptured", &["email", "name"])])
}

async fn encrypted(db: &Fixture, master: &MasterKey) -> EncryptedStore {
    EncryptedStore::open(db.store(), db.keys(), master, personal())
        .await
        .unwrap()
}

fn capture(email: &str) -> NewEvent {
    NewEvent::new(
        "LeadCaptured",
        json!({"email": email, "name": "Ada Lovelace", "source": "web"}),
    )
}

async fn a_data_key_is_stored_once_and_shredded_only_with_its_append(db: Arc<Fixture>) {
    let keys = db.keys();
    let check = b"the master key's check";
    assert_eq!(keys.master_key_check(check).await.unwrap(), check);
    // Two writers making the subject's key at once both get the one stored.
    let (a, b) = tokio::join!(
        keys.key_for("lead-1", b"first candidate", check),
        keys.key_for("lead-1", b"second candidate", check)
    );
    let (a, b) = (a.unwrap().unwrap(), b.unwrap().unwrap());
    assert_eq!(a, b);
    assert_eq!(
        keys.key_for("lead-1", b"third", check).await.unwrap(),
        Some(a.clone())
    );
    // A writer whose master key is no longer the database's (rotated meanwhile) stores
    // nothing: its key could not be opened.
    assert!(matches!(
        keys.key_for("lead-2", b"stale", b"another check").await,
        Err(StoreError::MasterKey(_))
    ));
    assert!(
        !keys
            .keys_of(&["lead-2"])
            .await
            .unwrap()
            .contains_key("lead-2")
    );
    let store = db.store();
    store
        .append(append(
            "lead-1",
            ExpectedVersion::NoStream,
            vec![NewEvent::new("A", json!({}))],
        ))
        .await
        .unwrap();
    // An append that is refused shreds nothing.
    let refused = append(
        "lead-1",
        ExpectedVersion::Exact(7),
        vec![NewEvent::new("LeadErased", json!({}))],
    )
    .with_shredded(vec!["lead-1".into()]);
    assert!(matches!(
        store.append(refused).await,
        Err(StoreError::WrongExpectedVersion { .. })
    ));
    let held = keys.keys_of(&["lead-1", "lead-9"]).await.unwrap();
    assert_eq!(held.get("lead-1"), Some(&Some(a.clone())));
    assert!(!held.contains_key("lead-9"), "no row, no key");
    // A subject is a stream's name: one with a space is refused, never misread.
    assert!(matches!(
        keys.keys_of(&["lead-1", "lead 1"]).await,
        Err(StoreError::InvalidInput(_))
    ));

    let erased = append(
        "lead-1",
        ExpectedVersion::Exact(1),
        vec![NewEvent::new("LeadErased", json!({}))],
    )
    .with_shredded(vec!["lead-1".into(), "lead-legacy".into()]);
    store.append(erased).await.unwrap();
    let held = keys.keys_of(&["lead-1", "lead-legacy"]).await.unwrap();
    assert_eq!(held.get("lead-1"), Some(&None), "shredded");
    assert_eq!(
        held.get("lead-legacy"),
        Some(&None),
        "a tombstone without a key"
    );
    assert_eq!(keys.key_for("lead-1", b"again", check).await.unwrap(), None);
    let rows = db
        .text_rows("SELECT subject FROM data_keys WHERE wrapped IS NOT NULL")
        .await;
    assert!(rows.is_empty(), "{rows:?}");
    assert!(store.verify().await.unwrap().ok());
}

/// An append that creates its stream with `new_key`.
fn creating(subject: &str, wrapped: &[u8], check: &[u8]) -> AppendRequest {
    let mut request = append(
        subject,
        ExpectedVersion::NoStream,
        vec![NewEvent::new("A", json!({}))],
    );
    request.new_key = Some((subject.to_owned(), wrapped.to_vec(), check.to_vec()));
    request
}

async fn a_new_stream_s_key_is_stored_by_its_append_and_refused_with_it(db: Arc<Fixture>) {
    let keys = db.keys();
    let check = b"the master key's check";
    keys.master_key_check(check).await.unwrap();
    let store = db.store();
    // Several in a row, then several at once (one batch): each append stores its key.
    for n in 1..=3 {
        let subject = format!("lead-{n}");
        store
            .append(creating(&subject, subject.as_bytes(), check))
            .await
            .unwrap();
    }
    let together: Vec<_> = (4..=9)
        .map(|n| {
            let subject = format!("lead-{n}");
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .append(creating(&subject, subject.as_bytes(), check))
                    .await
            })
        })
        .collect();
    for task in together {
        task.await.unwrap().unwrap();
    }
    let subjects: Vec<String> = (1..=9).map(|n| format!("lead-{n}")).collect();
    let subjects: Vec<&str> = subjects.iter().map(String::as_str).collect();
    let held = keys.keys_of(&subjects).await.unwrap();
    for subject in &subjects {
        assert_eq!(held.get(*subject), Some(&Some(subject.as_bytes().to_vec())));
    }

    // A key a refused capture left behind (no event of its subject) is replaced.
    keys.key_for("lead-10", b"left behind", check)
        .await
        .unwrap();
    store
        .append(creating("lead-10", b"the capture's", check))
        .await
        .unwrap();
    let held = keys.keys_of(&["lead-10"]).await.unwrap();
    assert_eq!(held.get("lead-10"), Some(&Some(b"the capture's".to_vec())));

    // Refused with its append, which stores nothing: under a master key that is no
    // longer the database's, or over a tombstone.
    let head = store.head().await.unwrap();
    let stale = store
        .append(creating("lead-11", b"stale", b"another check"))
        .await;
    assert!(matches!(stale, Err(StoreError::MasterKey(_))), "{stale:?}");
    store
        .append(
            append(
                "lead-erased",
                ExpectedVersion::Any,
                vec![NewEvent::new("B", json!({}))],
            )
            .with_shredded(vec!["lead-gone".into()]),
        )
        .await
        .unwrap();
    let head = head + 1;
    let tombstone = store.append(creating("lead-gone", b"again", check)).await;
    assert!(
        matches!(tombstone, Err(StoreError::MasterKey(_))),
        "{tombstone:?}"
    );
    assert_eq!(store.head().await.unwrap(), head);
    for subject in ["lead-11", "lead-gone"] {
        let read = store
            .read_stream(&stream(subject), 1, Direction::Forwards, 10)
            .await
            .unwrap();
        assert!(read.is_empty(), "{subject}: {read:?}");
    }
    let held = keys.keys_of(&["lead-11", "lead-gone"]).await.unwrap();
    assert!(!held.contains_key("lead-11"), "{held:?}");
    assert_eq!(held.get("lead-gone"), Some(&None));
    assert!(store.verify().await.unwrap().ok());
}

async fn personal_fields_are_sealed_at_rest_and_read_as_erased_once_shredded(db: Arc<Fixture>) {
    let master = MasterKey::generate();
    let store = encrypted(&db, &master).await;
    let claim = "lead-email:0123abcd".to_owned();
    store
        .append(
            append(
                "lead-1",
                ExpectedVersion::NoStream,
                vec![capture("ada@example.com")],
            )
            .with_claims(vec![Claim::Take(claim.clone())]),
        )
        .await
        .unwrap();

    // At rest: sealed, the claim a keyed hash.
    let raw = db
        .store()
        .read_stream(&stream("lead-1"), 1, Direction::Forwards, 10)
        .await
        .unwrap();
    let data = &raw[0].data;
    for field in ["email", "name"] {
        let stored = data[field].as_str().unwrap();
        assert!(stored.starts_with("enc:v1:"), "{field}: {stored}");
    }
    assert_eq!(data["source"], "web", "other fields stay as they are");
    assert!(!data.to_string().contains("ada") && !data.to_string().contains("Ada"));
    let claims = db.text_rows("SELECT key FROM claims").await;
    let stored_claim = claims[0][0].clone().unwrap();
    assert!(stored_claim.starts_with("lead-email:k1:"), "{stored_claim}");
    assert!(!stored_claim.contains("0123abcd"));
    assert!(EncryptedStore::is_keyed_claim(&stored_claim));
    // The same claim through the store is held by the first lead.
    let second = append("lead-2", ExpectedVersion::NoStream, vec![capture("x@y.zz")])
        .with_claims(vec![Claim::Take(claim.clone())]);
    assert!(matches!(
        store.append(second).await,
        Err(StoreError::ClaimHeld { holder, .. }) if holder == "lead-1"
    ));
    // A capture's key is stored in its append's transaction: a refused capture stores
    // none.
    let keys = db.keys().keys_of(&["lead-1", "lead-2"]).await.unwrap();
    assert!(matches!(keys.get("lead-1"), Some(Some(_))));
    assert!(!keys.contains_key("lead-2"), "{keys:?}");

    // As read: opened, by both reads.
    let opened = store
        .read_stream(&stream("lead-1"), 1, Direction::Forwards, 10)
        .await
        .unwrap();
    assert_eq!(opened[0].data["email"], "ada@example.com");
    assert_eq!(opened[0].data["name"], "Ada Lovelace");
    assert!(opened[0].data.get("erased").is_none());
    let page = store
        .read_all(1, 10, &LogFilter::event_types(["LeadCaptured"]))
        .await
        .unwrap();
    assert_eq!(page.events[0].data, opened[0].data);
    // A second store on the same database (another server) opens it too.
    let other = encrypted(&db, &master).await;
    let again = other
        .read_stream(&stream("lead-1"), 1, Direction::Forwards, 10)
        .await
        .unwrap();
    assert_eq!(again[0].data["email"], "ada@example.com");

    // No snapshot of a lead is kept.
    let snapshot = Snapshot {
        stream: "lead-1".into(),
        version: 1,
        schema_version: 1,
        state: json!({"email": "ada@example.com"}),
    };
    store.save_snapshot(&snapshot).await.unwrap();
    assert_eq!(
        db.store().load_snapshot(&stream("lead-1")).await.unwrap(),
        None
    );

    // Shredded with its erasure, the claim given back: erased for every reader, the
    // other server included, and the chains still verify.
    let erased = append(
        "lead-1",
        ExpectedVersion::Exact(1),
        vec![NewEvent::new("LeadErased", json!({}))],
    )
    .with_claims(vec![Claim::Release(claim.clone())])
    .with_shredded(vec!["lead-1".into()]);
    store.append(erased).await.unwrap();
    for reader in [&store, &other] {
        let read = reader
            .read_stream(&stream("lead-1"), 1, Direction::Forwards, 10)
            .await
            .unwrap();
        assert_eq!(read[0].data["email"], Value::Null);
        assert_eq!(read[0].data["name"], Value::Null);
        assert_eq!(read[0].data["erased"], true);
        assert_eq!(read[0].data["source"], "web");
    }
    assert!(db.store().verify().await.unwrap().ok());
    assert!(db.text_rows("SELECT key FROM claims").await.is_empty());
    // The subject takes no personal data after.
    let after = append(
        "lead-1",
        ExpectedVersion::Exact(2),
        vec![capture("ada@example.com")],
    );
    assert!(matches!(
        store.append(after).await,
        Err(StoreError::Shredded { subject }) if subject == "lead-1"
    ));
}

async fn fields_stored_in_clear_read_as_erased_once_their_subject_is_shredded(db: Arc<Fixture>) {
    // Written by an older build, straight to the store: in clear.
    db.store()
        .append(append(
            "lead-old",
            ExpectedVersion::NoStream,
            vec![capture("old@example.com")],
        ))
        .await
        .unwrap();
    let store = encrypted(&db, &MasterKey::generate()).await;
    let read = store
        .read_stream(&stream("lead-old"), 1, Direction::Forwards, 10)
        .await
        .unwrap();
    assert_eq!(read[0].data["email"], "old@example.com", "read as it was");
    assert_eq!(store.events_in_clear(&stream("lead-old")).await.unwrap(), 1);
    assert_eq!(
        store.log_in_clear().await.unwrap(),
        vec![(1, "lead-old".to_owned())]
    );
    let erased = AppendRequest::new(
        stream("lead-old"),
        ExpectedVersion::Exact(1),
        vec![NewEvent::new("LeadErased", json!({}))],
    )
    .with_shredded(vec!["lead-old".into()]);
    store.append(erased).await.unwrap();
    let read = store
        .read_stream(&stream("lead-old"), 1, Direction::Forwards, 10)
        .await
        .unwrap();
    assert_eq!(read[0].data["email"], Value::Null);
    assert_eq!(read[0].data["erased"], true);
    // The log keeps what it stored: that is what an erasure of such a lead reports.
    assert_eq!(store.events_in_clear(&stream("lead-old")).await.unwrap(), 1);
}

async fn a_master_key_that_is_not_the_database_s_is_refused(db: Arc<Fixture>) {
    let master = MasterKey::generate();
    encrypted(&db, &master).await;
    let other = EncryptedStore::open(db.store(), db.keys(), &MasterKey::generate(), personal())
        .await
        .unwrap_err();
    assert!(matches!(other, StoreError::MasterKey(_)), "{other:?}");
    // The database's own key still opens it.
    encrypted(&db, &master).await;
}
