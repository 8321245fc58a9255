//! The order saga at the interleavings a client can force, each forced through a store
//! that carries out the client's command just before a chosen append of the saga's: a
//! payment that commits while the deadline decides its cancel is never refunded; a
//! cancellation at any point of the saga's payment step leaves no active subscription
//! (its start is undone, and the order board says so); an order cancelled after its
//! payment and before the saga acted on the payment is refunded, and the saga then
//! starts nothing and fulfils nothing; a subscription that cannot start undoes the
//! payment. The deadline runs from the invoice, so a saga that lags never cancels an
//! order at once; and acting again on every event after the idempotency keys were
//! purged repeats no step.

use annals_commands::{CommandError, Handlers};
use annals_consumers::processes::order_saga::{self, OrderSaga};
use annals_consumers::queries::Snapshot;
use annals_consumers::read_models::order_board::OrderBoard;
use annals_consumers::timers::{Clock, ManualClock, SystemClock};
use annals_domain::DomainError;
use annals_domain::account::{Account, AccountCommand};
use annals_domain::deal::{Deal, DealCommand};
use annals_domain::order::{Order, OrderCommand, OrderDeal, OrderLine, OrderLines, OrderStatus};
use annals_domain::subscription::{Subscription, SubscriptionCommand, SubscriptionStatus};
use annals_domain::timer::{Timer, TimerCommand, timer_id};
use annals_engine::Process;
use annals_store::{AppendRequest, EventStore};
use chrono::Utc;
use futures::future::BoxFuture;

use super::intercepting::acting_once_before;
use super::*;

on_both_backends!(
    an_order_cancelled_after_its_payment_is_refunded_and_the_saga_goes_no_further,
    a_subscription_that_cannot_start_cancels_and_refunds_the_paid_order,
    the_deadline_never_refunds_a_payment_that_committed_while_it_decided,
    a_cancel_at_any_step_of_the_payment_leaves_no_active_subscription,
    the_payment_deadline_runs_from_the_invoice_not_the_placement,
    acting_again_on_every_event_after_the_keys_were_purged_repeats_no_step,
);

fn saga(db: &Fixture) -> ConsumerRunner {
    saga_over(db, db.store(), Arc::new(SystemClock))
}

/// The saga's runner over `store` (the test's, when it intercepts appends), with
/// handlers of its own, invoicing at `clock`'s time.
fn saga_over(db: &Fixture, store: Arc<dyn EventStore>, clock: Arc<dyn Clock>) -> ConsumerRunner {
    ConsumerRunner::new(
        store.clone(),
        read_database(db),
        Consumer::Process(process(store, clock)),
    )
}

fn process(store: Arc<dyn EventStore>, clock: Arc<dyn Clock>) -> Arc<OrderSaga> {
    let handlers = Handlers::new(store, HandlerConfig::default());
    Arc::new(OrderSaga::new(&handlers, chrono::Duration::days(7), clock))
}

fn pay() -> OrderCommand {
    OrderCommand::Pay {
        amount: Money::parse("EUR", 1_000).unwrap(),
    }
}

fn cancel() -> OrderCommand {
    OrderCommand::Cancel {
        reason: Reason::parse("changed our mind").unwrap(),
    }
}

/// The client's `command` on `order`, carried out before the first append of the saga's
/// that `picks` (its step then goes on against the order the client left); `done` is set
/// once it has been.
fn client_before(
    db: &Fixture,
    order: Uuid,
    command: OrderCommand,
    picks: impl Fn(&AppendRequest) -> bool + Send + Sync + 'static,
    done: Arc<AtomicBool>,
) -> Arc<dyn EventStore> {
    let client = db.store();
    acting_once_before(db.store(), picks, move || -> BoxFuture<'static, ()> {
        let (client, command, done) = (client.clone(), command.clone(), done.clone());
        Box::pin(async move {
            CommandHandler::<Order>::new(client, HandlerConfig::default())
                .execute(order, command, &context())
                .await
                .unwrap();
            done.store(true, Ordering::SeqCst);
        })
    })
}

/// Whether an append holds an event of `event_type`.
fn appends(event_type: &'static str) -> impl Fn(&AppendRequest) -> bool + Send + Sync {
    move |request| request.events.iter().any(|e| e.event_type == event_type)
}

/// Fires the order's payment deadline (as the scheduler does once it is due).
async fn fire_deadline(db: &Fixture, order: Uuid) {
    let id = timer_id(order_saga::NAME, &format!("payment/{order}"));
    CommandHandler::<Timer>::new(db.store(), HandlerConfig::default())
        .execute(
            id,
            TimerCommand::Fire {
                now: Utc::now() + chrono::Duration::days(8),
            },
            &context(),
        )
        .await
        .unwrap();
}

async fn events_of(db: &Fixture, event_type: &str) -> usize {
    db.store()
        .read_all(1, 10_000, &LogFilter::event_types([event_type]))
        .await
        .unwrap()
        .events
        .len()
}

/// An account, its won deal, and an order placed on it with one recurring line of
/// EUR 10.00 a month: the order's handler, its id and the account's.
async fn placed_order(db: &Fixture) -> (CommandHandler<Order>, Uuid, Uuid) {
    let (account, deal) = (Uuid::now_v7(), Uuid::now_v7());
    CommandHandler::<Account>::new(db.store(), HandlerConfig::default())
        .execute(
            account,
            AccountCommand::Open {
                account_id: account,
                name: Name::parse("Initech").unwrap(),
                domain: None,
                industry: None,
                employees: None,
                tier: Tier::Standard,
            },
            &context(),
        )
        .await
        .unwrap();
    let deals = CommandHandler::<Deal>::new(db.store(), HandlerConfig::default());
    let open = DealCommand::Open {
        deal_id: deal,
        account_id: account,
        account_exists: true,
        name: Name::parse("Engines").unwrap(),
        amount: Money::parse("EUR", 1_000).unwrap(),
        owner: None,
        expected_close: None,
    };
    deals.execute(deal, open, &context()).await.unwrap();
    deals
        .execute(deal, DealCommand::Win, &context())
        .await
        .unwrap();
    let orders = CommandHandler::<Order>::new(db.store(), HandlerConfig::default());
    let order = Uuid::now_v7();
    let lines = OrderLines::new(vec![OrderLine {
        sku: Sku::parse("SUPPORT").unwrap(),
        quantity: Quantity::parse(1).unwrap(),
        unit_price: Money::parse("EUR", 1_000).unwrap(),
        recurring: true,
    }])
    .unwrap();
    let place = OrderCommand::Place {
        order_id: order,
        deal: OrderDeal::Won {
            deal_id: deal,
            account_id: account,
            currency: Currency::parse("EUR").unwrap(),
        },
        lines,
    };
    orders.execute(order, place, &context()).await.unwrap();
    (orders, order, account)
}

/// Paid, then cancelled by the client before the saga took the payment (the saga's
/// runner held back, as when it lags): the cancel refunds the payment, and when the saga
/// takes the payment it finds the order cancelled: no subscription, no fulfilment.
async fn an_order_cancelled_after_its_payment_is_refunded_and_the_saga_goes_no_further(
    db: Arc<Fixture>,
) {
    let (orders, order, _) = placed_order(&db).await;
    let runner = saga(&db);
    runner.catch_up().await.unwrap();
    assert_eq!(
        orders.current(order).await.unwrap().state.status,
        OrderStatus::Invoiced
    );

    let pay = OrderCommand::Pay {
        amount: Money::parse("EUR", 1_000).unwrap(),
    };
    orders.execute(order, pay, &context()).await.unwrap();
    let cancel = OrderCommand::Cancel {
        reason: Reason::parse("changed our mind").unwrap(),
    };
    let cancelled = orders.execute(order, cancel, &context()).await.unwrap();
    assert_eq!(cancelled.events, ["OrderCancelled", "PaymentRefunded"]);

    runner.catch_up().await.unwrap();
    assert_eq!(
        events_of(&db, "SubscriptionStarted").await,
        0,
        "nothing started"
    );
    assert_eq!(
        events_of(&db, "OrderFulfilled").await,
        0,
        "nothing fulfilled"
    );
    assert_eq!(
        events_of(&db, "TimerCancelled").await,
        1,
        "the deadline stopped"
    );
    assert!(runner.parked().await.unwrap().is_empty());

    // The money again, after the cancellation: refused, never taken.
    let late = OrderCommand::Pay {
        amount: Money::parse("EUR", 1_000).unwrap(),
    };
    assert!(matches!(
        orders.execute(order, late, &context()).await,
        Err(CommandError::Domain(DomainError::OrderClosed { .. }))
    ));
    assert_eq!(events_of(&db, "PaymentReceived").await, 1);
}

/// The subscription step fails for good: its id is planted beforehand with another
/// order's subscription (nothing in the domain refuses a well-formed Start otherwise).
/// The saga compensates the step done before it, in reverse: the paid order is cancelled
/// (`subscription-failed`), which refunds it, each event caused by the payment; nothing
/// is fulfilled and nothing is parked.
async fn a_subscription_that_cannot_start_cancels_and_refunds_the_paid_order(db: Arc<Fixture>) {
    let (orders, order, account) = placed_order(&db).await;
    let planted = order_saga::subscription_id(order);
    CommandHandler::<Subscription>::new(db.store(), HandlerConfig::default())
        .execute(
            planted,
            SubscriptionCommand::Start {
                subscription_id: planted,
                account_id: account,
                order_id: Uuid::now_v7(),
                mrr: Money::parse("EUR", 500).unwrap(),
            },
            &context(),
        )
        .await
        .unwrap();
    let runner = saga(&db);
    runner.catch_up().await.unwrap();
    let pay = OrderCommand::Pay {
        amount: Money::parse("EUR", 1_000).unwrap(),
    };
    orders.execute(order, pay, &context()).await.unwrap();
    runner.catch_up().await.unwrap();

    let state = orders.current(order).await.unwrap().state;
    assert_eq!(state.status, OrderStatus::Cancelled);
    let tail = order_events(&db, order).await;
    let kinds: Vec<&str> = tail.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "OrderPlaced",
            "OrderInvoiced",
            "PaymentReceived",
            "OrderCancelled",
            "PaymentRefunded"
        ]
    );
    let paid = &tail[2];
    for undo in &tail[3..] {
        assert_eq!(
            undo.metadata.causation_id.as_deref(),
            Some(paid.event_id.to_string().as_str()),
            "{} is caused by the payment",
            undo.event_type
        );
    }
    assert_eq!(
        tail[3].data["reason"],
        order_saga::SUBSCRIPTION_FAILED,
        "the cancel says why"
    );
    assert_eq!(
        events_of(&db, "SubscriptionStarted").await,
        1,
        "only the planted one"
    );
    assert_eq!(events_of(&db, "OrderFulfilled").await, 0);
    assert!(runner.parked().await.unwrap().is_empty());

    // Acting on the payment again (as after a crash before the checkpoint moved)
    // repeats no step.
    process(db.store(), Arc::new(SystemClock))
        .handle(paid)
        .await
        .unwrap();
    assert_eq!(order_events(&db, order).await.len(), 5);
}

async fn order_events(db: &Fixture, order: Uuid) -> Vec<RecordedEvent> {
    let stream = annals_store::StreamName::parse(format!("order-{order}")).unwrap();
    db.store()
        .read_stream(&stream, 1, annals_store::Direction::Forwards, 100)
        .await
        .unwrap()
}

/// The deadline fires and the saga decides its cancel on the invoiced order; the client's
/// payment commits just before the saga's append. The cancel, decided again on the paid
/// order, is refused: nothing is cancelled or refunded, and the saga goes on to fulfil
/// the order. (With a plain Cancel, decided again, the payment was refunded.)
async fn the_deadline_never_refunds_a_payment_that_committed_while_it_decided(db: Arc<Fixture>) {
    let (orders, order, _) = placed_order(&db).await;
    let paid = Arc::new(AtomicBool::new(false));
    let store = client_before(&db, order, pay(), appends("OrderCancelled"), paid.clone());
    let runner = saga_over(&db, store, Arc::new(SystemClock));
    runner.catch_up().await.unwrap();
    assert_eq!(
        orders.current(order).await.unwrap().state.status,
        OrderStatus::Invoiced
    );
    fire_deadline(&db, order).await;
    runner.catch_up().await.unwrap();

    assert!(paid.load(Ordering::SeqCst), "the payment came in between");
    assert_eq!(
        events_of(&db, "PaymentRefunded").await,
        0,
        "nothing refunded"
    );
    assert_eq!(
        events_of(&db, "OrderCancelled").await,
        0,
        "nothing cancelled"
    );
    assert_eq!(events_of(&db, "InvoiceVoided").await, 0);
    let state = orders.current(order).await.unwrap().state;
    assert_eq!(state.status, OrderStatus::Fulfilled, "the payment stood");
    assert_eq!(events_of(&db, "SubscriptionStarted").await, 1);
    assert!(runner.parked().await.unwrap().is_empty());
}

/// The client cancels a paid order at each point of the saga's payment step: before it
/// stops the deadline, before its subscription's start is appended, before its Fulfil is
/// appended. Each time the order ends cancelled and refunded, with no active
/// subscription (one started is churned `order-cancelled`, caused by the saga), nothing
/// fulfilled, nothing parked; and the order board's saga shows the subscription
/// compensated when it had started. (Without the compensation, the subscription of the
/// last two stayed active.)
async fn a_cancel_at_any_step_of_the_payment_leaves_no_active_subscription(db: Arc<Fixture>) {
    let board = runner(&db, Arc::new(OrderBoard));
    for (point, started) in [
        ("TimerCancelled", false),
        ("SubscriptionStarted", true),
        ("OrderFulfilled", true),
    ] {
        let (orders, order, _) = placed_order(&db).await;
        let cancelled = Arc::new(AtomicBool::new(false));
        let store = client_before(&db, order, cancel(), appends(point), cancelled.clone());
        let runner = saga_over(&db, store, Arc::new(SystemClock));
        runner.catch_up().await.unwrap();
        orders.execute(order, pay(), &context()).await.unwrap();
        runner.catch_up().await.unwrap();

        assert!(
            cancelled.load(Ordering::SeqCst),
            "{point}: the cancel came in"
        );
        let state = orders.current(order).await.unwrap().state;
        assert_eq!(state.status, OrderStatus::Cancelled, "{point}");
        assert!(state.refunded.is_some(), "{point}: refunded");
        let subscription =
            CommandHandler::<Subscription>::new(db.store(), HandlerConfig::default())
                .current(order_saga::subscription_id(order))
                .await
                .unwrap();
        assert_ne!(
            subscription.state.status,
            SubscriptionStatus::Active,
            "{point}: no active subscription"
        );
        assert_eq!(
            subscription.state.status,
            if started {
                SubscriptionStatus::Churned
            } else {
                SubscriptionStatus::Absent
            },
            "{point}"
        );
        if started {
            let stream = annals_store::StreamName::parse(format!(
                "subscription-{}",
                order_saga::subscription_id(order)
            ))
            .unwrap();
            let churn = db
                .store()
                .read_stream(&stream, 2, annals_store::Direction::Forwards, 1)
                .await
                .unwrap();
            assert_eq!(churn[0].event_type, "SubscriptionChurned");
            assert_eq!(churn[0].data["reason"], order_saga::ORDER_CANCELLED);
            assert_eq!(churn[0].data["order_id"], order.to_string());
            assert_eq!(
                churn[0].metadata.actor.as_deref(),
                Some("process:order_saga")
            );
        }
        assert!(runner.parked().await.unwrap().is_empty(), "{point}");

        board.catch_up().await.unwrap();
        let mut snapshot = Snapshot::begin(&read_database(&db)).await.unwrap();
        let row = snapshot.order(&order.to_string()).await.unwrap().unwrap();
        snapshot.finish().await.unwrap();
        let steps = row.saga_steps().unwrap();
        let subscription_step = steps.iter().find(|s| s.step == "subscription");
        assert_eq!(
            subscription_step.map(|s| s.status.as_str()),
            started.then_some("compensated"),
            "{point}: {steps:?}"
        );
        let payment = steps.iter().find(|s| s.step == "payment").unwrap();
        assert_eq!(payment.status, "compensated", "{point}: refunded");
    }
    assert_eq!(
        events_of(&db, "OrderFulfilled").await,
        0,
        "nothing fulfilled"
    );
}

/// The saga lags a day behind the order's placement (its clock a day on): the invoice is
/// due the payment timeout after the invoice, not after the placement, and its deadline
/// is set for that time. (From the placement, a saga that lags invoices orders already
/// overdue and cancels them at the next round.)
async fn the_payment_deadline_runs_from_the_invoice_not_the_placement(db: Arc<Fixture>) {
    let (orders, order, _) = placed_order(&db).await;
    let invoiced_at = Utc::now() + chrono::Duration::days(1);
    let clock = Arc::new(ManualClock::at(invoiced_at));
    let runner = saga_over(&db, db.store(), clock);
    runner.catch_up().await.unwrap();

    let state = orders.current(order).await.unwrap().state;
    assert_eq!(state.status, OrderStatus::Invoiced);
    let due = invoiced_at + chrono::Duration::days(7);
    assert_eq!(state.due_at, Some(due), "due a timeout after the invoice");
    let deadline = CommandHandler::<Timer>::new(db.store(), HandlerConfig::default())
        .current(timer_id(order_saga::NAME, &format!("payment/{order}")))
        .await
        .unwrap();
    assert_eq!(
        deadline.state.due_at,
        Some(due),
        "the deadline is the invoice's"
    );
}

/// Four orders through every path of the saga (paid and fulfilled with a subscription,
/// timed out, paid and then cancelled with its subscription churned, invoiced and
/// awaiting payment); then every
/// idempotency key is purged (as after a day) and the saga acts again on every event it
/// follows, as after a crash and a late restart. No step is repeated, nothing fails and
/// nothing parks: each step's effect is recognised from the store. (Before, the Invoice
/// of a placed order was refused `not-in-status`, which parks and halts the saga.)
async fn acting_again_on_every_event_after_the_keys_were_purged_repeats_no_step(db: Arc<Fixture>) {
    let (orders, fulfilled, _) = placed_order(&db).await;
    let (_, timed_out, _) = placed_order(&db).await;
    let (_, refunded, _) = placed_order(&db).await;
    let (_, awaiting, _) = placed_order(&db).await;
    // The refunded order is cancelled by its customer just before the saga fulfils it,
    // after its subscription started: the saga churns the subscription.
    let stream = format!("order-{refunded}");
    let cancelled = Arc::new(AtomicBool::new(false));
    let store = client_before(
        &db,
        refunded,
        cancel(),
        move |request| request.stream.as_str() == stream && appends("OrderFulfilled")(request),
        cancelled.clone(),
    );
    let runner = saga_over(&db, store, Arc::new(SystemClock));
    runner.catch_up().await.unwrap();
    orders.execute(fulfilled, pay(), &context()).await.unwrap();
    orders.execute(refunded, pay(), &context()).await.unwrap();
    fire_deadline(&db, timed_out).await;
    runner.catch_up().await.unwrap();
    assert!(cancelled.load(Ordering::SeqCst));
    for (order, status) in [
        (fulfilled, OrderStatus::Fulfilled),
        (timed_out, OrderStatus::Cancelled),
        (refunded, OrderStatus::Cancelled),
        (awaiting, OrderStatus::Invoiced),
    ] {
        assert_eq!(orders.current(order).await.unwrap().state.status, status);
    }
    assert_eq!(events_of(&db, "SubscriptionChurned").await, 1);
    assert!(runner.parked().await.unwrap().is_empty());
    let head = db.store().head().await.unwrap();

    let purged = orders
        .purge_expired_idempotency_keys(Utc::now() + chrono::Duration::days(2))
        .await
        .unwrap();
    assert!(purged > 0, "the keys are gone");
    let followed = db
        .store()
        .read_all(
            1,
            10_000,
            &process(db.store(), Arc::new(SystemClock)).filter(),
        )
        .await
        .unwrap()
        .events;
    for kind in ["OrderPlaced", "PaymentReceived", "TimerFired"] {
        assert!(followed.iter().any(|e| e.event_type == kind), "{kind}");
    }
    let again = process(db.store(), Arc::new(SystemClock));
    for event in &followed {
        again
            .handle(event)
            .await
            .unwrap_or_else(|e| panic!("{} at {}: {e}", event.event_type, event.position));
    }
    assert_eq!(db.store().head().await.unwrap(), head, "no step repeated");
}
