//! What analysts ask of the read models: the pipeline, the funnel, the account 360 view
//! and the boards' lists, computed from the live generation of the boards. Pure
//! functions of the log, as the boards are; nothing here writes.
//!
//! Every answer is read from one [`Snapshot`]: all its statements, and the checkpoints
//! that say which position it reflects ([`Snapshot::position`]), see the read models as
//! of one instant, so a batch committed while an answer is being read is either wholly
//! in it or wholly out of it.

use serde::Serialize;
use tokio::sync::mpsc;

use annals_domain::deal::DealStatus;

use crate::account_360;
use crate::deal_board::{self, DealRow};
use crate::lead_board::{self, LeadRow};
use crate::rows::{Row, text_columns};
use crate::{Param, ProjectionError, ReadDatabase, ReadTx};

/// The live generation of a projection, as a subquery.
fn live(projection: &str) -> String {
    format!("(SELECT live_generation FROM projections WHERE name = '{projection}')")
}

type Rows = Vec<Vec<Option<String>>>;

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
    pub async fn begin(db: &ReadDatabase) -> Result<Self, ProjectionError> {
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
    pub async fn finish(self) -> Result<(), ProjectionError> {
        self.tx.commit().await
    }

    async fn rows(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Rows, ProjectionError> {
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

    /// The position up to which the read models of this snapshot have applied the log:
    /// the lowest checkpoint of the live generations of `projections` (0 for one that
    /// has applied nothing).
    pub async fn position(&mut self, projections: &[&str]) -> Result<u64, ProjectionError> {
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

fn text(row: &[Option<String>], i: usize) -> String {
    row.get(i).cloned().flatten().unwrap_or_default()
}

fn number(row: &[Option<String>], i: usize) -> i64 {
    text(row, i).parse().unwrap_or(0)
}

fn ratio(part: i64, whole: i64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageFigure {
    pub owner: Option<String>,
    pub stage: String,
    pub currency: String,
    pub count: i64,
    pub amount_minor: i64,
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
pub async fn pipeline(db: &ReadDatabase, owner: Option<&str>) -> Result<Pipeline, ProjectionError> {
    in_snapshot!(db, |snapshot| snapshot.pipeline(owner))
}

impl Snapshot {
    /// The pipeline, for every owner or one (`owner`).
    pub async fn pipeline(&mut self, owner: Option<&str>) -> Result<Pipeline, ProjectionError> {
        let owner_param: Param = owner.unwrap_or("").into();
        let filter = format!(
            "generation = {} AND ($1 = '' OR owner = $1)",
            live(deal_board::NAME)
        );
        let figures = |row: &Vec<Option<String>>, with_owner: bool| {
            let offset = usize::from(with_owner);
            StageFigure {
                owner: if with_owner { row[0].clone() } else { None },
                stage: text(row, offset),
                currency: text(row, offset + 1),
                count: number(row, offset + 2),
                amount_minor: number(row, offset + 3),
            }
        };
        let stages = self.rows(
        &format!(
            "SELECT stage, currency, CAST(COUNT(*) AS TEXT), CAST(SUM(amount_minor) AS TEXT) \
               FROM deal_board WHERE {filter} AND status = 'open' \
              GROUP BY stage, currency ORDER BY MIN({STAGE_ORDER}), currency"
        ),
        std::slice::from_ref(&owner_param),
    )
    .await?
    .iter()
    .map(|row| figures(row, false))
    .collect();
        let by_owner = self
            .rows(
                &format!(
                    "SELECT owner, stage, currency, CAST(COUNT(*) AS TEXT), \
                    CAST(SUM(amount_minor) AS TEXT) \
               FROM deal_board WHERE {filter} AND status = 'open' \
              GROUP BY owner, stage, currency ORDER BY owner, MIN({STAGE_ORDER}), currency"
                ),
                std::slice::from_ref(&owner_param),
            )
            .await?
            .iter()
            .map(|row| figures(row, true))
            .collect();
        let closed = self
            .rows(
                &format!(
                    "SELECT CAST(SUM(CASE WHEN status = 'won' THEN 1 ELSE 0 END) AS TEXT), \
                    CAST(SUM(CASE WHEN status = 'lost' THEN 1 ELSE 0 END) AS TEXT), \
                    CAST(SUM(closed_micros - opened_micros) AS TEXT) \
               FROM deal_board WHERE {filter} AND status <> 'open'"
                ),
                &[owner_param],
            )
            .await?;
        let row = closed.first().cloned().unwrap_or_default();
        let (won, lost, micros) = (number(&row, 0), number(&row, 1), number(&row, 2));
        Ok(Pipeline {
            stages,
            by_owner,
            won,
            lost,
            win_rate: ratio(won, won + lost),
            average_days_to_close: ratio(micros, won + lost).map(|m| m / 86_400_000_000.0),
        })
    }
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
) -> Result<Funnel, ProjectionError> {
    in_snapshot!(db, |snapshot| snapshot.funnel(from, to, source))
}

impl Snapshot {
    /// The funnel for a time window (see [`funnel`]).
    pub async fn funnel(
        &mut self,
        from: Option<&str>,
        to: Option<&str>,
        source: Option<&str>,
    ) -> Result<Funnel, ProjectionError> {
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

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccountView {
    pub account_id: String,
    pub name: String,
    pub domain: Option<String>,
    pub industry: Option<String>,
    pub employees: Option<i64>,
    pub tier: String,
    /// (deal id, name, stage, status, currency, amount in minor units)
    pub deals: Vec<AccountDeal>,
    /// Ids of the leads converted into this account.
    pub converted_leads: Vec<String>,
    /// (currency, amount in minor units) won, per currency.
    pub won: Vec<(String, i64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccountDeal {
    pub deal_id: String,
    pub name: String,
    pub stage: String,
    pub status: String,
    pub currency: String,
    pub amount_minor: i64,
}

/// One account with its deals, converted leads and won amounts; `None` when unknown.
pub async fn account_360(
    db: &ReadDatabase,
    account_id: &str,
) -> Result<Option<AccountView>, ProjectionError> {
    in_snapshot!(db, |snapshot| snapshot.account_360(account_id))
}

impl Snapshot {
    /// One account with its deals, converted leads and won amounts; `None` when unknown.
    pub async fn account_360(
        &mut self,
        account_id: &str,
    ) -> Result<Option<AccountView>, ProjectionError> {
        let id: Param = account_id.into();
        let account = self
            .rows(
                &format!(
                    "SELECT account_id, name, domain, industry, CAST(employees AS TEXT), tier \
               FROM account_360 WHERE generation = {} AND account_id = $1",
                    live(account_360::NAME)
                ),
                std::slice::from_ref(&id),
            )
            .await?;
        let Some(row) = account.first() else {
            return Ok(None);
        };
        let deals = self
            .rows(
                &format!(
                    "SELECT deal_id, name, stage, status, currency, CAST(amount_minor AS TEXT) \
               FROM deal_board WHERE generation = {} AND account_id = $1 \
              ORDER BY opened_micros, deal_id",
                    live(deal_board::NAME)
                ),
                std::slice::from_ref(&id),
            )
            .await?
            .iter()
            .map(|d| AccountDeal {
                deal_id: text(d, 0),
                name: text(d, 1),
                stage: text(d, 2),
                status: text(d, 3),
                currency: text(d, 4),
                amount_minor: number(d, 5),
            })
            .collect::<Vec<_>>();
        let converted_leads = self.rows(
        &format!(
            "SELECT lead_id FROM lead_board WHERE generation = {} AND converted_account_id = $1 \
              ORDER BY converted_at, lead_id",
            live(lead_board::NAME)
        ),
        std::slice::from_ref(&id),
    )
    .await?
    .iter()
    .map(|l| text(l, 0))
    .collect();
        let mut won: Vec<(String, i64)> = Vec::new();
        for deal in deals
            .iter()
            .filter(|d| d.status == DealStatus::Won.as_str())
        {
            match won.iter_mut().find(|(c, _)| *c == deal.currency) {
                Some((_, sum)) => *sum = sum.saturating_add(deal.amount_minor),
                None => won.push((deal.currency.clone(), deal.amount_minor)),
            }
        }
        won.sort();
        Ok(Some(AccountView {
            account_id: text(row, 0),
            name: text(row, 1),
            domain: row[2].clone(),
            industry: row[3].clone(),
            employees: row[4].as_deref().and_then(|e| e.parse().ok()),
            tier: text(row, 5),
            deals,
            converted_leads,
            won,
        }))
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
fn encode_cursor(number: i64, texts: &[&str]) -> Result<String, ProjectionError> {
    let mut cursor = number.to_string();
    for text in texts {
        if text.len() > MAX_CURSOR_TEXT || !text.chars().all(cursor_text_char) {
            return Err(ProjectionError::Corrupt(format!(
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
fn decode_cursor<const N: usize>(cursor: &str) -> Result<(i64, [String; N]), ProjectionError> {
    let mut parts = cursor.split('_');
    let number = parts.next().unwrap_or_default();
    let digits = number.strip_prefix('-').unwrap_or(number);
    if digits.is_empty() || digits.len() > 19 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ProjectionError::InvalidCursor);
    }
    let number = number
        .parse::<i128>()
        .map_err(|_| ProjectionError::InvalidCursor)?
        .clamp(i128::from(i64::MIN), i128::from(i64::MAX));
    let number = i64::try_from(number).map_err(|_| ProjectionError::InvalidCursor)?;
    let texts: Vec<String> = parts.map(str::to_owned).collect();
    let texts: [String; N] = texts
        .try_into()
        .map_err(|_| ProjectionError::InvalidCursor)?;
    if texts
        .iter()
        .any(|t| t.len() > MAX_CURSOR_TEXT || !t.chars().all(cursor_text_char))
    {
        return Err(ProjectionError::InvalidCursor);
    }
    Ok((number, texts))
}

/// The conditions of a list query and their parameters, numbered as they are bound.
#[derive(Debug, Default)]
struct Conditions<'a> {
    sql: Vec<String>,
    params: Vec<Param<'a>>,
}

impl<'a> Conditions<'a> {
    /// Binds a parameter; its placeholder.
    fn bind(&mut self, param: impl Into<Param<'a>>) -> String {
        self.params.push(param.into());
        format!("${}", self.params.len())
    }

    fn push(&mut self, condition: String) {
        self.sql.push(condition);
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
async fn page<T>(
    snapshot: &mut Snapshot,
    select: &str,
    mut conditions: Conditions<'_>,
    order: &str,
    limit: usize,
    view: impl Fn(&[Option<String>]) -> Result<T, ProjectionError>,
    key: impl Fn(&T) -> Result<String, ProjectionError>,
) -> Result<Page<T>, ProjectionError> {
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

#[derive(Debug, Clone, Default, PartialEq)]
pub struct LeadFilter {
    pub status: Option<String>,
    pub owner: Option<String>,
    pub source: Option<String>,
    pub min_score: Option<i64>,
}

fn select_leads() -> String {
    format!(
        "SELECT {} FROM lead_board WHERE generation = {}",
        text_columns(&LeadRow::TABLE),
        live(lead_board::NAME)
    )
}

fn lead_row(row: &[Option<String>]) -> Result<LeadRow, ProjectionError> {
    LeadRow::read(row)
}

/// Leads matching the filter, score descending, then capture time, then id (a stable total order); keyset pagination.
pub async fn leads(
    db: &ReadDatabase,
    filter: &LeadFilter,
    limit: usize,
    cursor: Option<&str>,
) -> Result<Page<LeadRow>, ProjectionError> {
    in_snapshot!(db, |snapshot| snapshot.leads(filter, limit, cursor))
}

/// One lead of the live lead board; `None` when unknown.
pub async fn lead(db: &ReadDatabase, lead_id: &str) -> Result<Option<LeadRow>, ProjectionError> {
    in_snapshot!(db, |snapshot| snapshot.lead(lead_id))
}

impl Snapshot {
    /// Leads matching the filter (see [`leads`]).
    pub async fn leads(
        &mut self,
        filter: &LeadFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<LeadRow>, ProjectionError> {
        let mut conditions = Conditions::default();
        for (name, value) in [
            ("status", &filter.status),
            ("owner", &filter.owner),
            ("source", &filter.source),
        ] {
            if let Some(value) = value {
                let placeholder = conditions.bind(value.clone());
                conditions.push(format!("{name} = {placeholder}"));
            }
        }
        if let Some(min_score) = filter.min_score {
            let placeholder = conditions.bind(min_score);
            conditions.push(format!("score >= {placeholder}"));
        }
        if let Some(cursor) = cursor {
            let (score, [captured_at, lead_id]) = decode_cursor(cursor)?;
            let score = conditions.bind(score);
            let captured_at = conditions.bind(captured_at);
            let lead_id = conditions.bind(lead_id);
            // After the last item in (score DESC, captured_at, lead_id) order; `score <= …`
            // alone bounds the scan of the score index.
            conditions.push(format!(
            "score <= {score} AND (score < {score} OR (score = {score} AND \
             (captured_at > {captured_at} OR (captured_at = {captured_at} AND lead_id > {lead_id}))))"
        ));
        }
        page(
            self,
            &select_leads(),
            conditions,
            "score DESC, captured_at, lead_id",
            limit,
            lead_row,
            |last| encode_cursor(last.score, &[&last.captured_at, &last.lead_id]),
        )
        .await
    }

    /// One lead of the live lead board; `None` when unknown.
    pub async fn lead(&mut self, lead_id: &str) -> Result<Option<LeadRow>, ProjectionError> {
        let sql = format!("{} AND lead_id = $1", select_leads());
        self.rows(&sql, &[lead_id.into()])
            .await?
            .first()
            .map(|row| lead_row(row))
            .transpose()
    }
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
        live(deal_board::NAME)
    )
}

fn deal_row(row: &[Option<String>]) -> Result<DealRow, ProjectionError> {
    DealRow::read(row)
}

/// Deals matching the filter, in the order they were opened (opened_micros, then id); keyset pagination.
/// `stage` "won" or "lost" means deals with that status; another stage means open deals at that stage.
pub async fn deals(
    db: &ReadDatabase,
    filter: &DealFilter,
    limit: usize,
    cursor: Option<&str>,
) -> Result<Page<DealRow>, ProjectionError> {
    in_snapshot!(db, |snapshot| snapshot.deals(filter, limit, cursor))
}

/// One deal of the live deal board; `None` when unknown.
pub async fn deal(db: &ReadDatabase, deal_id: &str) -> Result<Option<DealRow>, ProjectionError> {
    in_snapshot!(db, |snapshot| snapshot.deal(deal_id))
}

impl Snapshot {
    /// Deals matching the filter (see [`deals`]).
    pub async fn deals(
        &mut self,
        filter: &DealFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<DealRow>, ProjectionError> {
        let mut conditions = Conditions::default();
        match filter.stage.as_deref() {
            Some(status @ ("won" | "lost")) => {
                let placeholder = conditions.bind(status);
                conditions.push(format!("status = {placeholder}"));
            }
            Some(stage) => {
                let placeholder = conditions.bind(stage);
                conditions.push(format!("status = 'open' AND stage = {placeholder}"));
            }
            None => {}
        }
        for (name, value) in [("owner", &filter.owner), ("account_id", &filter.account_id)] {
            if let Some(value) = value {
                let placeholder = conditions.bind(value.clone());
                conditions.push(format!("{name} = {placeholder}"));
            }
        }
        if let Some(cursor) = cursor {
            let (opened_micros, [deal_id]) = decode_cursor(cursor)?;
            let opened_micros = conditions.bind(opened_micros);
            let deal_id = conditions.bind(deal_id);
            conditions.push(format!(
                "opened_micros >= {opened_micros} AND (opened_micros > {opened_micros} OR \
             (opened_micros = {opened_micros} AND deal_id > {deal_id}))"
            ));
        }
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
    pub async fn deal(&mut self, deal_id: &str) -> Result<Option<DealRow>, ProjectionError> {
        let sql = format!("{} AND deal_id = $1", select_deals());
        self.rows(&sql, &[deal_id.into()])
            .await?
            .first()
            .map(|row| deal_row(row))
            .transpose()
    }
}
