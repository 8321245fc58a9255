//! What the benchmarks of this package share: a seeded generator, percentiles and
//! spreads, and PostgreSQL databases of their own.

use std::time::Duration;

use anyhow::Context;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

/// A small deterministic generator (xorshift64*), so every run and every system sees
/// the same picks.
pub struct Seeded(pub u64);

impl Seeded {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The `p` quantile of sorted latencies (zero when there are none).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// The median of some figures and their range, as `median (min–max)`.
pub fn spread(values: &[f64], show: impl Fn(f64) -> String) -> String {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.as_slice() {
        [] => "n/a".to_owned(),
        [one] => show(*one),
        _ => format!(
            "{} ({}–{})",
            show(sorted[sorted.len() / 2]),
            show(sorted[0]),
            show(sorted[sorted.len() - 1])
        ),
    }
}

/// Creates a database named after `tag` on the server `admin` names; its URL and name.
pub async fn fresh_pg_database(admin: &str, tag: &str) -> anyhow::Result<(String, String)> {
    let name = format!("annals_bench_{tag}_{}", Uuid::new_v4().simple());
    let mut connection = PgConnection::connect(admin)
        .await
        .context("PostgreSQL must be running")?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut connection)
        .await?;
    let (server, _) = admin
        .rsplit_once('/')
        .context("database URL without a path")?;
    Ok((format!("{server}/{name}"), name))
}

pub async fn drop_pg_database(admin: &str, name: &str) -> anyhow::Result<()> {
    let mut connection = PgConnection::connect(admin).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut connection)
        .await?;
    Ok(())
}
