//! What analysts ask of the read models: the pipeline, the funnel, the account 360 view
//! and the boards' lists, computed from the live generation of the boards. Pure
//! functions of the log, as the boards are; nothing here writes. Each read model's own
//! queries are in its file (re-exported here); this module holds what they share (the
//! snapshot, pages and cursors) and the funnel, which reads two boards.
//!
//! Every answer is read from one [`Snapshot`]: all its statements, and the checkpoints
//! that say which position it reflects ([`Snapshot::position`]), see the read models as
//! of one instant, so a batch committed while an answer is being read is either wholly
//! in it or wholly out of it.

use serde::Serialize;
use tokio::sync::mpsc;

pub use crate::read_models::account_360::{AccountDeal, AccountView, account_360};
pub use crate::read_models::deal_board::{
    DealFilter, Pipeline, StageFigure, deal, deals, pipeline,
};
pub use crate::read_models::lead_board::{LeadFilter, lead, leads};
use crate::read_models::{deal_board, lead_board};
use annals_engine::rows::{Row, text_columns};
use annals_engine::{ConsumerError, Param, ReadDatabase, ReadTx};

/// The live generation of a projection, as a subquery.
pub(crate) fn live(projection: &str) -> String {
    format!("(SELECT live_generation FROM projections WHERE name = '{projection}')")
}

pub(crate) type Rows = Vec<Vec<Option<String>>>;

/// A test's hold on a snapshot between its statements: after each statement of an
/// answer the snapshot sends the statement's number (from 1) on `reached` and waits for
/// one message on `resume`, so a test can commit a batch in between.
#[derive(Debug)]
pub struct Pause {
    pub reached: mpsc::UnboundedSender<usize>,
    pub resume: mpsc::UnboundedReceiver<()>,
}

/// One read-only snapshot of the read models, for one answer: every statement it runs
/// sees the database as of its start (see `ReadDatabase::begin_snapshot`), so an answer
/// of several statements, and the checkpoint that says what it reflects, agree.
#[derive(Debug)]
pub struct Snapshot {
    tx: ReadTx,
    pause: Option<Pause>,
    /// The plans of the statements run so far, when asked for (`explained`).
    plans: Option<Vec<String>>,
    statements: usize,
}

impl Snapshot {
    /// Opens a snapshot: the read models as they are now.
    pub async fn begin(db: &ReadDatabase) -> Result<Self, ConsumerError> {
        Ok(Snapshot {
            tx: db.begin_snapshot().await?,
            pause: None,
            plans: None,
            statements: 0,
        })
    }

    /// This snapshot, pausing after each statement (see [`Pause`]).
    pub fn paused(mut self, pause: Pause) -> Self {
        self.pause = Some(pause);
        self
    }

    /// This snapshot, keeping the database's plan of each statement it runs
    /// (see [`Snapshot::plans`]).
    pub fn explained(mut self) -> Self {
        self.plans = Some(Vec::new());
        self
    }

    /// The plan of each statement run so far, in order, when `explained`.
    pub fn plans(&self) -> &[String] {
        self.plans.as_deref().unwrap_or_default()
    }

    /// Ends the snapshot (it changed nothing).
    pub async fn finish(self) -> Result<(), ConsumerError> {
        self.tx.commit().await
    }

    pub(crate) async fn rows(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Rows, ConsumerError> {
        if let Some(plans) = &mut self.plans {
            plans.push(self.tx.explain(sql, params).await?);
        }
        let found = self.tx.fetch_text_rows(sql, params).await?;
        self.statements += 1;
        if let Some(pause) = &mut self.pause
            && pause.reached.send(self.statements).is_ok()
        {
            pause.resume.recv().await;
        }
        Ok(found)
    }

    /// The live rows of a read model's table that `condition` picks (on its own
    /// columns, with `$n` parameters), followed by `tail` (an `ORDER BY`, a `LIMIT`),
    /// read back as its row type: a view that reads another board reads its columns by
    /// name, never by position.
    pub(crate) async fn rows_of<R: Row>(
        &mut self,
        condition: &str,
        tail: &str,
        params: &[Param<'_>],
    ) -> Result<Vec<R>, ConsumerError> {
        let table = R::TABLE;
        let sql = format!(
            "SELECT {} FROM {} WHERE generation = {} AND {condition} {tail}",
            text_columns(&table),
            table.name,
            live(table.name)
        );
        self.rows(&sql, params)
            .await?
            .iter()
            .map(|row| R::read(row))
            .collect()
    }

    /// The position up to which the read models of this snapshot have applied the log:
    /// the lowest checkpoint of the live generations of `projections` (0 for one that
    /// has applied nothing).
    pub async fn position(&mut self, projections: &[&str]) -> Result<u64, ConsumerError> {
        if projections.is_empty() {
            return Ok(0);
        }
        let names: Vec<Param<'_>> = projections.iter().map(|name| (*name).into()).collect();
        let placeholders = (1..=names.len())
            .map(|n| format!("${n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let found = self
            .rows(
                &format!(
                    "SELECT p.name, CAST(c.position AS TEXT) FROM projections p \
                       JOIN projection_checkpoints c \
                         ON c.name = p.name AND c.generation = p.live_generation \
                      WHERE p.name IN ({placeholders})"
                ),
                &names,
            )
            .await?;
        let lowest = projections
            .iter()
            .map(|name| {
                found
                    .iter()
                    .find(|row| text(row, 0) == *name)
                    .map_or(0, |row| number(row, 1))
            })
            .min()
            .unwrap_or(0);
        Ok(u64::try_from(lowest).unwrap_or(0))
    }
}

/// Runs one answer in a snapshot of its own.
macro_rules! in_snapshot {
    ($db:expr, |$snapshot:ident| $answer:expr) => {{
        let mut $snapshot = Snapshot::begin($db).await?;
        let answer = $answer.await?;
        $snapshot.finish().await?;
        Ok(answer)
    }};
}
pub(crate) use in_snapshot;

pub(crate) fn text(row: &[Option<String>], i: usize) -> String {
    row.get(i).cloned().flatten().unwrap_or_default()
}

pub(crate) fn number(row: &[Option<String>], i: usize) -> i64 {
    text(row, i).parse().unwrap_or(0)
}

pub(crate) fn ratio(part: i64, whole: i64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunnelSteps {
    pub captured: i64,
    pub qualified: i64,
    pub converted: i64,
    pub deal_won: i64,
    /// qualified ÷ captured, converted ÷ qualified, deal won ÷ converted.
    pub qualification_rate: Option<f64>,
    pub conversion_rate: Option<f64>,
    pub win_rate: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Funnel {
    pub overall: FunnelSteps,
    /// Per lead source with something in the window, in source order.
    pub by_source: Vec<(String, FunnelSteps)>,
}

/// The funnel for a time window (RFC 3339 bounds, `from` inclusive, `to` exclusive;
/// all time without them): each step counts what happened in the window, overall and
/// per source (each source with something in the window).
pub async fn funnel(
    db: &ReadDatabase,
    from: Option<&str>,
    to: Option<&str>,
    source: Option<&str>,
) -> Result<Funnel, ConsumerError> {
    in_snapshot!(db, |snapshot| snapshot.funnel(from, to, source))
}

impl Snapshot {
    /// The funnel for a time window (see [`funnel`]).
    pub async fn funnel(
        &mut self,
        from: Option<&str>,
        to: Option<&str>,
        source: Option<&str>,
    ) -> Result<Funnel, ConsumerError> {
        // Read-model times are RFC 3339 UTC text with microseconds: they compare as text.
        let from: Param = from.unwrap_or("").into();
        let to: Param = to.unwrap_or("9999").into();
        let source: Param = source.unwrap_or("").into();
        // Each step counts the rows whose time for it falls in the window, found by a
        // range on an index of that time (generation first); a won deal counts for the
        // source of the lead converted into it.
        let lead_generation = live(lead_board::NAME);
        let step = |name: &str, column: &str| {
            format!(
                "SELECT source, '{name}' AS step FROM lead_board \
                  WHERE generation = {lead_generation} \
                    AND {column} >= $1 AND {column} < $2 AND ($3 = '' OR source = $3)"
            )
        };
        let sql = format!(
            "SELECT source, step, CAST(COUNT(*) AS TEXT) FROM ({captured} \
               UNION ALL {qualified} UNION ALL {converted} UNION ALL \
               SELECT l.source, 'won' AS step FROM deal_board d \
                 JOIN lead_board l \
                   ON l.generation = {lead_generation} AND l.converted_deal_id = d.deal_id \
                WHERE d.generation = {deal_generation} AND d.status = 'won' \
                  AND d.closed_at >= $1 AND d.closed_at < $2 \
                  AND ($3 = '' OR l.source = $3)) steps \
             GROUP BY source, step ORDER BY source",
            captured = step("captured", "captured_at"),
            qualified = step("qualified", "qualified_at"),
            converted = step("converted", "converted_at"),
            deal_generation = live(deal_board::NAME),
        );
        let steps = |captured, qualified, converted, deal_won| FunnelSteps {
            captured,
            qualified,
            converted,
            deal_won,
            qualification_rate: ratio(qualified, captured),
            conversion_rate: ratio(converted, qualified),
            win_rate: ratio(deal_won, converted),
        };
        let mut total = [0i64; 4];
        let mut counts: Vec<(String, [i64; 4])> = Vec::new();
        for row in self.rows(&sql, &[from, to, source]).await? {
            let step = match text(&row, 1).as_str() {
                "captured" => 0,
                "qualified" => 1,
                "converted" => 2,
                _ => 3,
            };
            let (source, n) = (text(&row, 0), number(&row, 2));
            total[step] = total[step].saturating_add(n);
            // The rows come in source order.
            match counts.last_mut() {
                Some((last, steps)) if *last == source => steps[step] = n,
                _ => {
                    let mut steps = [0; 4];
                    steps[step] = n;
                    counts.push((source, steps));
                }
            }
        }
        let by_source = counts
            .into_iter()
            .map(|(source, [a, b, c, d])| (source, steps(a, b, c, d)))
            .collect();
        Ok(Funnel {
            overall: steps(total[0], total[1], total[2], total[3]),
            by_source,
        })
    }
}

/// One page of a list: `next_cursor` is None on the last page; cursors are opaque strings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// The most items a page holds, whatever the caller asks (it validates 1–500 itself).
const MAX_PAGE: usize = 500;
/// A cursor is the keyset values of a page's last item, joined by `_`: a whole number,
/// then text values (times and ids) of at most 64 characters among `0-9A-Za-z:.-`.
/// Every string of that form is a cursor the server serves (a position in the keyset
/// order, even one no item has), so the OpenAPI document can state the form exactly:
/// `LEAD_CURSOR_PATTERN` and `DEAL_CURSOR_PATTERN`.
pub const LEAD_CURSOR_PATTERN: &str =
    r"^-?[0-9]{1,19}_[0-9A-Za-z:.\-]{0,64}_[0-9A-Za-z:.\-]{0,64}$";
/// The deal board's cursor: see `LEAD_CURSOR_PATTERN`.
pub const DEAL_CURSOR_PATTERN: &str = r"^-?[0-9]{1,19}_[0-9A-Za-z:.\-]{0,64}$";

/// The longest text value a cursor holds.
const MAX_CURSOR_TEXT: usize = 64;

fn cursor_text_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, ':' | '.' | '-')
}

/// A cursor: a number and text values (see `LEAD_CURSOR_PATTERN`). A read model's
/// times and ids always fit; one that does not is corrupt.
pub(crate) fn encode_cursor(number: i64, texts: &[&str]) -> Result<String, ConsumerError> {
    let mut cursor = number.to_string();
    for text in texts {
        if text.len() > MAX_CURSOR_TEXT || !text.chars().all(cursor_text_char) {
            return Err(ConsumerError::Corrupt(format!(
                "a cursor cannot hold the keyset value {text:?}"
            )));
        }
        cursor.push('_');
        cursor.push_str(text);
    }
    Ok(cursor)
}

/// Reads a cursor of a number and `N` text values back; anything not of that form is
/// `InvalidCursor`. A number past the range of `i64` stands for the range's end: the
/// keyset order has nothing beyond it either.
pub(crate) fn decode_cursor<const N: usize>(
    cursor: &str,
) -> Result<(i64, [String; N]), ConsumerError> {
    let mut parts = cursor.split('_');
    let number = parts.next().unwrap_or_default();
    let digits = number.strip_prefix('-').unwrap_or(number);
    if digits.is_empty() || digits.len() > 19 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ConsumerError::InvalidCursor);
    }
    let number = number
        .parse::<i128>()
        .map_err(|_| ConsumerError::InvalidCursor)?
        .clamp(i128::from(i64::MIN), i128::from(i64::MAX));
    let number = i64::try_from(number).map_err(|_| ConsumerError::InvalidCursor)?;
    let texts: Vec<String> = parts.map(str::to_owned).collect();
    let texts: [String; N] = texts.try_into().map_err(|_| ConsumerError::InvalidCursor)?;
    if texts
        .iter()
        .any(|t| t.len() > MAX_CURSOR_TEXT || !t.chars().all(cursor_text_char))
    {
        return Err(ConsumerError::InvalidCursor);
    }
    Ok((number, texts))
}

/// The conditions of a list query and their parameters, numbered as they are bound.
#[derive(Debug, Default)]
pub(crate) struct Conditions<'a> {
    sql: Vec<String>,
    params: Vec<Param<'a>>,
}

impl<'a> Conditions<'a> {
    /// Binds a parameter; its placeholder.
    pub(crate) fn bind(&mut self, param: impl Into<Param<'a>>) -> String {
        self.params.push(param.into());
        format!("${}", self.params.len())
    }

    pub(crate) fn push(&mut self, condition: String) {
        self.sql.push(condition);
    }

    /// `column = value`, when a value is given.
    pub(crate) fn equal(&mut self, column: &str, value: Option<&String>) {
        if let Some(value) = value {
            let placeholder = self.bind(value.clone());
            self.push(format!("{column} = {placeholder}"));
        }
    }

    /// The rows after a `next_cursor` of a list kept in `(time, id)` order (the cursor
    /// `encode_cursor(time, &[id])` made), when one is given.
    pub(crate) fn after(
        &mut self,
        cursor: Option<&str>,
        time: &str,
        id: &str,
    ) -> Result<(), ConsumerError> {
        if let Some(cursor) = cursor {
            let (micros, [after]) = decode_cursor(cursor)?;
            let micros = self.bind(micros);
            let after = self.bind(after);
            self.push(format!(
                "{time} >= {micros} AND ({time} > {micros} OR ({time} = {micros} AND {id} > {after}))"
            ));
        }
        Ok(())
    }

    /// `AND`-joined, each condition after the generation's.
    fn and(&self) -> String {
        self.sql
            .iter()
            .map(|c| format!(" AND {c}"))
            .collect::<String>()
    }
}

/// Runs a keyset-paged query (`conditions` already hold the filter and the cursor) for
/// `limit` items and one more, which says whether there is a next page.
pub(crate) async fn page<T>(
    snapshot: &mut Snapshot,
    select: &str,
    mut conditions: Conditions<'_>,
    order: &str,
    limit: usize,
    view: impl Fn(&[Option<String>]) -> Result<T, ConsumerError>,
    key: impl Fn(&T) -> Result<String, ConsumerError>,
) -> Result<Page<T>, ConsumerError> {
    let limit = limit.clamp(1, MAX_PAGE);
    let fetch = conditions.bind(i64::try_from(limit + 1).unwrap_or(i64::MAX));
    let sql = format!(
        "{select}{} ORDER BY {order} LIMIT {fetch}",
        conditions.and()
    );
    let found = snapshot.rows(&sql, &conditions.params).await?;
    let more = found.len() > limit;
    let items = found
        .iter()
        .take(limit)
        .map(|row| view(row))
        .collect::<Result<Vec<T>, _>>()?;
    let next_cursor = match items.last() {
        Some(last) if more => Some(key(last)?),
        _ => None,
    };
    Ok(Page { items, next_cursor })
}
