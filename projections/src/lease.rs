//! Which process runs a projection. On PostgreSQL several `annals serve` processes share
//! the work: a projection runs where its lease is, a session-level advisory lock held on
//! a connection of its own. When that process dies its connection closes, the lock goes
//! with it, and another process's next attempt takes it over. The lease decides who does
//! the work; exactly-once does not rest on it (the checkpoint guard makes a second
//! runner's batch fail). On SQLite one process owns the database, and every lease is held.

use sqlx::{Connection, PgConnection};

use crate::{ProjectionError, ReadDatabase};

#[derive(Debug)]
pub(crate) enum Lease {
    /// SQLite: one process owns everything.
    Sole,
    /// The connection whose session holds the advisory lock.
    Postgres { connection: PgConnection },
}

impl Lease {
    /// Tries to take the projection's lease; `None` when another process holds it.
    pub async fn try_acquire(
        db: &ReadDatabase,
        name: &str,
    ) -> Result<Option<Lease>, ProjectionError> {
        match db {
            ReadDatabase::Sqlite { .. } => Ok(Some(Lease::Sole)),
            ReadDatabase::Postgres(pool) => {
                // A connection of its own, outside the pool: the lock lives as long as it.
                let mut connection = pool.acquire().await?.detach();
                let key: i64 = sqlx::query_scalar("SELECT hashtextextended($1, 0)")
                    .bind(format!("annals.projection.{name}"))
                    .fetch_one(&mut connection)
                    .await?;
                let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(key)
                    .fetch_one(&mut connection)
                    .await?;
                if taken {
                    Ok(Some(Lease::Postgres { connection }))
                } else {
                    let _ = connection.close().await;
                    Ok(None)
                }
            }
        }
    }

    /// Whether the lease is still this process's; checked before every batch. A
    /// session-level lock lasts as long as its session and is never unlocked here, so
    /// the lease is held exactly while its connection answers.
    pub async fn held(&mut self) -> bool {
        match self {
            Lease::Sole => true,
            Lease::Postgres { connection, .. } => connection.ping().await.is_ok(),
        }
    }

    /// Gives the lease back (closing its connection releases the lock).
    pub async fn release(self) {
        if let Lease::Postgres { connection, .. } = self {
            let _ = connection.close().await;
        }
    }
}
