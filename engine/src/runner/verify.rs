//! Verify: a scratch generation filled from position 0 and compared with the live one,
//! in one read-only snapshot where both stand at one position, in bounded pages by key.

use crate::checkpoint::read_checkpoint_of;
use crate::{
    ConsumerError, ConsumerRunner, Difference, DifferenceKind, PausePoint, ReadTx, Table,
    VerifyReport,
};

impl ConsumerRunner {
    /// Rebuilds into a scratch generation and compares it with the live one, at the
    /// same log position; the live read model is left as it is. The comparison holds up
    /// no writer: it reads one snapshot, a page at a time.
    pub async fn verify(&self) -> Result<VerifyReport, ConsumerError> {
        let (live, scratch) = self.claim_spare_generation().await?;
        let result = self.compare(live, scratch).await;
        let released = self.release_claim(scratch, Some(scratch)).await;
        let report = result?;
        released?;
        Ok(report)
    }

    /// Brings the scratch and the live generation to one position, then compares them
    /// in one read-only snapshot in which both checkpoints are equal: the live runner
    /// goes on beside it, unseen by the snapshot.
    pub(crate) async fn compare(
        &self,
        live: i64,
        scratch: i64,
    ) -> Result<VerifyReport, ConsumerError> {
        let name = self.name();
        self.fill(scratch, None, scratch).await?;
        loop {
            self.pause(PausePoint::Compare).await;
            let mut snapshot = self.db.begin_snapshot().await?;
            let live_at = read_checkpoint_of(&mut snapshot, name, live).await?;
            let scratch_at = read_checkpoint_of(&mut snapshot, name, scratch).await?;
            if live_at == scratch_at {
                let report = self
                    .compare_pages(&mut snapshot, live, scratch, live_at)
                    .await?;
                snapshot.commit().await?;
                return Ok(report);
            }
            drop(snapshot);
            // Bring whichever is behind to the other's position; applying the live
            // generation here is safe, its checkpoint guard keeps it exactly once (a
            // batch the live runner applied first is refused here: look again). Each
            // round closes the gap the live runner opened during the last one.
            if scratch_at < live_at {
                self.fill(scratch, Some(live_at), scratch).await?;
            } else {
                match self.fill(live, Some(scratch_at), scratch).await {
                    Ok(()) | Err(ConsumerError::CheckpointMoved(_)) => {}
                    Err(error) => return Err(error),
                }
            }
        }
    }

    /// Compares two generations table by table, by key: each page reads the next
    /// `verify_page` rows of each generation after the last key compared and joins them
    /// on the key, in the database's order of keys (so the order is the index's, and no
    /// collation has to be repeated here). Stops at the tenth difference.
    pub(crate) async fn compare_pages(
        &self,
        tx: &mut ReadTx,
        live: i64,
        scratch: i64,
        position: u64,
    ) -> Result<VerifyReport, ConsumerError> {
        const MOST: usize = 10;
        let limit = self.verify_page;
        let mut differences = Vec::new();
        let (mut pages, mut largest_page) = (0, 0);
        let mut renewed = tokio::time::Instant::now();
        'tables: for table in self.consumer.tables() {
            let (first, next) = (page_sql(table, limit, false), page_sql(table, limit, true));
            let mut after: Option<String> = None;
            loop {
                let rows = match &after {
                    None => {
                        tx.fetch_text_rows(&first, &[live.into(), scratch.into()])
                            .await?
                    }
                    Some(key) => {
                        tx.fetch_text_rows(
                            &next,
                            &[live.into(), scratch.into(), key.clone().into()],
                        )
                        .await?
                    }
                };
                pages += 1;
                largest_page = largest_page.max(rows.len());
                let bound = page_bound(&rows, limit);
                let compared = bound.map_or(rows.len(), |b| b + 1);
                for row in &rows[..compared] {
                    differences.extend(row_differences(table, row));
                    if differences.len() >= MOST {
                        differences.truncate(MOST);
                        break 'tables;
                    }
                }
                self.pause(PausePoint::ComparePage).await;
                // A long comparison keeps its claim, so it is not taken for a dead one.
                if renewed.elapsed() > self.claim_stale / 3 {
                    self.renew_claim(scratch).await?;
                    renewed = tokio::time::Instant::now();
                }
                match bound {
                    None => break,
                    Some(b) => after = rows[b][0].clone().or_else(|| rows[b][1].clone()),
                }
            }
        }
        Ok(VerifyReport {
            equal: differences.is_empty(),
            position,
            differences,
            pages,
            largest_page,
        })
    }
}

/// One page of the comparison of `table`: the next `limit` rows of each generation (`$1`
/// live, `$2` scratch; after the key `$3` when `after`), joined on the key: each row is
/// the live key, the rebuilt key, the live values, the rebuilt values.
fn page_sql(table: &Table, limit: usize, after: bool) -> String {
    let width = table.columns.len();
    let values = |side: &str| {
        (0..width)
            .map(|i| format!("{side}.v{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let side = |generation: &str| {
        format!(
            "SELECT {key} AS k, {columns} FROM {table} \
              WHERE generation = {generation}{after} ORDER BY {key} LIMIT {limit}",
            key = table.key,
            columns = table
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| format!("CAST({c} AS TEXT) AS v{i}"))
                .collect::<Vec<_>>()
                .join(", "),
            table = table.name,
            after = if after {
                format!(" AND {} > $3", table.key)
            } else {
                String::new()
            },
        )
    };
    format!(
        "WITH l AS ({}), r AS ({}) \
         SELECT l.k, r.k, {}, {} FROM l FULL OUTER JOIN r ON l.k = r.k \
          ORDER BY COALESCE(l.k, r.k)",
        side("$1"),
        side("$2"),
        values("l"),
        values("r")
    )
}

/// How far a page may be compared: a side that filled its page may have more rows after
/// its last key, so only keys up to the first such last key are compared now (`None`:
/// neither filled its page, the whole page is compared and the table is done).
fn page_bound(rows: &[Vec<Option<String>>], limit: usize) -> Option<usize> {
    let last_of = |i: usize| {
        let count = rows.iter().filter(|row| row[i].is_some()).count();
        if count < limit {
            None
        } else {
            rows.iter().rposition(|row| row[i].is_some())
        }
    };
    match (last_of(0), last_of(1)) {
        (None, None) => None,
        (l, r) => Some(l.unwrap_or(usize::MAX).min(r.unwrap_or(usize::MAX))),
    }
}

/// How one joined row of a page differs: a row only live is extra, one only rebuilt is
/// missing, and each column that differs in a row both have is changed.
fn row_differences(table: &Table, row: &[Option<String>]) -> Vec<Difference> {
    let width = table.columns.len();
    let key = row[0]
        .clone()
        .or_else(|| row[1].clone())
        .unwrap_or_default();
    let difference = |kind, column: Option<usize>| Difference {
        table: table.name.to_owned(),
        key: key.clone(),
        kind,
        column: column.map(|i| table.columns[i].to_owned()),
        live: column.and_then(|i| row[2 + i].clone()),
        rebuilt: column.and_then(|i| row[2 + width + i].clone()),
    };
    match (row[0].is_some(), row[1].is_some()) {
        (true, false) => vec![difference(DifferenceKind::Extra, None)],
        (false, true) => vec![difference(DifferenceKind::Missing, None)],
        _ => (0..width)
            .filter(|i| row[2 + i] != row[2 + width + i])
            .map(|i| difference(DifferenceKind::Changed, Some(i)))
            .collect(),
    }
}
