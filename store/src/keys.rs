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

use crate::error::StoreError;
use crate::sql::{Dialect, PREPARED, Param, SqlStore};

/// Subjects looked up per statement (SQLite binds at most 32,766 parameters).
const CHUNK: usize = 500;

/// The data keys of the subjects, and the master key's check.
#[async_trait]
pub trait DataKeys: Send + Sync + Debug {
    /// The key stored for `subject`, storing `candidate` first when it has none: the key
    /// every writer of the subject then uses, whoever stored it. `None` when the
    /// subject's key was shredded.
    async fn key_for(&self, subject: &str, candidate: &[u8])
    -> Result<Option<Vec<u8>>, StoreError>;

    /// The keys of those of `subjects` that have a row: `None` for a shredded one.
    async fn keys_of(
        &self,
        subjects: &[&str],
    ) -> Result<HashMap<String, Option<Vec<u8>>>, StoreError>;

    /// Up to `limit` keys still held, of the subjects after `after`, in subject order.
    async fn held_keys(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Puts every key wrapped anew and the new master key's check in place, in one
    /// transaction (a rotation of the master key): each `(subject, old, new)` only where
    /// the stored key is still `old`. Returns how many keys it replaced.
    async fn rewrap(
        &self,
        keys: &[(String, Vec<u8>, Vec<u8>)],
        check: &[u8],
    ) -> Result<u64, StoreError>;

    /// The stored check of the master key, storing `check` first when there is none.
    async fn master_key_check(&self, check: &[u8]) -> Result<Vec<u8>, StoreError>;

    /// Has the database drop what it still keeps of overwritten data where it can: on
    /// SQLite (which zeroes freed space, `secure_delete`) the write-ahead log is
    /// checkpointed and truncated, so old page images go; PostgreSQL keeps dead row
    /// versions until its vacuum, where no dump or query reads them.
    async fn purge_overwritten(&self) -> Result<(), StoreError>;
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
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let (_turn, mut transaction) = begin_write(self).await?;
        DB::execute(
            &mut transaction,
            "INSERT INTO data_keys (subject, wrapped, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (subject) DO NOTHING",
            &[subject.into(), candidate.into(), DB::time(Utc::now())],
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
        .ok_or_else(|| StoreError::Corrupt(format!("the data key of {subject} vanished")))?;
        let stored = DB::bytes(&row, "wrapped")?;
        transaction.commit().await?;
        Ok(stored)
    }

    async fn keys_of(
        &self,
        subjects: &[&str],
    ) -> Result<HashMap<String, Option<Vec<u8>>>, StoreError> {
        let mut keys = HashMap::new();
        let mut connection = self.pool().acquire().await?;
        for chunk in subjects.chunks(CHUNK) {
            let placeholders: Vec<String> = (1..=chunk.len()).map(|n| format!("${n}")).collect();
            let sql = format!(
                "SELECT subject, wrapped FROM data_keys WHERE subject IN ({})",
                placeholders.join(", ")
            );
            let params: Vec<Param<'_>> = chunk.iter().map(|s| (*s).into()).collect();
            // Not prepared: the statement's shape changes with the chunk's length.
            for row in DB::fetch_all(&mut connection, &sql, &params, false).await? {
                keys.insert(
                    DB::required(DB::text, &row, "subject")?,
                    DB::bytes(&row, "wrapped")?,
                );
            }
        }
        Ok(keys)
    }

    async fn held_keys(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let rows = DB::fetch_all(
            &mut *self.pool().acquire().await?,
            "SELECT subject, wrapped FROM data_keys \
              WHERE subject > $1 AND wrapped IS NOT NULL ORDER BY subject LIMIT $2",
            &[after.into(), limit.into()],
            PREPARED,
        )
        .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    DB::required(DB::text, row, "subject")?,
                    DB::required(DB::bytes, row, "wrapped")?,
                ))
            })
            .collect()
    }

    async fn rewrap(
        &self,
        keys: &[(String, Vec<u8>, Vec<u8>)],
        check: &[u8],
    ) -> Result<u64, StoreError> {
        let (_turn, mut transaction) = begin_write(self).await?;
        let mut replaced = 0;
        for (subject, old, new) in keys {
            let done = DB::execute(
                &mut transaction,
                "UPDATE data_keys SET wrapped = $1 WHERE subject = $2 AND wrapped = $3",
                &[
                    new.as_slice().into(),
                    subject.as_str().into(),
                    old.as_slice().into(),
                ],
                PREPARED,
            )
            .await?;
            replaced += DB::rows_affected(&done);
        }
        DB::execute(
            &mut transaction,
            "UPDATE master_key_check SET check_value = $1 WHERE id = 1",
            &[check.into()],
            PREPARED,
        )
        .await?;
        transaction.commit().await?;
        Ok(replaced)
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

    async fn purge_overwritten(&self) -> Result<(), StoreError> {
        if let Some(sql) = DB::PURGE_OVERWRITTEN {
            DB::fetch_all(&mut *self.pool().acquire().await?, sql, &[], false).await?;
        }
        Ok(())
    }
}
