//! `deal_board`: one row per deal with its stage, status, amount, owner and account
//! (`domain.md`, read models); the pipeline's figures are aggregates of it.

use annals_domain::deal::{DealEvent, DealStatus};
use annals_store::{LogFilter, RecordedEvent};
use serde::Serialize;

use crate::queries::{
    Conditions, Page, Snapshot, encode_cursor, in_snapshot, live, number, page, ratio, text,
};
use crate::{aggregate_id, decode, time_text};
use annals_engine::row;
use annals_engine::rows::{Row, RowModel, text_columns};
use annals_engine::{ConsumerError, Param, ReadDatabase};
use annals_store::to_sql_int;

/// The projection's name, and its table's.
pub const NAME: &str = "deal_board";

#[derive(Debug, Default)]
pub struct DealBoard;

row! {
    /// A row of `deal_board`.
    pub struct DealRow in table NAME, keyed by deal_id {
        pub deal_id: String,
        pub account_id: String,
        pub name: String,
        pub stage: String,
        pub status: DealStatus as word,
        pub currency: String,
        pub amount_minor: i64,
        pub owner: Option<String>,
        pub expected_close: Option<String>,
        pub opened_at: String,
        pub opened_micros: i64,
        pub closed_at: Option<String>,
        pub closed_micros: Option<i64>,
        pub lost_reason: Option<String>,
        pub updated_position: i64,
    }
    indexes {
        // The board's list, in the order deals were opened.
        deal_board_opened on ("opened_micros, deal_id"),
        deal_board_account on ("account_id"),
        deal_board_stage on ("status, stage"),
        deal_board_owner on ("owner"),
        // The funnel's won step and the pipeline's closed deals in a time window.
        deal_board_closed on ("status, closed_at") where "closed_at IS NOT NULL",
    }
}

impl RowModel for DealBoard {
    type Row = DealRow;

    const NAME: &'static str = NAME;
    // Keyed by the aggregate id of the stream, from that stream's category only.
    const ROWS_FOLLOW_STREAMS: bool = true;

    fn filter(&self) -> LogFilter {
        LogFilter::categories(["deal"])
    }

    fn key(&self, event: &RecordedEvent) -> Result<Option<String>, ConsumerError> {
        Ok(Some(aggregate_id(event)))
    }

    fn fold(
        &self,
        row: Option<DealRow>,
        event: &RecordedEvent,
    ) -> Result<Option<DealRow>, ConsumerError> {
        let position = to_sql_int(event.position);
        let decoded: DealEvent = decode(event)?;
        if let DealEvent::DealOpened {
            account_id,
            name,
            amount,
            owner,
            expected_close,
            stage,
            ..
        } = decoded
        {
            return Ok(Some(DealRow {
                deal_id: aggregate_id(event),
                account_id: account_id.to_string(),
                name: name.as_str().to_owned(),
                stage: stage.as_str().to_owned(),
                status: DealStatus::Open,
                currency: amount.currency.as_str().to_owned(),
                amount_minor: amount.amount_minor,
                owner: owner.map(|o| o.as_str().to_owned()),
                expected_close: expected_close.map(|d| d.to_string()),
                opened_at: time_text(event),
                opened_micros: event.recorded_at.timestamp_micros(),
                closed_at: None,
                closed_micros: None,
                lost_reason: None,
                updated_position: position,
            }));
        }
        let mut row = row.ok_or_else(|| ConsumerError::Apply {
            position: event.position,
            event_type: event.event_type.clone(),
            reason: "the deal was never opened".into(),
        })?;
        row.status = row.status.after(&decoded);
        match decoded {
            DealEvent::DealOpened { .. } => {}
            DealEvent::DealStageChanged { to, .. } => row.stage = to.as_str().to_owned(),
            DealEvent::DealAmountChanged { to, .. } => row.amount_minor = to.amount_minor,
            DealEvent::DealWon { .. } | DealEvent::DealLost { .. } => {
                if let DealEvent::DealLost { reason } = &decoded {
                    row.lost_reason = Some(reason.as_str().to_owned());
                }
                row.closed_at = Some(time_text(event));
                row.closed_micros = Some(event.recorded_at.timestamp_micros());
            }
        }
        row.updated_position = position;
        Ok(Some(row))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageFigure {
    pub owner: Option<String>,
    pub stage: String,
    pub currency: String,
    pub count: i64,
    /// The sum of the deals' amounts: exact, however many there are (each is at most
    /// 10^15, and their sum may not fit in 64 bits).
    pub amount_minor: i128,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pipeline {
    /// Open deals per stage and currency, in stage order.
    pub stages: Vec<StageFigure>,
    /// The same, per owner (deals without an owner under `None`).
    pub by_owner: Vec<StageFigure>,
    pub won: i64,
    pub lost: i64,
    /// Won ÷ (won + lost); `None` before any deal closed.
    pub win_rate: Option<f64>,
    /// Average days from open to close over closed deals.
    pub average_days_to_close: Option<f64>,
}

const STAGE_ORDER: &str = "CASE stage WHEN 'prospecting' THEN 1 WHEN 'qualification' THEN 2 \
                           WHEN 'demo' THEN 3 WHEN 'proposal' THEN 4 ELSE 5 END";

/// The pipeline, for every owner or one (`owner`).
pub async fn pipeline(db: &ReadDatabase, owner: Option<&str>) -> Result<Pipeline, ConsumerError> {
    in_snapshot!(db, |snapshot| snapshot.pipeline(owner))
}

impl Snapshot {
    /// The pipeline, for every owner or one (`owner`).
    pub async fn pipeline(&mut self, owner: Option<&str>) -> Result<Pipeline, ConsumerError> {
        let owner_param: Param = owner.unwrap_or("").into();
        let filter = format!("generation = {} AND ($1 = '' OR owner = $1)", live(NAME));
        let figures = |row: &Vec<Option<String>>, with_owner: bool| {
            let offset = usize::from(with_owner);
            Ok(StageFigure {
                owner: if with_owner { row[0].clone() } else { None },
                stage: text(row, offset),
                currency: text(row, offset + 1),
                count: number(row, offset + 2),
                amount_minor: exact_sum(row, offset + 3)?,
            })
        };
        let amounts = exact_sum_sql("amount_minor");
        let stages = self
            .rows(
                &format!(
                    "SELECT stage, currency, CAST(COUNT(*) AS TEXT), {amounts} \
               FROM deal_board WHERE {filter} AND status = 'open' \
              GROUP BY stage, currency ORDER BY MIN({STAGE_ORDER}), currency"
                ),
                std::slice::from_ref(&owner_param),
            )
            .await?
            .iter()
            .map(|row| figures(row, false))
            .collect::<Result<_, ConsumerError>>()?;
        let by_owner = self
            .rows(
                &format!(
                    "SELECT owner, stage, currency, CAST(COUNT(*) AS TEXT), {amounts} \
               FROM deal_board WHERE {filter} AND status = 'open' \
              GROUP BY owner, stage, currency ORDER BY owner, MIN({STAGE_ORDER}), currency"
                ),
                std::slice::from_ref(&owner_param),
            )
            .await?
            .iter()
            .map(|row| figures(row, true))
            .collect::<Result<_, ConsumerError>>()?;
        let closed = self
            .rows(
                &format!(
                    "SELECT CAST(SUM(CASE WHEN status = 'won' THEN 1 ELSE 0 END) AS TEXT), \
                    CAST(SUM(CASE WHEN status = 'lost' THEN 1 ELSE 0 END) AS TEXT), \
                    {durations} \
               FROM deal_board WHERE {filter} AND status <> 'open'",
                    durations = exact_sum_sql("closed_micros - opened_micros")
                ),
                &[owner_param],
            )
            .await?;
        let row = closed.first().cloned().unwrap_or_default();
        let (won, lost) = (number(&row, 0), number(&row, 1));
        let micros = exact_sum(&row, 2)?;
        Ok(Pipeline {
            stages,
            by_owner,
            won,
            lost,
            win_rate: ratio(won, won + lost),
            average_days_to_close: (won + lost > 0)
                .then(|| micros as f64 / (won + lost) as f64 / 86_400_000_000.0),
        })
    }
}

/// A sum the database computes exactly on both backends, whatever the count: as two
/// sums, of the whole billions and of the remainders, each of which fits in 64 bits for
/// any table this side of 9 × 10^9 rows (SQLite's `SUM` fails past 64 bits, and
/// PostgreSQL's is a `numeric` no 64-bit reader takes). `exact_sum` joins them.
fn exact_sum_sql(expression: &str) -> String {
    format!(
        "CAST(SUM(({expression}) / {SUM_SPLIT}) AS TEXT), \
         CAST(SUM(({expression}) % {SUM_SPLIT}) AS TEXT)"
    )
}

const SUM_SPLIT: i64 = 1_000_000_000;

/// The sum `exact_sum_sql` selected at column `i` (and `i + 1`); 0 over no row.
fn exact_sum(row: &[Option<String>], i: usize) -> Result<i128, ConsumerError> {
    let part = |i: usize| -> Result<i128, ConsumerError> {
        match row.get(i).cloned().flatten() {
            None => Ok(0),
            Some(text) => text.parse::<i128>().map_err(|_| {
                ConsumerError::Corrupt(format!("a sum the database gave is {text:?}"))
            }),
        }
    };
    Ok(part(i)? * i128::from(SUM_SPLIT) + part(i + 1)?)
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DealFilter {
    pub stage: Option<String>,
    pub owner: Option<String>,
    pub account_id: Option<String>,
}

fn select_deals() -> String {
    format!(
        "SELECT {} FROM deal_board WHERE generation = {}",
        text_columns(&DealRow::TABLE),
        live(NAME)
    )
}

fn deal_row(row: &[Option<String>]) -> Result<DealRow, ConsumerError> {
    DealRow::read(row)
}

/// Deals matching the filter, in the order they were opened (opened_micros, then id); keyset pagination.
/// `stage` naming a closed status (`DealStatus::CLOSED`: won, lost) means deals with that
/// status; another stage means open deals at that stage.
pub async fn deals(
    db: &ReadDatabase,
    filter: &DealFilter,
    limit: usize,
    cursor: Option<&str>,
) -> Result<Page<DealRow>, ConsumerError> {
    in_snapshot!(db, |snapshot| snapshot.deals(filter, limit, cursor))
}

/// One deal of the live deal board; `None` when unknown.
pub async fn deal(db: &ReadDatabase, deal_id: &str) -> Result<Option<DealRow>, ConsumerError> {
    in_snapshot!(db, |snapshot| snapshot.deal(deal_id))
}

impl Snapshot {
    /// Deals matching the filter (see [`deals`]).
    pub async fn deals(
        &mut self,
        filter: &DealFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<DealRow>, ConsumerError> {
        let mut conditions = Conditions::default();
        match filter.stage.as_deref() {
            Some(word) if DealStatus::closed(word).is_some() => {
                let placeholder = conditions.bind(word);
                conditions.push(format!("status = {placeholder}"));
            }
            Some(stage) => {
                let placeholder = conditions.bind(stage);
                let open = DealStatus::Open.as_str();
                conditions.push(format!("status = '{open}' AND stage = {placeholder}"));
            }
            None => {}
        }
        conditions.equal("owner", filter.owner.as_ref());
        conditions.equal("account_id", filter.account_id.as_ref());
        conditions.after(cursor, "opened_micros", "deal_id")?;
        page(
            self,
            &select_deals(),
            conditions,
            "opened_micros, deal_id",
            limit,
            deal_row,
            |last| encode_cursor(last.opened_micros, &[&last.deal_id]),
        )
        .await
    }

    /// One deal of the live deal board; `None` when unknown.
    pub async fn deal(&mut self, deal_id: &str) -> Result<Option<DealRow>, ConsumerError> {
        let sql = format!("{} AND deal_id = $1", select_deals());
        self.rows(&sql, &[deal_id.into()])
            .await?
            .first()
            .map(|row| deal_row(row))
            .transpose()
    }
}
