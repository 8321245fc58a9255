//! The order saga end to end over HTTP, with the payment deadline shortened to two
//! seconds: placed → invoiced → paid → subscription started → fulfilled; an unpaid order
//! cancelled at its deadline (its invoice voided) and a late payment refused; the saga
//! across kill -9, each step once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use annals_consumers::processes::order_saga::{invoice_id, subscription_id};
use serde_json::{Value, json};

use crate::database::Fixture;
use crate::server::{Server, won_deal};

on_both_backends!(
    an_order_goes_from_placed_to_a_running_subscription,
    an_unpaid_order_is_cancelled_at_its_deadline_and_a_late_payment_refused,
    the_saga_finishes_each_order_once_across_kill_9,
);

fn with_timeout() -> [(&'static str, &'static str); 2] {
    [
        ("ANNALS_API_TOKENS", crate::server::TOKENS),
        ("ANNALS_PAYMENT_TIMEOUT", "2s"),
    ]
}

/// An order for `deal`: two engines at 500.00, and support at 99.00 a month.
async fn placed(server: &Server, deal: &str) -> String {
    let order = server
        .command(
            "/orders",
            json!({"deal_id": deal, "lines": [
                {"sku": "ENGINE-1", "quantity": 2, "unit_price": {"currency": "EUR", "amount_minor": 50000}},
                {"sku": "SUPPORT", "quantity": 1, "unit_price": {"currency": "EUR", "amount_minor": 9900}, "recurring": true},
            ]}),
        )
        .await;
    order["id"].as_str().unwrap().to_owned()
}

const TOTAL: i64 = 109_900;

/// The state of an aggregate from its history, once `ready` says it is as awaited.
async fn state_when(server: &Server, path: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = server.get(path).await;
        if answer.status == 200 && ready(&answer.body["state"]) {
            return answer.body["state"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "{path}: {}\n{}",
            answer.body,
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn events_of(db: &Fixture, event_type: &str) -> Vec<annals_store::RecordedEvent> {
    db.store()
        .read_all(
            1,
            100_000,
            &annals_store::LogFilter::event_types([event_type]),
        )
        .await
        .unwrap()
        .events
}

async fn an_order_goes_from_placed_to_a_running_subscription(db: Arc<Fixture>) {
    let server = Server::start(db.url());
    let deal = won_deal(&server).await;
    let order = placed(&server, &deal).await;
    let history = format!("/orders/{order}/history");
    let invoiced = state_when(&server, &history, |s| s["status"] == "invoiced").await;
    assert_eq!(
        invoiced["total"],
        json!({"currency": "EUR", "amount_minor": TOTAL})
    );
    let order_id: uuid::Uuid = order.parse().unwrap();
    assert_eq!(invoiced["invoice_id"], json!(invoice_id(order_id)));
    // The saga sets the payment deadline once it takes the invoice (an order paid before
    // then needs none): wait for it, so that its stop is seen below.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while events_of(&db, "TimerScheduled").await.is_empty() {
        assert!(std::time::Instant::now() < until, "no deadline set");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // A payment of another amount is refused; the total is taken.
    let short = server
        .post(
            &format!("/orders/{order}/pay"),
            json!({"amount": {"currency": "EUR", "amount_minor": TOTAL - 1}}),
        )
        .await;
    assert_eq!((short.status, short.code()), (422, "amount-mismatch"));
    server
        .command(
            &format!("/orders/{order}/pay"),
            json!({"amount": {"currency": "EUR", "amount_minor": TOTAL}}),
        )
        .await;
    let fulfilled = state_when(&server, &history, |s| s["status"] == "fulfilled").await;
    assert_eq!(fulfilled["paid"]["amount_minor"], TOTAL);
    let subscription = subscription_id(order_id);
    let running = state_when(
        &server,
        &format!("/subscriptions/{subscription}/history"),
        |s| s["status"] == "active",
    )
    .await;
    assert_eq!(
        running["mrr"],
        json!({"currency": "EUR", "amount_minor": 9900})
    );
    assert_eq!(running["order_id"], json!(order_id));

    // Each step once, each caused by the one before: the saga's events name their cause.
    let started = events_of(&db, "SubscriptionStarted").await;
    let payments = events_of(&db, "PaymentReceived").await;
    assert_eq!((started.len(), payments.len()), (1, 1));
    assert_eq!(
        started[0].metadata.causation_id.as_deref(),
        Some(payments[0].event_id.to_string().as_str())
    );
    assert_eq!(
        events_of(&db, "TimerCancelled").await.len(),
        1,
        "the deadline stopped"
    );

    // The order board shows the saga's steps, each done.
    let view = state_of_order(&server, &order, |o| o["status"] == "fulfilled").await;
    let steps: Vec<(String, String)> = view["saga"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["step"].as_str().unwrap().to_owned(),
                s["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let done = |step: &str| (step.to_owned(), "done".to_owned());
    assert_eq!(
        steps,
        [
            done("place"),
            done("invoice"),
            done("payment"),
            done("subscription"),
            done("fulfil")
        ],
        "{view}"
    );
    assert_eq!(view["subscription_id"], json!(subscription));
    assert_eq!(
        view["total"],
        json!({"currency": "EUR", "amount_minor": TOTAL})
    );
    assert_eq!(view["recurring_total"]["amount_minor"], 9900);
    assert_eq!(view["lines"].as_array().unwrap().len(), 2);
    let fulfilled = server.read("/orders?status=fulfilled").await;
    assert_eq!(
        fulfilled["items"].as_array().unwrap().len(),
        1,
        "{fulfilled}"
    );
    let account = view["account_id"].as_str().unwrap();
    let of_account = server.read(&format!("/orders?account_id={account}")).await;
    assert_eq!(of_account["items"][0]["id"], json!(order));
    let bad = server.get("/orders?status=shipped").await;
    assert_eq!(bad.status, 422);
    // The account's view gains its orders and its MRR now.
    let account_view = state_of(&server, &format!("/accounts/{account}"), |a| {
        a["mrr"] == json!([{"currency": "EUR", "amount_minor": 9900}])
    })
    .await;
    assert_eq!(
        account_view["orders"][0]["id"],
        json!(order),
        "{account_view}"
    );
    assert_eq!(
        account_view["orders"][0]["status"], "fulfilled",
        "{account_view}"
    );

    // The subscription expands, contracts and churns over HTTP.
    let path = |action: &str| format!("/subscriptions/{subscription}/{action}");
    let mrr = |amount_minor: i64| json!({"mrr": {"currency": "EUR", "amount_minor": amount_minor}});
    server.command(&path("expand"), mrr(19_900)).await;
    let lower = server.post(&path("expand"), mrr(10_000)).await;
    assert_eq!(lower.status, 409, "{:?}", lower.body);
    server.command(&path("contract"), mrr(14_900)).await;
    let churn = server
        .command(&path("churn"), json!({"reason": "budget"}))
        .await;
    let again = server.post(&path("churn"), json!({})).await;
    assert_eq!(again.status, 409, "{:?}", again.body);

    // The subscription board: churned, with the MRR lost; by account and by status.
    let position = churn["position"].as_u64().unwrap();
    let board = server
        .read(&format!(
            "/subscriptions/{subscription}?min_position={position}"
        ))
        .await;
    assert_eq!(board["status"], "churned", "{board}");
    assert_eq!(
        board["mrr"],
        json!({"currency": "EUR", "amount_minor": 14_900})
    );
    assert_eq!(board["order_id"], json!(order));
    assert!(board["churned_at"].is_string(), "{board}");
    let of_account = server
        .read(&format!(
            "/subscriptions?account_id={account}&min_position={position}"
        ))
        .await;
    assert_eq!(
        of_account["items"][0]["id"],
        json!(subscription),
        "{of_account}"
    );
    let active = server
        .read(&format!(
            "/subscriptions?status=active&min_position={position}"
        ))
        .await;
    assert_eq!(active["items"], json!([]), "{active}");
    assert_eq!(server.get("/subscriptions?status=paused").await.status, 422);

    // Recurring revenue: 99.00 new, expanded by 100.00, contracted by 50.00, churned at
    // 149.00, summed over the months (a run may cross a month's end); nothing left.
    let revenue = server
        .read(&format!(
            "/analytics/revenue?currency=EUR&min_position={position}"
        ))
        .await;
    let months = revenue["currencies"][0]["months"]
        .as_array()
        .unwrap()
        .clone();
    let total = |field: &str| {
        months
            .iter()
            .map(|m| m[field].as_i64().unwrap())
            .sum::<i64>()
    };
    assert_eq!(
        [
            total("new"),
            total("expansion"),
            total("contraction"),
            total("churn")
        ],
        [9_900, 10_000, 5_000, 14_900],
        "{revenue}"
    );
    assert_eq!(months.last().unwrap()["mrr_end"], 0, "{revenue}");
    assert_eq!(months[0]["mrr_start"], 0, "{revenue}");
    assert_eq!(
        revenue["currencies"][0]["nrr"],
        Value::Null,
        "no window start"
    );
    let none = server.read("/analytics/revenue?currency=USD").await;
    assert_eq!(none["currencies"], json!([]), "{none}");
    let after = server
        .read(&format!("/accounts/{account}?min_position={position}"))
        .await;
    assert_eq!(after["mrr"], json!([]), "churned: no MRR left");
    let lower = server.get("/analytics/revenue?currency=eur").await;
    assert_eq!((lower.status, lower.code()), (422, "invalid-currency"));
}

async fn an_unpaid_order_is_cancelled_at_its_deadline_and_a_late_payment_refused(db: Arc<Fixture>) {
    let server = Server::start_with(db.url(), &with_timeout());
    let deal = won_deal(&server).await;
    let order = placed(&server, &deal).await;
    let history = format!("/orders/{order}/history");
    state_when(&server, &history, |s| s["status"] == "invoiced").await;
    let cancelled = state_when(&server, &history, |s| s["status"] == "cancelled").await;
    assert_eq!(
        cancelled["invoice_id"],
        Value::Null,
        "the invoice is voided"
    );
    let voided = events_of(&db, "InvoiceVoided").await;
    assert_eq!(voided.len(), 1);
    assert_eq!(voided[0].data["reason"], "payment-timeout");
    let reasons: Vec<Value> = events_of(&db, "OrderCancelled")
        .await
        .iter()
        .map(|e| e.data["reason"].clone())
        .collect();
    assert_eq!(reasons, [json!("payment-timeout")]);

    // The money arrives late: refused, never taken silently.
    let late = server
        .post(
            &format!("/orders/{order}/pay"),
            json!({"amount": {"currency": "EUR", "amount_minor": TOTAL}}),
        )
        .await;
    assert_eq!(late.status, 409, "{:?}", late.body);
    assert!(events_of(&db, "PaymentReceived").await.is_empty());
    assert!(events_of(&db, "SubscriptionStarted").await.is_empty());

    // The saga's steps: the invoice compensated, the payment failed, the order cancelled.
    let view = state_of_order(&server, &order, |o| o["status"] == "cancelled").await;
    let steps: Vec<(&str, &str)> = view["saga"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["step"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        [
            ("place", "done"),
            ("invoice", "compensated"),
            ("payment", "failed"),
            ("cancel", "done")
        ],
        "{view}"
    );
    assert_eq!(view["cancel_reason"], "payment-timeout");
    verify_every_read_model(&server).await;
}

/// What `path` answers, once `ready` says it is as awaited.
async fn state_of(server: &Server, path: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = server.get(path).await;
        if answer.status == 200 && ready(&answer.body) {
            return answer.body;
        }
        assert!(Instant::now() < deadline, "{path}: {}", answer.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The order board's view of an order, once `ready` says it is as awaited.
async fn state_of_order(server: &Server, order: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = server.get(&format!("/orders/{order}")).await;
        if answer.status == 200 && ready(&answer.body) {
            return answer.body;
        }
        assert!(Instant::now() < deadline, "{}", answer.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn verify_every_read_model(server: &Server) {
    let projections = server.read("/admin/projections").await;
    for item in projections["items"].as_array().unwrap() {
        let name = item["name"].as_str().unwrap();
        let verified = server
            .admin(&format!("/admin/projections/{name}/verify"))
            .await;
        assert_eq!(verified.status, 200, "{name}: {:?}", verified.body);
        assert_eq!(verified.body["equal"], true, "{name}: {:?}", verified.body);
    }
}

/// Orders placed and paid while the server is killed -9 after each few commands, then
/// started again: every paid order ends fulfilled with one subscription, every unpaid
/// one cancelled at its deadline, and no step twice.
async fn the_saga_finishes_each_order_once_across_kill_9(db: Arc<Fixture>) {
    let (mut paid, mut unpaid) = (Vec::new(), Vec::new());
    for round in 0..3 {
        let server = Server::start_with(db.url(), &with_timeout());
        let deal = won_deal(&server).await;
        for n in 0..=round {
            let order = placed(&server, &deal).await;
            if n % 2 == 0 {
                let history = format!("/orders/{order}/history");
                state_when(&server, &history, |s| s["status"] == "invoiced").await;
                server
                    .command(
                        &format!("/orders/{order}/pay"),
                        json!({"amount": {"currency": "EUR", "amount_minor": TOTAL}}),
                    )
                    .await;
                paid.push(order);
            } else {
                unpaid.push(order);
            }
        }
        server.kill();
    }
    let server = Server::start_with(db.url(), &with_timeout());
    for order in &paid {
        state_when(&server, &format!("/orders/{order}/history"), |s| {
            s["status"] == "fulfilled"
        })
        .await;
    }
    for order in &unpaid {
        state_when(&server, &format!("/orders/{order}/history"), |s| {
            s["status"] == "cancelled"
        })
        .await;
    }
    let placed_orders = paid.len() + unpaid.len();
    assert_eq!(events_of(&db, "OrderInvoiced").await.len(), placed_orders);
    // A deadline is set for every order still unpaid when the saga takes its invoice
    // (one paid first needs none), and fired for every unpaid one.
    let deadlines = events_of(&db, "TimerScheduled").await.len();
    assert!(
        (unpaid.len()..=placed_orders).contains(&deadlines),
        "{deadlines} deadlines for {placed_orders} orders"
    );
    assert_eq!(events_of(&db, "TimerFired").await.len(), unpaid.len());
    assert_eq!(events_of(&db, "OrderFulfilled").await.len(), paid.len());
    assert_eq!(
        events_of(&db, "SubscriptionStarted").await.len(),
        paid.len()
    );
    assert_eq!(events_of(&db, "OrderCancelled").await.len(), unpaid.len());
    verify_every_read_model(&server).await;
}
