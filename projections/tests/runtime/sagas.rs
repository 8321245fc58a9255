//! The order saga at the interleavings a client can force: an order cancelled after its
//! payment and before the saga acted on the payment is refunded, and the saga then starts
//! nothing and fulfils nothing; a payment after the deadline cancelled the order is
//! refused; a subscription that cannot start undoes the payment: the order is cancelled
//! and refunded, and nothing is fulfilled.

use annals_commands::{CommandError, Handlers};
use annals_domain::DomainError;
use annals_domain::account::{Account, AccountCommand};
use annals_domain::deal::{Deal, DealCommand};
use annals_domain::order::{Order, OrderCommand, OrderDeal, OrderLine, OrderLines, OrderStatus};
use annals_domain::subscription::{Subscription, SubscriptionCommand};
use annals_projections::Process;
use annals_projections::order_saga::{self, OrderSaga};

use super::*;

on_both_backends!(
    an_order_cancelled_after_its_payment_is_refunded_and_the_saga_goes_no_further,
    a_subscription_that_cannot_start_cancels_and_refunds_the_paid_order,
);

fn saga(db: &Fixture) -> ConsumerRunner {
    let handlers = Handlers::new(db.store(), HandlerConfig::default());
    ConsumerRunner::new(
        db.store(),
        read_database(db),
        Consumer::Process(Arc::new(OrderSaga::new(
            &handlers,
            chrono::Duration::days(7),
        ))),
    )
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
    let handlers = Handlers::new(db.store(), HandlerConfig::default());
    OrderSaga::new(&handlers, chrono::Duration::days(7))
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
