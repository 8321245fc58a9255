//! `lead_response`: speed to lead. One row per qualified lead: when it qualified, the
//! owners the routing process gave it in turn (each marked when it let the response
//! deadline pass), and the first action on it after it was routed (recording a signal as
//! its owner, disqualifying or converting) with the owner it is credited to, or an
//! operator's assignment by hand, after which no one is credited. The response-time
//! figures are computed from these rows by `Snapshot::response_times`.
//!
//! Folded from the lead streams and the `routing` stream together (rows span streams), a
//! pure function of the log: a rebuild gives the same rows.

use std::collections::BTreeMap;

use annals_domain::lead::LeadEvent;
use annals_domain::routing::{ROUTER, RoutingEvent};
use annals_domain::values::RoutingReason;
use annals_store::{LogFilter, RecordedEvent};
use serde::{Deserialize, Serialize};

use crate::queries::{Snapshot, live};
use crate::{aggregate_id, decode, time_text};
use annals_engine::ConsumerError;
use annals_engine::row;
use annals_engine::rows::{Row, RowModel, text_columns};

/// The projection's name, and its table's.
pub const NAME: &str = "lead_response";

#[derive(Debug, Default)]
pub struct LeadResponse;

row! {
    /// A qualified lead's routing and first action.
    pub struct ResponseRow in table NAME, keyed by lead_id {
        pub lead_id: String,
        pub qualified_at: String,
        pub qualified_micros: i64,
        /// The owner it is routed to now (`None` before it is routed).
        pub owner: Option<String>,
        /// The routings, in order, as JSON: `[{"owner", "breached"}]`.
        pub routings: String,
        /// The first action, and the owner it is credited to; with no owner, an
        /// operator assigned the lead by hand first, which ends what the routing answers
        /// for (no one is credited or blamed after it).
        pub first_action_at: Option<String>,
        pub first_action_micros: Option<i64>,
        pub first_action_owner: Option<String>,
    }
    indexes {
        lead_response_qualified on ("qualified_micros"),
    }
}

/// One routing of a lead to an owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Routed {
    owner: String,
    /// The owner let the response deadline pass: the lead went to the next.
    breached: bool,
}

fn routings(row: &ResponseRow) -> Result<Vec<Routed>, ConsumerError> {
    serde_json::from_str(&row.routings)
        .map_err(|e| ConsumerError::Corrupt(format!("{NAME}.routings: {e}")))
}

impl RowModel for LeadResponse {
    type Row = ResponseRow;

    const NAME: &'static str = NAME;
    // A row folds a lead's events and the routing stream's events about it.
    const ROWS_FOLLOW_STREAMS: bool = false;

    fn filter(&self) -> LogFilter {
        LogFilter::event_types([
            "LeadQualified",
            "LeadRouted",
            "LeadAssigned",
            "SignalRecorded",
            "LeadDisqualified",
            "LeadConverted",
        ])
    }

    fn key(&self, event: &RecordedEvent) -> Result<Option<String>, ConsumerError> {
        if event.event_type == "LeadRouted" {
            return match decode::<RoutingEvent>(event)? {
                RoutingEvent::LeadRouted { lead_id, .. } => Ok(Some(lead_id.to_string())),
                RoutingEvent::RoutingRulesSet { .. } => Ok(None),
            };
        }
        Ok(Some(aggregate_id(event)))
    }

    fn fold(
        &self,
        row: Option<ResponseRow>,
        event: &RecordedEvent,
    ) -> Result<Option<ResponseRow>, ConsumerError> {
        if event.event_type == "LeadRouted" {
            let RoutingEvent::LeadRouted {
                lead_id,
                owner,
                reason,
                ..
            } = decode::<RoutingEvent>(event)?
            else {
                return Ok(row);
            };
            // Routed on qualifying, so its row is there; one is made if not.
            let mut row = row.unwrap_or_else(|| ResponseRow {
                lead_id: lead_id.to_string(),
                qualified_at: time_text(event),
                qualified_micros: event.recorded_at.timestamp_micros(),
                owner: None,
                routings: "[]".to_owned(),
                first_action_at: None,
                first_action_micros: None,
                first_action_owner: None,
            });
            let mut routed = routings(&row)?;
            if reason == RoutingReason::ResponseDeadline
                && let Some(last) = routed.last_mut()
            {
                last.breached = true;
            }
            routed.push(Routed {
                owner: owner.as_str().to_owned(),
                breached: false,
            });
            row.routings = serde_json::to_string(&routed)
                .map_err(|e| ConsumerError::Corrupt(e.to_string()))?;
            row.owner = Some(owner.as_str().to_owned());
            return Ok(Some(row));
        }
        let decoded: LeadEvent = decode(event)?;
        if let LeadEvent::LeadQualified { .. } = decoded {
            return Ok(Some(row.unwrap_or_else(|| ResponseRow {
                lead_id: aggregate_id(event),
                qualified_at: time_text(event),
                qualified_micros: event.recorded_at.timestamp_micros(),
                owner: None,
                routings: "[]".to_owned(),
                first_action_at: None,
                first_action_micros: None,
                first_action_owner: None,
            })));
        }
        // Only a routed lead's first action counts.
        let Some(mut row) = row else { return Ok(None) };
        let actor = event.metadata.actor.as_deref();
        // The router's assignment names the owner the routing answers for from then on
        // (its `LeadRouted` is recorded after it; an older build recorded it before).
        if let LeadEvent::LeadAssigned { owner, .. } = &decoded
            && actor == Some(ROUTER)
        {
            row.owner = Some(owner.as_str().to_owned());
            return Ok(Some(row));
        }
        let Some(owner) = row.owner.clone() else {
            return Ok(Some(row));
        };
        if row.first_action_at.is_some() {
            return Ok(Some(row));
        }
        let credited = match decoded {
            LeadEvent::SignalRecorded { .. } if actor == Some(owner.as_str()) => Some(Some(owner)),
            LeadEvent::LeadDisqualified { .. } | LeadEvent::LeadConverted { .. } => {
                Some(Some(owner))
            }
            // Assigned by hand: the routing answers for nothing after it.
            LeadEvent::LeadAssigned { .. } if actor != Some(ROUTER) => Some(None),
            _ => None,
        };
        if let Some(owner) = credited {
            row.first_action_at = Some(time_text(event));
            row.first_action_micros = Some(event.recorded_at.timestamp_micros());
            row.first_action_owner = owner;
        }
        Ok(Some(row))
    }
}

/// Speed to lead for one owner.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OwnerResponse {
    pub owner: String,
    /// Leads routed to the owner (a lead reassigned to them counts once more).
    pub routed: u64,
    /// Leads whose first action was the owner's.
    pub responded: u64,
    /// Seconds from qualification to the owner's first action: the median, and the 90th
    /// percentile (nearest rank); `None` when the owner responded to none.
    pub median_seconds: Option<f64>,
    pub p90_seconds: Option<f64>,
    /// Routings in which the owner let the response deadline pass.
    pub breached: u64,
}

impl Snapshot {
    /// Speed to lead per owner (in owner order), over the routed leads that qualified in
    /// `[from, to)` (microseconds; all time without them), for one owner when given.
    pub async fn response_times(
        &mut self,
        from: Option<i64>,
        to: Option<i64>,
        owner: Option<&str>,
    ) -> Result<Vec<OwnerResponse>, ConsumerError> {
        let sql = format!(
            "SELECT {} FROM {NAME} WHERE generation = {} \
                AND qualified_micros >= $1 AND qualified_micros < $2 AND owner IS NOT NULL",
            text_columns(&ResponseRow::TABLE),
            live(NAME)
        );
        let rows = self
            .rows(
                &sql,
                &[
                    from.unwrap_or(i64::MIN).into(),
                    to.unwrap_or(i64::MAX).into(),
                ],
            )
            .await?;
        tally(rows, owner)
    }
}

/// The figures per owner from the rows of `lead_response`.
fn tally(
    rows: Vec<Vec<Option<String>>>,
    owner: Option<&str>,
) -> Result<Vec<OwnerResponse>, ConsumerError> {
    #[derive(Default)]
    struct Tally {
        routed: u64,
        breached: u64,
        seconds: Vec<f64>,
    }
    let mut owners: BTreeMap<String, Tally> = BTreeMap::new();
    for values in rows {
        let row = ResponseRow::read(&values)?;
        for routed in routings(&row)? {
            let tally = owners.entry(routed.owner).or_default();
            tally.routed += 1;
            tally.breached += u64::from(routed.breached);
        }
        if let (Some(acted), Some(by)) = (row.first_action_micros, row.first_action_owner) {
            let seconds = (acted - row.qualified_micros) as f64 / 1e6;
            owners.entry(by).or_default().seconds.push(seconds);
        }
    }
    Ok(owners
        .into_iter()
        .filter(|(name, _)| owner.is_none_or(|wanted| wanted == name))
        .map(|(owner, mut tally)| {
            tally.seconds.sort_by(f64::total_cmp);
            OwnerResponse {
                owner,
                routed: tally.routed,
                responded: tally.seconds.len() as u64,
                median_seconds: median(&tally.seconds),
                p90_seconds: nearest_rank(&tally.seconds, 0.9),
                breached: tally.breached,
            }
        })
        .collect())
}

/// The median of sorted values: the middle one, or the mean of the two middle ones.
fn median(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The `p` quantile of sorted values by nearest rank: the smallest value with at least
/// `p` of the values at or below it.
fn nearest_rank(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::{median, nearest_rank};

    #[test]
    fn the_median_and_the_nearest_rank_percentile_are_the_usual_ones() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[1.0, 2.0, 3.0, 10.0]), Some(2.5));
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(nearest_rank(&ten, 0.9), Some(9.0));
        assert_eq!(nearest_rank(&ten[..1], 0.9), Some(1.0));
        let eleven: Vec<f64> = (1..=11).map(f64::from).collect();
        assert_eq!(nearest_rank(&eleven, 0.9), Some(10.0));
    }
}
