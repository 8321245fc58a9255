//! `due_timers`: one row per timer that is scheduled and has neither fired nor been
//! cancelled, with the time it is due; the scheduler (`timers`) reads it to find what to
//! fire. Folded from the `timer` streams alone, so a rebuild gives the same rows.

use annals_domain::timer::TimerEvent;
use annals_store::{LogFilter, RecordedEvent};

use crate::queries::live;
use crate::{aggregate_id, decode};
use annals_engine::row;
use annals_engine::rows::{Row, RowModel, text_columns};
use annals_engine::{ConsumerError, ReadDatabase};

/// The projection's name, and its table's.
pub const NAME: &str = "due_timers";

#[derive(Debug, Default)]
pub struct DueTimers;

row! {
    /// A timer waiting for its time.
    pub struct DueTimer in table NAME, keyed by timer_id {
        pub timer_id: String,
        /// The consumer it wakes.
        pub process: String,
        /// RFC 3339 UTC with microseconds.
        pub due_at: String,
        pub due_micros: i64,
    }
    indexes {
        // The scheduler's question: the timers due first.
        due_timers_due on ("due_micros, timer_id"),
    }
}

impl RowModel for DueTimers {
    type Row = DueTimer;

    const NAME: &'static str = NAME;
    const ROWS_FOLLOW_STREAMS: bool = true;

    fn filter(&self) -> LogFilter {
        LogFilter::categories(["timer"])
    }

    fn key(&self, event: &RecordedEvent) -> Result<Option<String>, ConsumerError> {
        Ok(Some(aggregate_id(event)))
    }

    fn fold(
        &self,
        _row: Option<DueTimer>,
        event: &RecordedEvent,
    ) -> Result<Option<DueTimer>, ConsumerError> {
        Ok(match decode::<TimerEvent>(event)? {
            TimerEvent::TimerScheduled {
                timer_id,
                process,
                due_at,
                ..
            } => Some(DueTimer {
                timer_id: timer_id.to_string(),
                process,
                due_at: due_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                due_micros: due_at.timestamp_micros(),
            }),
            TimerEvent::TimerFired { .. } | TimerEvent::TimerCancelled {} => None,
        })
    }
}

/// The timers due at `now_micros` or before, the earliest first, at most `limit`, after
/// the timer `after` (its due time and id) when given: pages through them in order.
pub async fn due(
    db: &ReadDatabase,
    now_micros: i64,
    after: Option<(i64, &str)>,
    limit: usize,
) -> Result<Vec<DueTimer>, ConsumerError> {
    let table = DueTimer::TABLE;
    let sql = format!(
        "SELECT {} FROM {NAME} WHERE generation = {} AND due_micros <= $1 \
            AND (due_micros > $2 OR (due_micros = $2 AND timer_id > $3)) \
          ORDER BY due_micros, timer_id LIMIT $4",
        text_columns(&table),
        live(NAME)
    );
    let (after_micros, after_id) = after.unwrap_or((i64::MIN, ""));
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    db.fetch_text_rows(
        &sql,
        &[
            now_micros.into(),
            after_micros.into(),
            after_id.into(),
            limit.into(),
        ],
    )
    .await?
    .iter()
    .map(|values| DueTimer::read(values))
    .collect()
}

/// When the next timer is due (microseconds since the epoch), if any is waiting.
pub async fn next_due(db: &ReadDatabase) -> Result<Option<i64>, ConsumerError> {
    db.fetch_int(
        &format!(
            "SELECT MIN(due_micros) FROM {NAME} WHERE generation = {}",
            live(NAME)
        ),
        &[],
    )
    .await
}
