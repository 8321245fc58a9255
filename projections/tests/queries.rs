//! The list and lookup queries over the live boards, on both backends: keyset pages that
//! visit every row once in the board's order, filters, lookups, and cursors that are
//! refused when they are not the server's.

// A test that cannot go on should stop loudly; `unwrap` says so shortest.
#![allow(clippy::unwrap_used)]

#[macro_use]
#[path = "../../tests/support/database.rs"]
mod database;

use std::sync::Arc;

use annals_commands::{CommandContext, CommandHandler, HandlerConfig};
use annals_domain::deal::{Deal, DealCommand};
use annals_domain::lead::{Lead, LeadCommand};
use annals_domain::values::*;
use annals_projections::deal_board::DealBoard;
use annals_projections::deal_board::DealRow;
use annals_projections::lead_board::LeadBoard;
use annals_projections::lead_board::LeadRow;
use annals_projections::queries::{self, DealFilter, LeadFilter, Page};
use annals_projections::{ProjectionError, ProjectionRunner, Projector, ReadDatabase};
use database::Fixture;
use uuid::Uuid;

on_both_backends!(
    paging_through_leads_visits_each_once_in_score_capture_id_order,
    lead_filters_narrow_the_list_and_lead_looks_one_up,
    paging_and_filtering_deals_follow_the_opening_order,
    a_cursor_that_is_not_the_server_s_is_refused,
    a_rebuild_reports_its_progress,
);

fn read_database(db: &Fixture) -> ReadDatabase {
    match db {
        Fixture::Sqlite { store, .. } => ReadDatabase::sqlite(store),
        Fixture::Postgres { store, .. } => ReadDatabase::postgres(store),
    }
}

fn runner(db: &Fixture, projector: Arc<dyn Projector>) -> ProjectionRunner {
    ProjectionRunner::new(db.store(), read_database(db), projector)
}

fn context() -> CommandContext {
    CommandContext {
        actor: "test".into(),
        ..CommandContext::default()
    }
}

/// A lead as the history below leaves it.
#[derive(Debug, Clone)]
struct ExpectedLead {
    id: String,
    score: i64,
    status: &'static str,
    owner: Option<&'static str>,
    source: &'static str,
}

const LEADS: usize = 15;

fn lead_owner(n: usize) -> Option<&'static str> {
    match n % 3 {
        0 => Some("alice"),
        1 => Some("bob"),
        _ => None,
    }
}

/// Fifteen leads: scores with ties (pricing-page views, two demo requests qualifying
/// every fifth), owners alice/bob/none, every source, one disqualified.
async fn lead_history(db: &Fixture) -> Vec<ExpectedLead> {
    let handler = CommandHandler::<Lead>::new(db.store(), HandlerConfig::default());
    let leads = &handler;
    let run = move |id: Uuid, command: LeadCommand| async move {
        leads.execute(id, command, &context()).await.unwrap();
    };
    // Random ids: their order is not the capture order, so the tie-breaks differ.
    let ids: Vec<Uuid> = (0..LEADS).map(|_| Uuid::new_v4()).collect();
    for (n, id) in ids.iter().enumerate() {
        let capture = LeadCommand::Capture {
            lead_id: *id,
            email: Email::parse(&format!("{}@example.com", id.simple())).unwrap(),
            name: PersonName::parse("Ada").unwrap(),
            company: n.is_multiple_of(2).then(|| Label::parse("Acme").unwrap()),
            source: Source::ALL[n % Source::ALL.len()],
        };
        run(*id, capture).await;
    }
    let mut expected = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        let signal = |kind| LeadCommand::RecordSignal {
            kind,
            occurred_at: None,
        };
        for _ in 0..n % 4 {
            run(*id, signal(SignalKind::PricingPageView)).await;
        }
        let qualified = n.is_multiple_of(5);
        if qualified {
            for _ in 0..2 {
                run(*id, signal(SignalKind::DemoRequest)).await;
            }
        }
        if let Some(owner) = lead_owner(n) {
            let owner = Owner::parse(owner).unwrap();
            run(*id, LeadCommand::Assign { owner }).await;
        }
        let disqualified = n == 7;
        if disqualified {
            let reason = Reason::parse("spam").unwrap();
            run(*id, LeadCommand::Disqualify { reason }).await;
        }
        expected.push(ExpectedLead {
            id: id.to_string(),
            score: 10 * (n % 4) as i64 + if qualified { 50 } else { 0 },
            status: match () {
                () if disqualified => "disqualified",
                () if qualified => "qualified",
                () if lead_owner(n).is_some() => "working",
                () => "new",
            },
            owner: lead_owner(n),
            source: Source::ALL[n % Source::ALL.len()].as_str(),
        });
    }
    runner(db, Arc::new(LeadBoard))
        .with_batch_size(7)
        .catch_up()
        .await
        .unwrap();
    expected
}

/// Every lead, a page of `limit` at a time; checks that only the last page is short and
/// only it has no cursor.
async fn all_leads(read: &ReadDatabase, filter: &LeadFilter, limit: usize) -> Vec<LeadRow> {
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..=LEADS {
        let Page { items, next_cursor } = queries::leads(read, filter, limit, cursor.as_deref())
            .await
            .unwrap();
        assert!(items.len() <= limit);
        seen.extend(items.iter().cloned());
        match next_cursor {
            Some(next) => {
                assert_eq!(items.len(), limit, "only the last page is short");
                cursor = Some(next);
            }
            None => return seen,
        }
    }
    panic!("paging never ended");
}

/// The ids of the expected leads that `keep` picks, in the board's order.
async fn expected_order(
    read: &ReadDatabase,
    leads: &[ExpectedLead],
    keep: impl Fn(&ExpectedLead) -> bool,
) -> Vec<String> {
    let mut picked = Vec::new();
    for lead in leads.iter().filter(|l| keep(l)) {
        let captured_at = queries::lead(read, &lead.id)
            .await
            .unwrap()
            .unwrap()
            .captured_at;
        picked.push((-lead.score, captured_at, lead.id.clone()));
    }
    picked.sort();
    picked.into_iter().map(|(_, _, id)| id).collect()
}

fn ids(views: &[LeadRow]) -> Vec<String> {
    views.iter().map(|v| v.lead_id.clone()).collect()
}

async fn paging_through_leads_visits_each_once_in_score_capture_id_order(db: Arc<Fixture>) {
    let leads = lead_history(&db).await;
    let read = read_database(&db);
    let everyone = expected_order(&read, &leads, |_| true).await;
    assert_eq!(everyone.len(), LEADS);
    // Ties on score are broken by capture time: some scores repeat in this history.
    let mut scores: Vec<i64> = leads.iter().map(|l| l.score).collect();
    scores.sort();
    scores.dedup();
    assert!(scores.len() < LEADS);
    // 4 does not divide 15 (a short last page); 5 does (the last full page is the last).
    for limit in [1, 4, 5, LEADS, 500] {
        let seen = all_leads(&read, &LeadFilter::default(), limit).await;
        assert_eq!(ids(&seen), everyone, "limit {limit}");
    }
    let first = queries::leads(&read, &LeadFilter::default(), 5, None)
        .await
        .unwrap();
    assert!(first.next_cursor.is_some());
    let scores: Vec<i64> = first.items.iter().map(|v| v.score).collect();
    assert!(scores.is_sorted_by(|a, b| a >= b), "{scores:?}");
    // A limit outside 1–500 is clamped, not an error.
    let none = queries::leads(&read, &LeadFilter::default(), 0, None)
        .await
        .unwrap();
    assert_eq!(none.items.len(), 1);
}

async fn lead_filters_narrow_the_list_and_lead_looks_one_up(db: Arc<Fixture>) {
    let leads = lead_history(&db).await;
    let read = read_database(&db);
    let by = |filter: LeadFilter| {
        let read = read.clone();
        async move { ids(&all_leads(&read, &filter, 3).await) }
    };
    for status in ["new", "working", "qualified", "disqualified"] {
        let filter = LeadFilter {
            status: Some(status.into()),
            ..LeadFilter::default()
        };
        let expected = expected_order(&read, &leads, |l| l.status == status).await;
        assert!(!expected.is_empty(), "{status}");
        assert_eq!(by(filter).await, expected, "status {status}");
    }
    for owner in ["alice", "bob"] {
        let filter = LeadFilter {
            owner: Some(owner.into()),
            ..LeadFilter::default()
        };
        let expected = expected_order(&read, &leads, |l| l.owner == Some(owner)).await;
        assert_eq!(by(filter).await, expected, "owner {owner}");
    }
    for source in Source::ALL.iter().map(|s| s.as_str()) {
        let filter = LeadFilter {
            source: Some(source.into()),
            ..LeadFilter::default()
        };
        let expected = expected_order(&read, &leads, |l| l.source == source).await;
        assert_eq!(by(filter).await, expected, "source {source}");
    }
    for min_score in [0, 20, 30, 60, 1_000] {
        let filter = LeadFilter {
            min_score: Some(min_score),
            ..LeadFilter::default()
        };
        let expected = expected_order(&read, &leads, |l| l.score >= min_score).await;
        assert_eq!(by(filter).await, expected, "min_score {min_score}");
    }
    let combined = LeadFilter {
        status: Some("working".into()),
        owner: Some("bob".into()),
        source: None,
        min_score: Some(10),
    };
    let expected = expected_order(&read, &leads, |l| {
        l.status == "working" && l.owner == Some("bob") && l.score >= 10
    })
    .await;
    assert!(!expected.is_empty());
    assert_eq!(by(combined).await, expected);
    // User text is a parameter, never SQL.
    let hostile = LeadFilter {
        owner: Some("x' OR '1'='1".into()),
        ..LeadFilter::default()
    };
    assert!(by(hostile).await.is_empty());

    let one = &leads[5];
    let view = queries::lead(&read, &one.id).await.unwrap().unwrap();
    assert_eq!(
        (
            view.lead_id.as_str(),
            view.score,
            view.status.as_str(),
            view.owner.as_deref(),
            view.source.as_str(),
        ),
        (
            one.id.as_str(),
            one.score,
            one.status,
            one.owner,
            one.source
        )
    );
    assert!(view.qualified_at.is_some() && view.converted_deal_id.is_none());
    assert_eq!(
        view.email,
        format!("{}@example.com", one.id.replace('-', ""))
    );
    assert_eq!(
        queries::lead(&read, &Uuid::now_v7().to_string())
            .await
            .unwrap(),
        None
    );
    assert_eq!(queries::lead(&read, "'; --").await.unwrap(), None);
}

/// A deal as the history below leaves it.
#[derive(Debug, Clone)]
struct ExpectedDeal {
    id: String,
    account_id: String,
    owner: Option<&'static str>,
    stage: &'static str,
    status: &'static str,
}

const DEALS: usize = 10;

/// Ten deals on two accounts, in opening order: owners alice/bob/none, advanced to
/// various stages; two won, one lost (after reaching demo).
async fn deal_history(db: &Fixture) -> Vec<ExpectedDeal> {
    let handler = CommandHandler::<Deal>::new(db.store(), HandlerConfig::default());
    let deals = &handler;
    let run = move |id: Uuid, command: DealCommand| async move {
        deals.execute(id, command, &context()).await.unwrap();
    };
    let accounts = [Uuid::now_v7(), Uuid::now_v7()];
    let mut expected = Vec::new();
    for m in 0..DEALS {
        // Random ids: their order is not the opening order.
        let id = Uuid::new_v4();
        let owner = lead_owner(m);
        let open = DealCommand::Open {
            deal_id: id,
            account_id: accounts[m % 2],
            account_exists: true,
            name: Name::parse(&format!("Deal {m}")).unwrap(),
            amount: Money::parse("EUR", 100 * (m as i64 + 1)).unwrap(),
            owner: owner.map(|o| Owner::parse(o).unwrap()),
            expected_close: None,
        };
        run(id, open).await;
        let stage = Stage::ALL[m % 4];
        if stage != Stage::Prospecting {
            run(id, DealCommand::Advance { stage }).await;
        }
        let status = match m {
            3 | 9 => "won",
            6 => "lost",
            _ => "open",
        };
        if status == "won" {
            run(id, DealCommand::Win).await;
        }
        if status == "lost" {
            let reason = Reason::parse("price").unwrap();
            run(id, DealCommand::Lose { reason }).await;
        }
        expected.push(ExpectedDeal {
            id: id.to_string(),
            account_id: accounts[m % 2].to_string(),
            owner,
            stage: stage.as_str(),
            status,
        });
    }
    runner(db, Arc::new(DealBoard))
        .with_batch_size(4)
        .catch_up()
        .await
        .unwrap();
    expected
}

async fn all_deals(read: &ReadDatabase, filter: &DealFilter, limit: usize) -> Vec<DealRow> {
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..=DEALS {
        let Page { items, next_cursor } = queries::deals(read, filter, limit, cursor.as_deref())
            .await
            .unwrap();
        seen.extend(items.iter().cloned());
        match next_cursor {
            Some(next) => {
                assert_eq!(items.len(), limit, "only the last page is short");
                cursor = Some(next);
            }
            None => return seen,
        }
    }
    panic!("paging never ended");
}

async fn paging_and_filtering_deals_follow_the_opening_order(db: Arc<Fixture>) {
    let deals = deal_history(&db).await;
    let read = read_database(&db);
    let deal_ids = |views: Vec<DealRow>| views.into_iter().map(|v| v.deal_id).collect::<Vec<_>>();
    let expected = |keep: &dyn Fn(&ExpectedDeal) -> bool| {
        deals
            .iter()
            .filter(|d| keep(d))
            .map(|d| d.id.clone())
            .collect::<Vec<_>>()
    };
    let everyone = expected(&|_| true);
    for limit in [1, 3, 5, DEALS, 500] {
        let seen = all_deals(&read, &DealFilter::default(), limit).await;
        assert_eq!(deal_ids(seen), everyone, "limit {limit}");
    }
    let by = |filter: DealFilter| {
        let read = read.clone();
        async move { deal_ids(all_deals(&read, &filter, 2).await) }
    };
    let stage = |stage: &str| DealFilter {
        stage: Some(stage.into()),
        ..DealFilter::default()
    };
    for status in ["won", "lost"] {
        let want = expected(&|d| d.status == status);
        assert!(!want.is_empty());
        assert_eq!(by(stage(status)).await, want, "{status}");
    }
    for open in Stage::ALL.iter().map(|s| s.as_str()) {
        let want = expected(&|d| d.status == "open" && d.stage == open);
        assert_eq!(by(stage(open)).await, want, "stage {open}");
    }
    // The lost deal reached demo but is not an open deal at demo.
    assert_eq!(by(stage("demo")).await.len(), 1);
    for owner in ["alice", "bob"] {
        let filter = DealFilter {
            owner: Some(owner.into()),
            ..DealFilter::default()
        };
        assert_eq!(by(filter).await, expected(&|d| d.owner == Some(owner)));
    }
    for account in [&deals[0].account_id, &deals[1].account_id] {
        let filter = DealFilter {
            account_id: Some(account.clone()),
            ..DealFilter::default()
        };
        let want = expected(&|d| &d.account_id == account);
        assert_eq!(want.len(), DEALS / 2);
        assert_eq!(by(filter).await, want);
    }
    let combined = DealFilter {
        stage: Some("won".into()),
        owner: Some("alice".into()),
        account_id: Some(deals[3].account_id.clone()),
    };
    assert_eq!(
        by(combined).await,
        vec![deals[3].id.clone(), deals[9].id.clone()]
    );

    let lost = &deals[6];
    let view = queries::deal(&read, &lost.id).await.unwrap().unwrap();
    assert_eq!(
        (
            view.stage.as_str(),
            view.status.as_str(),
            view.currency.as_str(),
            view.amount_minor,
            view.owner.as_deref(),
            view.lost_reason.as_deref(),
            view.account_id.as_str(),
        ),
        (
            "demo",
            "lost",
            "EUR",
            700,
            Some("alice"),
            Some("price"),
            lost.account_id.as_str()
        )
    );
    assert_eq!(view.name, "Deal 6");
    assert!(view.closed_at.is_some());
    let open = queries::deal(&read, &deals[2].id).await.unwrap().unwrap();
    assert_eq!((open.closed_at, open.owner), (None, None));
    assert_eq!(
        queries::deal(&read, &Uuid::now_v7().to_string())
            .await
            .unwrap(),
        None
    );
}

async fn a_cursor_that_is_not_the_server_s_is_refused(db: Arc<Fixture>) {
    lead_history(&db).await;
    deal_history(&db).await;
    let read = read_database(&db);
    let lead_cursor = queries::leads(&read, &LeadFilter::default(), 2, None)
        .await
        .unwrap()
        .next_cursor
        .unwrap();
    let deal_cursor = queries::deals(&read, &DealFilter::default(), 2, None)
        .await
        .unwrap()
        .next_cursor
        .unwrap();
    // The form is `queries::LEAD_CURSOR_PATTERN`'s (the OpenAPI document states it).
    let garbage = [
        String::new(),
        "zz".into(),
        "abc".into(),
        "not a cursor at all".into(),
        "1".into(),
        "1_a".into(),
        "1_a_b_c".into(),
        "+1_a_b".into(),
        "1.5_a_b".into(),
        "_a_b".into(),
        "12345678901234567890_a_b".into(),
        "1_a\u{0}_b".into(),
        "1_a b_c".into(),
        "1_a%_c".into(),
        format!("1_{}_b", "a".repeat(65)),
        "0".repeat(100_000),
        format!("{lead_cursor}_00"),
        deal_cursor.clone(),
    ];
    for cursor in &garbage {
        let refused = queries::leads(&read, &LeadFilter::default(), 2, Some(cursor)).await;
        assert!(
            matches!(refused, Err(ProjectionError::InvalidCursor)),
            "leads with {cursor:.40}: {refused:?}"
        );
    }
    let garbage = [
        "zz".into(),
        "1".into(),
        "1_2_3".into(),
        "1_\u{0}".into(),
        lead_cursor.clone(),
    ];
    for cursor in &garbage {
        let refused = queries::deals(&read, &DealFilter::default(), 2, Some(cursor)).await;
        assert!(
            matches!(refused, Err(ProjectionError::InvalidCursor)),
            "deals with {cursor:.40}: {refused:?}"
        );
    }
    let message = ProjectionError::InvalidCursor.to_string();
    assert_eq!(message, "the cursor is not one this server gave out");
    // A cursor of the documented form is served, even one no page ended on: a number
    // past i64's range stands for its end, and empty text sorts first.
    for forged in [
        "1000000__",
        "9999999999999999999__",
        "-9999999999999999999_z_z",
    ] {
        let page = queries::leads(&read, &LeadFilter::default(), 500, Some(forged))
            .await
            .unwrap();
        assert_eq!(
            page.items.len(),
            if forged.starts_with('-') { 0 } else { LEADS },
            "{forged}"
        );
    }
    let page = queries::deals(
        &read,
        &DealFilter::default(),
        500,
        Some("-9999999999999999999_"),
    )
    .await
    .unwrap();
    assert!(!page.items.is_empty());
}

async fn a_rebuild_reports_its_progress(db: Arc<Fixture>) {
    lead_history(&db).await;
    let board = runner(&db, Arc::new(LeadBoard));
    let progress = board.progress();
    assert_eq!(*progress.borrow(), 0);
    board.rebuild().await.unwrap();
    let head = db.store().head().await.unwrap();
    assert_eq!(*progress.borrow(), head);
    assert_eq!(*board.progress().borrow(), head);
    board.verify().await.unwrap();
    assert_eq!(*progress.borrow(), head);
}
