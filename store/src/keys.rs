//! The data keys beside the log (crypto-shredding, `domain.md` Erasure): one per subject
//! whose personal data the log holds encrypted, stored wrapped by the master key, and the
//! check that tells the master key from any other. The keys are opaque bytes here; what
//! wraps and opens them is `vault`'s.
//!
//! Invariants: a subject's key, once stored, is the only one it ever has (`key_for`
//! stores a candidate only where there is none, and answers the stored one); a shredded
//! key is gone for good, its row kept without it, in the transaction of the append that
//! shreds it (`AppendRequest::with_shredded`).

use std::collections::HashMap;
use std::fmt::Debug;

use async_trait::async_trait;
use chrono::Utc;
use sqlx::Transaction;
use tokio::sync::OwnedMutexGuard;

use crate::error::{InvalidInput, StoreError};
use crate::sql::{Dialect, PREPARED, SqlStore};

/// The data keys of the subjects, and the master key's check.
#[async_trait]
pub trait DataKeys: Send + Sync + Debug {
    /// The key stored for `subject`, storing `candidate` first when it has none: the key
    /// every writer of the subject then uses, whoever stored it. `None` when the
    /// subject's key was shredded. `check` is the check of the master key `candidate`
    /// is wrapped with: a candidate is never stored once the database's master key has
    /// changed (a rotation while this process ran), so no key is stored that the
    /// database's master key cannot open.
    async fn key_for(
        &self,
        subject: &str,
        candidate: &[u8],
        check: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError>;

    /// The keys of those of `subjects` that have a row: `None` for a shredded one.
    async fn keys_of(
        &self,
        subjects: &[&str],
    ) -> Result<HashMap<String, Option<Vec<u8>>>, StoreError>;

    /// A rotation of the master key, in one transaction that no key is stored during:
    /// refused unless the stored check is `old_check`; every held key replaced by what
    /// `rewrap(subject, wrapped)` makes of it, and the check by `new_check`. Returns how
    /// many keys it wrapped anew.
    async fn rotate(
        &self,
        old_check: &[u8],
        new_check: &[u8],
        rewrap: &(
             dyn for<'a, 'b> Fn(&'a str, &'b [u8]) -> Result<Vec<u8>, StoreError> + Send + Sync
         ),
    ) -> Result<u64, StoreError>;

    /// The stored check of the master key, storing `check` first when there is none.
    async fn master_key_check(&self, check: &[u8]) -> Result<Vec<u8>, StoreError>;

    /// Turns the claim keys an older build stored as the domain made them into what
    /// `keyed` makes of them (`None`: already keyed), in one transaction; a key whose
    /// keyed form is held already is left as it was. Returns how many it turned.
    async fn rekey_claims(
        &self,
        keyed: &(dyn for<'a> Fn(&'a str) -> Option<String> + Send + Sync),
    ) -> Result<u64, StoreError>;

    /// Has the database drop what it still keeps of overwritten data where it can: on
    /// SQLite (which zeroes freed space, `secure_delete`) the write-ahead log is
    /// checkpointed and truncated, so old page images go; PostgreSQL keeps dead row
    /// versions until its vacuum, where no dump or query reads them. Returns whether it
    /// was done (`false`: readers kept the log from being truncated; try again).
    async fn purge_overwritten(&self) -> Result<bool, StoreError>;
}

/// A write transaction on the keys, with this process's writer turn where the backend has
/// one (SQLite), as the tables beside the log take it.
type KeysWrite<DB> = (Option<OwnedMutexGuard<()>>, Transaction<'static, DB>);

async fn begin_write<DB: Dialect>(store: &SqlStore<DB>) -> Result<KeysWrite<DB>, StoreError> {
    let turn = match store.gate() {
        Some(gate) => Some(gate.lock_owned().await),
        None => None,
    };
    Ok((turn, store.pool().begin_with(DB::BEGIN_TABLES_WRITE).await?))
}

#[async_trait]
impl<DB: Dialect> DataKeys for SqlStore<DB> {
    async fn key_for(
        &self,
        subject: &str,
        candidate: &[u8],
        check: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let (_turn, mut transaction) = begin_write(self).await?;
        DB::execute(
            &mut transaction,
            "INSERT INTO data_keys (subject, wrapped, created_at) \
             SELECT $1, $2, $3 WHERE EXISTS \
                 (SELECT 1 FROM master_key_check WHERE id = 1 AND check_value = $4) \
             ON CONFLICT (subject) DO NOTHING",
            &[
                subject.into(),
                candidate.into(),
                DB::time(Utc::now()),
                check.into(),
            ],
            PREPARED,
        )
        .await?;
        let row = DB::fetch_optional(
            &mut transaction,
            "SELECT wrapped FROM data_keys WHERE subject = $1",
            &[subject.into()],
            PREPARED,
        )
        .await?
        .ok_or_else(|| {
            StoreError::MasterKey(
                "the database's master key changed while this process ran (a rotation): \
                 start it again with the new key"
                    .into(),
            )
        })?;
        let stored = DB::bytes(&row, "wrapped")?;
        transaction.commit().await?;
        Ok(stored)
    }

    async fn keys_of(
        &self,
        subjects: &[&str],
    ) -> Result<HashMap<String, Option<Vec<u8>>>, StoreError> {
        // A subject is a stream's name, which has no space (the SQLite answer is spaced).
        if let Some(subject) = subjects.iter().find(|subject| subject.contains(' ')) {
            return Err(InvalidInput::StreamName {
                name: (*subject).to_owned(),
                reason: "a subject has no space",
            }
            .into());
        }
        // One prepared statement, whatever the number of subjects: they cross as one
        // JSON array.
        let subjects = serde_json::to_string(subjects).unwrap_or_default();
        let mut connection = self.pool().acquire().await?;
        let rows = DB::fetch_all(
            &mut connection,
            DB::KEYS_OF,
            &[subjects.as_str().into()],
            PREPARED,
        )
        .await?;
        DB::keys_found(&rows)
    }

    async fn rotate(
        &self,
        old_check: &[u8],
        new_check: &[u8],
        rewrap: &(
             dyn for<'a, 'b> Fn(&'a str, &'b [u8]) -> Result<Vec<u8>, StoreError> + Send + Sync
         ),
    ) -> Result<u64, StoreError> {
        let (_turn, mut transaction) = begin_write(self).await?;
        // No key is stored meanwhile (SQLite: the write transaction excludes writers).
        if let Some(lock) = DB::LOCK_DATA_KEYS {
            DB::execute(&mut transaction, lock, &[], false).await?;
        }
        let stored = DB::fetch_optional(
            &mut transaction,
            "SELECT check_value FROM master_key_check WHERE id = 1",
            &[],
            PREPARED,
        )
        .await?
        .map(|row| DB::required(DB::bytes, &row, "check_value"))
        .transpose()?;
        if stored.as_deref() != Some(old_check) {
            return Err(StoreError::MasterKey(
                "the current key is not the one this database was started with".into(),
            ));
        }
        let rows = DB::fetch_all(
            &mut transaction,
            "SELECT subject, wrapped FROM data_keys WHERE wrapped IS NOT NULL ORDER BY subject",
            &[],
            PREPARED,
        )
        .await?;
        let mut rotated = 0;
        for row in &rows {
            let subject = DB::required(DB::text, row, "subject")?;
            let wrapped = DB::required(DB::bytes, row, "wrapped")?;
            let again = rewrap(&subject, &wrapped)?;
            DB::execute(
                &mut transaction,
                "UPDATE data_keys SET wrapped = $1 WHERE subject = $2",
                &[again.as_slice().into(), subject.as_str().into()],
                PREPARED,
            )
            .await?;
            rotated += 1;
        }
        DB::execute(
            &mut transaction,
            "UPDATE master_key_check SET check_value = $1 WHERE id = 1",
            &[new_check.into()],
            PREPARED,
        )
        .await?;
        transaction.commit().await?;
        Ok(rotated)
    }

    async fn rekey_claims(
        &self,
        keyed: &(dyn for<'a> Fn(&'a str) -> Option<String> + Send + Sync),
    ) -> Result<u64, StoreError> {
        let (_turn, mut transaction) = begin_write(self).await?;
        let rows = DB::fetch_all(
            &mut transaction,
            "SELECT key FROM claims WHERE key NOT LIKE '%:k1:%'",
            &[],
            PREPARED,
        )
        .await?;
        let mut turned = 0;
        for row in &rows {
            let key = DB::required(DB::text, row, "key")?;
            let Some(new) = keyed(&key) else {
                continue;
            };
            let done = DB::execute(
                &mut transaction,
                "UPDATE claims SET key = $1 WHERE key = $2 \
                   AND NOT EXISTS (SELECT 1 FROM claims WHERE key = $1)",
                &[new.as_str().into(), key.as_str().into()],
                PREPARED,
            )
            .await?;
            turned += DB::rows_affected(&done);
        }
        transaction.commit().await?;
        Ok(turned)
    }

    async fn master_key_check(&self, check: &[u8]) -> Result<Vec<u8>, StoreError> {
        let (_turn, mut transaction) = begin_write(self).await?;
        DB::execute(
            &mut transaction,
            "INSERT INTO master_key_check (id, check_value) VALUES (1, $1) \
             ON CONFLICT (id) DO NOTHING",
            &[check.into()],
            PREPARED,
        )
        .await?;
        let row = DB::fetch_optional(
            &mut transaction,
            "SELECT check_value FROM master_key_check WHERE id = 1",
            &[],
            PREPARED,
        )
        .await?
        .ok_or_else(|| StoreError::Corrupt("the master key's check vanished".into()))?;
        let stored = DB::required(DB::bytes, &row, "check_value")?;
        transaction.commit().await?;
        Ok(stored)
    }

    async fn purge_overwritten(&self) -> Result<bool, StoreError> {
        let Some(sql) = DB::PURGE_OVERWRITTEN else {
            return Ok(true);
        };
        let rows = DB::fetch_all(&mut *self.pool().acquire().await?, sql, &[], false).await?;
        // SQLite answers (busy, log frames, frames checkpointed): busy means a reader
        // kept the log from being truncated.
        Ok(rows
            .first()
            .map(|row| DB::first_int(row))
            .transpose()?
            .flatten()
            .is_none_or(|busy| busy == 0))
    }
}
