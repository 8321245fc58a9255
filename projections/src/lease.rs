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
    Postgres {
        connection: PgConnection,
        key: i64,
    },
}

impl Lease {
    /// Tries to take the projection's lease; `None` when another process holds it.
    pub async fn try_acquire(
        db: &ReadDatabase,
        name: &str,
    ) -> Result<Option<Lease>, ProjectionError> {
        match db {
            ReadDatabase::Sqlite(_) => Ok(Some(Lease::Sole)),
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
                    Ok(Some(Lease::Postgres { connection, key }))
                } else {
                    let _ = connection.close().await;
                    Ok(None)
                }
            }
        }
    }

    /// Whether the lease is still this process's (its connection is alive and holds the
    /// lock); checked before every batch.
    pub async fn held(&mut self) -> bool {
        match self {
            Lease::Sole => true,
            Lease::Postgres { connection, key } => sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
                   AND pid = pg_backend_pid() AND granted \
                   AND ((classid::bigint << 32) | objid::bigint) = $1)",
            )
            .bind(*key)
            .fetch_one(connection)
            .await
            .unwrap_or(false),
        }
    }

    /// Gives the lease back (closing its connection releases the lock).
    pub async fn release(self) {
        if let Lease::Postgres { connection, .. } = self {
            let _ = connection.close().await;
        }
    }
}
