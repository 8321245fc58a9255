//! `revenue`: recurring revenue (`domain.md`, revenue figures). One row per
//! subscription: its account, its currency, and every change of its MRR in order (new,
//! expansion, contraction, churn, each with its time and signed amount). The figures per
//! currency and month, and the net and gross revenue retention of a window, are computed
//! from these rows by `figures`, a pure function, so that a month's `mrr_end` is by
//! construction its start plus its movements, and the MRR at any instant is the sum of
//! the changes before it.
//!
//! Folded from the subscription streams alone, a pure function of the log.

use std::collections::BTreeMap;

use annals_domain::subscription::SubscriptionEvent;
use annals_store::{LogFilter, RecordedEvent};
use chrono::{DateTime, Datelike, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::queries::{Snapshot, live};
use crate::{aggregate_id, decode};
use annals_engine::ConsumerError;
use annals_engine::row;
use annals_engine::rows::{Row, RowModel, text_columns};

/// The projection's name, and its table's.
pub const NAME: &str = "revenue";

#[derive(Debug, Default)]
pub struct Revenue;

row! {
    /// A subscription's MRR changes.
    pub struct RevenueRow in table NAME, keyed by subscription_id {
        pub subscription_id: String,
        pub account_id: String,
        pub currency: String,
        /// The changes as JSON, in order: `[{"at_micros", "kind", "delta_minor"}]`.
        pub changes: String,
    }
    indexes {
        revenue_currency on ("currency"),
    }
}

/// What kind of MRR change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    New,
    Expansion,
    Contraction,
    Churn,
}

/// One change of a subscription's MRR: `delta_minor` is positive for new and expansion,
/// negative for contraction and churn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MrrChange {
    pub at_micros: i64,
    pub kind: ChangeKind,
    pub delta_minor: i64,
}

/// A subscription's changes, as `figures` reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionChanges {
    pub account_id: String,
    pub currency: String,
    pub changes: Vec<MrrChange>,
}

impl RevenueRow {
    fn changes(&self) -> Result<Vec<MrrChange>, ConsumerError> {
        serde_json::from_str(&self.changes)
            .map_err(|e| ConsumerError::Corrupt(format!("{NAME}.changes: {e}")))
    }
}

impl RowModel for Revenue {
    type Row = RevenueRow;

    const NAME: &'static str = NAME;
    const ROWS_FOLLOW_STREAMS: bool = true;

    fn filter(&self) -> LogFilter {
        LogFilter::categories(["subscription"])
    }

    fn key(&self, event: &RecordedEvent) -> Result<Option<String>, ConsumerError> {
        Ok(Some(aggregate_id(event)))
    }

    fn fold(
        &self,
        row: Option<RevenueRow>,
        event: &RecordedEvent,
    ) -> Result<Option<RevenueRow>, ConsumerError> {
        let at_micros = event.recorded_at.timestamp_micros();
        let change = |kind, delta_minor| MrrChange {
            at_micros,
            kind,
            delta_minor,
        };
        let decoded: SubscriptionEvent = decode(event)?;
        let (mut row, next) = match (row, &decoded) {
            (
                _,
                SubscriptionEvent::SubscriptionStarted {
                    subscription_id,
                    account_id,
                    mrr,
                    ..
                },
            ) => (
                RevenueRow {
                    subscription_id: subscription_id.to_string(),
                    account_id: account_id.to_string(),
                    currency: mrr.currency.as_str().to_owned(),
                    changes: "[]".to_owned(),
                },
                change(ChangeKind::New, mrr.amount_minor),
            ),
            (Some(row), SubscriptionEvent::SubscriptionExpanded { from, to }) => (
                row,
                change(ChangeKind::Expansion, to.amount_minor - from.amount_minor),
            ),
            (Some(row), SubscriptionEvent::SubscriptionContracted { from, to }) => (
                row,
                change(ChangeKind::Contraction, to.amount_minor - from.amount_minor),
            ),
            (Some(row), SubscriptionEvent::SubscriptionChurned { mrr, .. }) => {
                (row, change(ChangeKind::Churn, -mrr.amount_minor))
            }
            (None, _) => {
                return Err(ConsumerError::Apply {
                    position: event.position,
                    event_type: event.event_type.clone(),
                    reason: "the subscription never started".into(),
                });
            }
        };
        let mut changes = row.changes()?;
        changes.push(next);
        row.changes =
            serde_json::to_string(&changes).map_err(|e| ConsumerError::Corrupt(e.to_string()))?;
        Ok(Some(row))
    }
}

/// One month's figures in one currency (minor units). Sums over subscriptions, each of
/// which is at most `Money::MAX_MINOR`: 128 bits hold any count of them exactly, where
/// 64 bits would wrap past some nine thousand of the largest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MonthFigures {
    /// `YYYY-MM`, UTC.
    pub month: String,
    pub mrr_start: i128,
    pub new: i128,
    pub expansion: i128,
    pub contraction: i128,
    pub churn: i128,
    pub mrr_end: i128,
}

/// The figures of one currency.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CurrencyRevenue {
    pub currency: String,
    pub months: Vec<MonthFigures>,
    /// Net revenue retention over the window; `None` when the MRR at its start is 0.
    pub nrr: Option<f64>,
    /// Gross revenue retention (no expansion counted); `None` likewise.
    pub grr: Option<f64>,
}

/// The first instant of the month of `micros` (UTC), and of the next one.
fn month_of(micros: i64) -> (DateTime<Utc>, DateTime<Utc>) {
    let at = DateTime::from_timestamp_micros(micros).unwrap_or_default();
    let start = Utc
        .with_ymd_and_hms(at.year(), at.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or_default();
    let (year, month) = if at.month() == 12 {
        (at.year() + 1, 1)
    } else {
        (at.year(), at.month() + 1)
    };
    let next = Utc
        .with_ymd_and_hms(year, month, 1, 0, 0, 0)
        .single()
        .unwrap_or_default();
    (start, next)
}

/// The MRR of the changes before `micros`.
fn mrr_before(changes: &[MrrChange], micros: i64) -> i128 {
    changes
        .iter()
        .filter(|c| c.at_micros < micros)
        .map(|c| i128::from(c.delta_minor))
        .sum()
}

/// Revenue per currency (in code order): the figures of every calendar month (UTC) the
/// window `[from, to)` touches from the month of the currency's first change up to the
/// month of `now` (or of its last change, if later): months with no revenue before and
/// none yet after are not listed. NRR and GRR are over the window (without `from`, the
/// MRR at its start is 0 and both are `None`; without `to`, the MRR now).
pub fn figures(
    subscriptions: &[SubscriptionChanges],
    from: Option<i64>,
    to: Option<i64>,
    now: i64,
) -> Vec<CurrencyRevenue> {
    let mut by_currency: BTreeMap<&str, Vec<&SubscriptionChanges>> = BTreeMap::new();
    for subscription in subscriptions {
        by_currency
            .entry(subscription.currency.as_str())
            .or_default()
            .push(subscription);
    }
    by_currency
        .into_iter()
        .map(|(currency, subscriptions)| {
            let all = subscriptions.iter().flat_map(|s| s.changes.iter());
            let earliest = all.clone().map(|c| c.at_micros).min();
            let latest = all.clone().map(|c| c.at_micros).max().map(|l| l.max(now));
            let first = earliest.map(|e| from.map_or(e, |f| f.max(e)));
            let last = latest.map(|l| to.map_or(l, |t| t.saturating_sub(1).min(l)));
            let mut months = Vec::new();
            if let (Some(first), Some(last)) = (first, last) {
                let mut month = month_of(first).0;
                while month.timestamp_micros() <= last {
                    let (start, next) = month_of(month.timestamp_micros());
                    let (start, next) = (start.timestamp_micros(), next.timestamp_micros());
                    let sum = |kind: ChangeKind| -> i128 {
                        all.clone()
                            .filter(|c| c.kind == kind && (start..next).contains(&c.at_micros))
                            .map(|c| i128::from(c.delta_minor).abs())
                            .sum()
                    };
                    let mrr_at = |micros| -> i128 {
                        subscriptions
                            .iter()
                            .map(|s| mrr_before(&s.changes, micros))
                            .sum()
                    };
                    months.push(MonthFigures {
                        month: format!("{:04}-{:02}", month.year(), month.month()),
                        mrr_start: mrr_at(start),
                        new: sum(ChangeKind::New),
                        expansion: sum(ChangeKind::Expansion),
                        contraction: sum(ChangeKind::Contraction),
                        churn: sum(ChangeKind::Churn),
                        mrr_end: mrr_at(next),
                    });
                    month = DateTime::from_timestamp_micros(next).unwrap_or_default();
                }
            }
            let (nrr, grr) = retention(&subscriptions, from, to);
            CurrencyRevenue {
                currency: currency.to_owned(),
                months,
                nrr,
                grr,
            }
        })
        .collect()
}

/// NRR and GRR over `[from, to)`: per account, its MRR at `from` and at `to`; over the
/// accounts with MRR at `from`, (Σ MRR at `to`) ÷ (Σ MRR at `from`), and the same with
/// each account's MRR at `to` capped at its MRR at `from`.
fn retention(
    subscriptions: &[&SubscriptionChanges],
    from: Option<i64>,
    to: Option<i64>,
) -> (Option<f64>, Option<f64>) {
    let Some(from) = from else {
        return (None, None);
    };
    let to = to.unwrap_or(i64::MAX);
    let mut accounts: BTreeMap<&str, (i128, i128)> = BTreeMap::new();
    for subscription in subscriptions {
        let entry = accounts
            .entry(subscription.account_id.as_str())
            .or_default();
        entry.0 += mrr_before(&subscription.changes, from);
        entry.1 += mrr_before(&subscription.changes, to);
    }
    let cohort: Vec<(i128, i128)> = accounts
        .into_values()
        .filter(|(at_from, _)| *at_from > 0)
        .collect();
    let start: i128 = cohort.iter().map(|(at_from, _)| at_from).sum();
    if start == 0 {
        return (None, None);
    }
    let net: i128 = cohort.iter().map(|(_, at_to)| at_to).sum();
    let gross: i128 = cohort
        .iter()
        .map(|(at_from, at_to)| *at_to.min(at_from))
        .sum();
    (
        Some(net as f64 / start as f64),
        Some(gross as f64 / start as f64),
    )
}

impl Snapshot {
    /// Revenue per currency for the window `[from, to)` (microseconds), one currency
    /// when given (see `figures`).
    pub async fn revenue(
        &mut self,
        from: Option<i64>,
        to: Option<i64>,
        currency: Option<&str>,
    ) -> Result<Vec<CurrencyRevenue>, ConsumerError> {
        let sql = format!(
            "SELECT {} FROM {NAME} WHERE generation = {} AND ($1 = '' OR currency = $1)",
            text_columns(&RevenueRow::TABLE),
            live(NAME)
        );
        let rows = self.rows(&sql, &[currency.unwrap_or("").into()]).await?;
        let subscriptions = rows
            .iter()
            .map(|values| {
                let row = RevenueRow::read(values)?;
                Ok(SubscriptionChanges {
                    changes: row.changes()?,
                    account_id: row.account_id,
                    currency: row.currency,
                })
            })
            .collect::<Result<Vec<_>, ConsumerError>>()?;
        Ok(figures(
            &subscriptions,
            from,
            to,
            Utc::now().timestamp_micros(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micros(text: &str) -> i64 {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_micros()
    }

    fn change(at: &str, kind: ChangeKind, delta_minor: i64) -> MrrChange {
        MrrChange {
            at_micros: micros(at),
            kind,
            delta_minor,
        }
    }

    /// A year's small history, worked out by hand:
    /// - account A: s1 starts 2026-01-10 at 100; expands to 150 on 2026-02-05; contracts
    ///   to 120 on 2026-03-20.
    /// - account B: s2 starts 2026-01-20 at 50; churns on 2026-02-25.
    /// - account C: s3 starts 2026-02-10 at 200 (after the window's start).
    ///
    /// January: start 0, new 150, end 150. February: start 150, new 200, expansion 50,
    /// churn 50, end 350. March: start 350, contraction 30, end 320.
    /// Window [2026-02-01, 2026-04-01): at its start A has 100, B 50 (C nothing): 150.
    /// At its end A has 120, B 0: NRR = 120 / 150 = 0.8; GRR = min(120, 100) + 0 = 100 /
    /// 150.
    #[test]
    fn a_history_worked_out_by_hand() {
        let history = vec![
            SubscriptionChanges {
                account_id: "A".into(),
                currency: "EUR".into(),
                changes: vec![
                    change("2026-01-10T00:00:00Z", ChangeKind::New, 100),
                    change("2026-02-05T00:00:00Z", ChangeKind::Expansion, 50),
                    change("2026-03-20T00:00:00Z", ChangeKind::Contraction, -30),
                ],
            },
            SubscriptionChanges {
                account_id: "B".into(),
                currency: "EUR".into(),
                changes: vec![
                    change("2026-01-20T00:00:00Z", ChangeKind::New, 50),
                    change("2026-02-25T00:00:00Z", ChangeKind::Churn, -50),
                ],
            },
            SubscriptionChanges {
                account_id: "C".into(),
                currency: "EUR".into(),
                changes: vec![change("2026-02-10T00:00:00Z", ChangeKind::New, 200)],
            },
        ];
        let now = micros("2026-03-31T00:00:00Z");
        let all = figures(&history, None, None, now);
        let month = |m: &str, s, n, e, c, ch, end| MonthFigures {
            month: m.into(),
            mrr_start: s,
            new: n,
            expansion: e,
            contraction: c,
            churn: ch,
            mrr_end: end,
        };
        assert_eq!(
            all[0].months,
            [
                month("2026-01", 0, 150, 0, 0, 0, 150),
                month("2026-02", 150, 200, 50, 0, 50, 350),
                month("2026-03", 350, 0, 0, 30, 0, 320),
            ]
        );
        assert_eq!((all[0].nrr, all[0].grr), (None, None), "no window start");
        let window = figures(
            &history,
            Some(micros("2026-02-01T00:00:00Z")),
            Some(micros("2026-04-01T00:00:00Z")),
            now,
        );
        // Months before the first change, and after now, are not listed.
        let wide = figures(&history, Some(0), Some(i64::MAX), now);
        assert_eq!(wide[0].months, all[0].months);
        assert_eq!(window[0].months.len(), 2, "February and March");
        assert_eq!(window[0].nrr, Some(120.0 / 150.0));
        assert_eq!(window[0].grr, Some(100.0 / 150.0));
    }

    /// Ten thousand subscriptions at the largest MRR each: the figures are exact, past
    /// what 64 bits hold (a 64-bit sum wrapped to a negative MRR in a release build).
    #[test]
    fn figures_of_many_of_the_largest_subscriptions_never_wrap() {
        let largest = annals_domain::values::Money::MAX_MINOR;
        let history: Vec<SubscriptionChanges> = (0..10_000)
            .map(|n| SubscriptionChanges {
                account_id: format!("account-{n}"),
                currency: "EUR".into(),
                changes: vec![change("2026-01-10T00:00:00Z", ChangeKind::New, largest)],
            })
            .collect();
        let now = micros("2026-02-15T00:00:00Z");
        let expected = 10_000 * i128::from(largest);
        assert!(expected > i128::from(i64::MAX));
        let revenue = figures(&history, None, None, now);
        let [january, february] = &revenue[0].months[..] else {
            panic!("two months: {:?}", revenue[0].months);
        };
        assert_eq!((january.new, january.mrr_end), (expected, expected));
        assert_eq!((february.mrr_start, february.mrr_end), (expected, expected));
        let window = figures(&history, Some(micros("2026-02-01T00:00:00Z")), None, now);
        assert_eq!((window[0].nrr, window[0].grr), (Some(1.0), Some(1.0)));
    }

    mod against_a_direct_fold {
        use annals_domain::subscription::{Subscription, SubscriptionCommand};
        use annals_domain::values::Money;
        use annals_domain::{Aggregate, Event};
        use annals_store::Metadata;
        use proptest::prelude::*;
        use uuid::Uuid;

        use super::*;

        /// What a step of a random history asks: by subscription, a command, days later.
        #[derive(Debug, Clone)]
        enum Step {
            Start { account: u8, mrr: i64 },
            Expand { by: i64 },
            Contract { by: i64 },
            Churn,
        }

        fn step() -> impl Strategy<Value = (u8, Step, u32)> {
            let command = prop_oneof![
                (0u8..4, 1i64..1_000).prop_map(|(account, mrr)| Step::Start { account, mrr }),
                (1i64..500).prop_map(|by| Step::Expand { by }),
                (1i64..500).prop_map(|by| Step::Contract { by }),
                Just(Step::Churn),
            ];
            (0u8..6, command, 0u32..40)
        }

        const DAY: i64 = 86_400_000_000;

        proptest! {
            /// Random histories of up to six subscriptions over about a year: the
            /// read model's rows and `figures` give, for every month, the MRR at its
            /// start and end that the domain's own states give at those instants, and
            /// the flows that the events say; and NRR/GRR as per-account sums of those
            /// states.
            #[test]
            fn revenue_equals_a_direct_fold_of_the_subscriptions(
                steps in proptest::collection::vec(step(), 1..60),
                window in (0i64..400, 1i64..200),
            ) {
                let start = micros("2026-01-01T00:00:00Z");
                let mut now = start;
                let mut states: BTreeMap<u8, (Subscription, u64)> = BTreeMap::new();
                // (subscription, time, event) in log order.
                let mut log: Vec<(u8, i64, SubscriptionEvent)> = Vec::new();
                for (n, step, days) in steps {
                    // Half days from midnight: events fall on month starts and window
                    // bounds too, where "before" and "at" differ.
                    now += i64::from(days) * DAY / 2;
                    let (state, version) = states.entry(n).or_default().clone();
                    let mrr = |amount| Money::parse("EUR", amount).unwrap();
                    let current = state.mrr.as_ref().map_or(0, |m| m.amount_minor);
                    let command = match step {
                        Step::Start { account, mrr: amount } => SubscriptionCommand::Start {
                            subscription_id: Uuid::from_u128(u128::from(n) + 1),
                            account_id: Uuid::from_u128(u128::from(account) + 100),
                            order_id: Uuid::from_u128(u128::from(n) + 1_000),
                            mrr: mrr(amount),
                        },
                        Step::Expand { by } => SubscriptionCommand::Expand { mrr: mrr(current + by) },
                        Step::Contract { by } => SubscriptionCommand::Contract { mrr: mrr((current - by).max(0)) },
                        Step::Churn => SubscriptionCommand::Churn { reason: None },
                    };
                    let Ok(events) = state.decide(command) else { continue };
                    let mut next = state;
                    for event in &events {
                        next = next.evolve(event);
                        log.push((n, now, event.clone()));
                    }
                    states.insert(n, (next, version + events.len() as u64));
                }

                // The read model: each event folded into its subscription's row.
                let mut rows: BTreeMap<u8, RevenueRow> = BTreeMap::new();
                for (position, (n, at, event)) in log.iter().enumerate() {
                    let stored = event.encode();
                    let recorded = RecordedEvent {
                        position: position as u64 + 1,
                        stream: format!("subscription-{}", Uuid::from_u128(u128::from(*n) + 1)),
                        version: 0,
                        event_id: Uuid::from_u128(position as u128),
                        event_type: stored.event_type,
                        schema_version: stored.schema_version,
                        data: stored.data,
                        metadata: Metadata::default(),
                        recorded_at: DateTime::from_timestamp_micros(*at).unwrap(),
                        hash: [0; 32],
                    };
                    let row = Revenue.fold(rows.remove(n), &recorded).unwrap().unwrap();
                    rows.insert(*n, row);
                }
                let subscriptions: Vec<SubscriptionChanges> = rows
                    .values()
                    .map(|row| SubscriptionChanges {
                        account_id: row.account_id.clone(),
                        currency: row.currency.clone(),
                        changes: row.changes().unwrap(),
                    })
                    .collect();
                let from = start + window.0 * DAY;
                let to = from + window.1 * DAY;
                let computed = figures(&subscriptions, Some(from), Some(to), i64::MAX);

                // The direct fold: each subscription's domain state as of an instant.
                let state_at = |n: u8, micros: i64| -> Subscription {
                    let events: Vec<&SubscriptionEvent> = log
                        .iter()
                        .filter(|(m, at, _)| *m == n && *at < micros)
                        .map(|(_, _, e)| e)
                        .collect();
                    Subscription::default().replay(events)
                };
                let active_mrr = |s: &Subscription| -> i64 {
                    if s.status == annals_domain::subscription::SubscriptionStatus::Active {
                        s.mrr.as_ref().map_or(0, |m| m.amount_minor)
                    } else {
                        0
                    }
                };
                let mrr_at = |micros: i64| -> i128 {
                    states.keys().map(|n| i128::from(active_mrr(&state_at(*n, micros)))).sum()
                };
                if log.is_empty() {
                    prop_assert!(computed.is_empty());
                    return Ok(());
                }
                prop_assert_eq!(computed.len(), 1);
                let eur = &computed[0];
                for month in &eur.months {
                    let first = micros(&format!("{}-01T00:00:00Z", month.month));
                    let (_, next) = month_of(first);
                    let next = next.timestamp_micros();
                    let mut flows = [0i128; 4];
                    for (_, at, event) in &log {
                        if !(first..next).contains(at) {
                            continue;
                        }
                        match event {
                            SubscriptionEvent::SubscriptionStarted { mrr, .. } => flows[0] += i128::from(mrr.amount_minor),
                            SubscriptionEvent::SubscriptionExpanded { from, to } => flows[1] += i128::from(to.amount_minor - from.amount_minor),
                            SubscriptionEvent::SubscriptionContracted { from, to } => flows[2] += i128::from(from.amount_minor - to.amount_minor),
                            SubscriptionEvent::SubscriptionChurned { mrr, .. } => flows[3] += i128::from(mrr.amount_minor),
                        }
                    }
                    prop_assert_eq!(month.mrr_start, mrr_at(first), "{}", month.month);
                    prop_assert_eq!(month.mrr_end, mrr_at(next), "{}", month.month);
                    prop_assert_eq!(
                        [month.new, month.expansion, month.contraction, month.churn],
                        flows,
                        "{}",
                        month.month
                    );
                    prop_assert_eq!(
                        month.mrr_end,
                        month.mrr_start + month.new + month.expansion - month.contraction - month.churn
                    );
                }
                // NRR and GRR from the domain's states, per account.
                let mut accounts: BTreeMap<Uuid, (i64, i64)> = BTreeMap::new();
                for n in states.keys() {
                    let (at_from, at_to) = (state_at(*n, from), state_at(*n, to));
                    let account = at_to.account_id.or(at_from.account_id);
                    if let Some(account) = account {
                        let entry = accounts.entry(account).or_default();
                        entry.0 += active_mrr(&at_from);
                        entry.1 += active_mrr(&at_to);
                    }
                }
                let cohort: Vec<(i64, i64)> = accounts.into_values().filter(|(f, _)| *f > 0).collect();
                let base: i64 = cohort.iter().map(|(f, _)| f).sum();
                let expected = (base > 0).then(|| {
                    let net: i64 = cohort.iter().map(|(_, t)| t).sum();
                    let gross: i64 = cohort.iter().map(|(f, t)| *t.min(f)).sum();
                    (net as f64 / base as f64, gross as f64 / base as f64)
                });
                prop_assert_eq!(eur.nrr.zip(eur.grr), expected);
            }
        }
    }
}
