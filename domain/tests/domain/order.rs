//! Every rule of the order (`domain.md`, Order), accepted and refused, as given / when /
//! then.

use annals_domain::deal::DealStatus;
use annals_domain::order::{
    Order, OrderCommand, OrderDeal, OrderEvent, OrderLine, OrderLines, OrderStatus,
};
use annals_domain::values::*;
use annals_domain::{Aggregate, DomainError, RejectionKind};
use chrono::{DateTime, TimeZone, Utc};

use crate::rules::{given, id};

fn eur(minor: i64) -> Money {
    Money::parse("EUR", minor).unwrap()
}

fn line(sku: &str, quantity: i64, unit_price: Money, recurring: bool) -> OrderLine {
    OrderLine {
        sku: Sku::parse(sku).unwrap(),
        quantity: Quantity::parse(quantity).unwrap(),
        unit_price,
        recurring,
    }
}

/// Ten monthly seats at 49.00 and a one-off setup at 1,000.00: 1,490.00 in all, 490.00 a
/// month.
fn seats_and_setup() -> OrderLines {
    OrderLines::new(vec![
        line("SEAT-PRO", 10, eur(4_900), true),
        line("SETUP", 1, eur(100_000), false),
    ])
    .unwrap()
}

fn won_deal() -> OrderDeal {
    OrderDeal::Won {
        deal_id: id(30),
        account_id: id(20),
        currency: Currency::parse("EUR").unwrap(),
    }
}

fn place_with(deal: OrderDeal, lines: OrderLines) -> OrderCommand {
    OrderCommand::Place {
        order_id: id(50),
        deal,
        lines,
    }
}

fn place() -> OrderCommand {
    place_with(won_deal(), seats_and_setup())
}

fn placed() -> OrderEvent {
    OrderEvent::OrderPlaced {
        order_id: id(50),
        deal_id: id(30),
        account_id: id(20),
        lines: seats_and_setup(),
        total: eur(149_000),
        recurring_total: eur(49_000),
    }
}

fn due() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 3, 9, 0, 0).unwrap()
}

fn invoice() -> OrderCommand {
    OrderCommand::Invoice {
        invoice_id: id(60),
        due_at: due(),
    }
}

fn invoiced() -> OrderEvent {
    OrderEvent::OrderInvoiced {
        invoice_id: id(60),
        due_at: due(),
    }
}

fn paid() -> OrderEvent {
    OrderEvent::PaymentReceived {
        amount: eur(149_000),
    }
}

fn reason(text: &str) -> Reason {
    Reason::parse(text).unwrap()
}

fn voided(why: &str) -> OrderEvent {
    OrderEvent::InvoiceVoided {
        reason: reason(why),
    }
}

fn cancelled(why: &str) -> OrderEvent {
    OrderEvent::OrderCancelled {
        reason: reason(why),
    }
}

fn cancel(why: &str) -> OrderCommand {
    OrderCommand::Cancel {
        reason: reason(why),
    }
}

/// Every command an order takes, each well formed.
fn every_command() -> Vec<OrderCommand> {
    vec![
        place(),
        invoice(),
        OrderCommand::Pay {
            amount: eur(149_000),
        },
        OrderCommand::Fulfil {},
        OrderCommand::VoidInvoice {
            reason: reason("wrong address"),
        },
        cancel("changed their mind"),
        cancel_unpaid("payment-timeout"),
    ]
}

fn cancel_unpaid(why: &str) -> OrderCommand {
    OrderCommand::CancelUnpaid {
        reason: reason(why),
    }
}

// ----- Place -------------------------------------------------------------------------

#[test]
fn place_records_the_lines_with_their_total_and_recurring_total() {
    let order = given::<Order>([]).when(place()).then([placed()]);
    assert_eq!(order.status, OrderStatus::Placed);
    assert_eq!(order.id, Some(id(50)));
    assert_eq!(order.account_id, Some(id(20)));
    assert_eq!(order.lines, seats_and_setup().as_slice());
    assert_eq!(order.total, Some(eur(149_000)));
    assert_eq!(order.recurring_total, Some(eur(49_000)));
}

#[test]
fn an_order_without_recurring_lines_has_a_recurring_total_of_zero() {
    let lines = OrderLines::new(vec![line("SETUP", 2, eur(500), false)]).unwrap();
    given::<Order>([])
        .when(place_with(won_deal(), lines.clone()))
        .then([OrderEvent::OrderPlaced {
            order_id: id(50),
            deal_id: id(30),
            account_id: id(20),
            lines,
            total: eur(1_000),
            recurring_total: eur(0),
        }]);
}

#[test]
fn place_for_a_deal_that_does_not_exist_is_not_found() {
    given::<Order>([])
        .when(place_with(OrderDeal::Unknown(id(30)), seats_and_setup()))
        .then_err(DomainError::DealNotFound);
    assert_eq!(OrderDeal::Unknown(id(30)).id(), id(30));
}

#[test]
fn place_for_a_deal_that_is_not_won_is_a_conflict() {
    for (status, word) in [(DealStatus::Open, "open"), (DealStatus::Lost, "lost")] {
        given::<Order>([])
            .when(place_with(
                OrderDeal::NotWon {
                    deal_id: id(30),
                    status,
                },
                seats_and_setup(),
            ))
            .then_err(DomainError::DealNotWon { status: word });
    }
    let not_won = DomainError::DealNotWon { status: "open" };
    assert_eq!(not_won.kind(), RejectionKind::Conflict);
    assert_eq!(not_won.code(), "deal-not-won");
}

#[test]
fn place_an_existing_order_is_a_conflict() {
    given::<Order>([placed()])
        .when(place())
        .then_err(DomainError::OrderExists(id(50)));
    let exists = DomainError::OrderExists(id(50));
    assert_eq!(exists.kind(), RejectionKind::Conflict);
    assert_eq!(exists.code(), "order-exists");
}

#[test]
fn an_order_has_one_to_a_hundred_lines() {
    let many = |n: usize| vec![line("SEAT", 1, eur(1), false); n];
    assert!(OrderLines::new(many(1)).is_ok());
    let hundred = OrderLines::new(many(100)).unwrap();
    given::<Order>([])
        .when(place_with(won_deal(), hundred))
        .then([OrderEvent::OrderPlaced {
            order_id: id(50),
            deal_id: id(30),
            account_id: id(20),
            lines: OrderLines::new(many(100)).unwrap(),
            total: eur(100),
            recurring_total: eur(0),
        }]);
    let refused = DomainError::InvalidCount {
        field: "lines",
        min: 1,
        max: 100,
    };
    assert_eq!(OrderLines::new(many(0)), Err(refused.clone()));
    assert_eq!(OrderLines::new(many(101)), Err(refused.clone()));
    assert_eq!(refused.kind(), RejectionKind::Invalid);
}

#[test]
fn a_sku_is_one_to_sixty_four_characters() {
    assert_eq!(Sku::parse(" SEAT-PRO ").unwrap().as_str(), "SEAT-PRO");
    assert!(Sku::parse(&"s".repeat(64)).is_ok());
    for bad in [String::new(), "   ".into(), "s".repeat(65)] {
        assert_eq!(
            Sku::parse(&bad),
            Err(DomainError::InvalidText {
                field: "sku",
                min: 1,
                max: 64
            }),
            "{bad:?}"
        );
    }
}

#[test]
fn a_quantity_is_one_to_a_million() {
    assert_eq!(Quantity::parse(1).unwrap().get(), 1);
    assert_eq!(Quantity::parse(1_000_000).unwrap().get(), 1_000_000);
    let refused = DomainError::OutOfRange {
        field: "quantity",
        min: 1,
        max: 1_000_000,
    };
    for bad in [0, -1, 1_000_001, i64::MAX, i64::MIN] {
        assert_eq!(Quantity::parse(bad), Err(refused.clone()), "{bad}");
    }
    assert_eq!(refused.kind(), RejectionKind::Invalid);
    assert_eq!(refused.code(), "number-out-of-range");
}

#[test]
fn a_unit_price_is_never_negative_and_may_be_zero() {
    assert_eq!(
        Money::parse("EUR", -1),
        Err(DomainError::Negative { field: "amount" })
    );
    let free = OrderLines::new(vec![line("TRIAL", 3, eur(0), true)]).unwrap();
    given::<Order>([])
        .when(place_with(won_deal(), free.clone()))
        .then([OrderEvent::OrderPlaced {
            order_id: id(50),
            deal_id: id(30),
            account_id: id(20),
            lines: free,
            total: eur(0),
            recurring_total: eur(0),
        }]);
}

#[test]
fn a_unit_price_in_another_currency_than_the_deals_is_invalid() {
    let lines = OrderLines::new(vec![
        line("SEAT", 1, eur(4_900), true),
        line("SETUP", 1, Money::parse("USD", 100).unwrap(), false),
    ])
    .unwrap();
    given::<Order>([])
        .when(place_with(won_deal(), lines))
        .then_err(DomainError::CurrencyMismatch {
            deal: "EUR".into(),
            given: "USD".into(),
        });
}

#[test]
fn a_total_beyond_the_largest_amount_is_invalid_never_wrapped() {
    let too_large = DomainError::TooLarge {
        field: "total",
        max: Money::MAX_MINOR,
    };
    let max = eur(Money::MAX_MINOR);
    // One line whose product does not fit in 64 bits.
    let product = OrderLines::new(vec![line("BIG", 1_000_000, max.clone(), false)]).unwrap();
    // Lines that each fit, but not their sum.
    let sum = OrderLines::new(vec![
        line("A", 1, max.clone(), false),
        line("B", 1, eur(1), true),
    ])
    .unwrap();
    for lines in [product, sum] {
        given::<Order>([])
            .when(place_with(won_deal(), lines))
            .then_err(too_large.clone());
    }
    assert_eq!(too_large.kind(), RejectionKind::Invalid);
    // Exactly the largest amount is still a total.
    let at_max = OrderLines::new(vec![
        line("A", 1, eur(Money::MAX_MINOR - 1), true),
        line("B", 1, eur(1), false),
    ])
    .unwrap();
    let order = given::<Order>([])
        .when(place_with(won_deal(), at_max.clone()))
        .then([OrderEvent::OrderPlaced {
            order_id: id(50),
            deal_id: id(30),
            account_id: id(20),
            lines: at_max,
            total: max,
            recurring_total: eur(Money::MAX_MINOR - 1),
        }]);
    assert_eq!(order.status, OrderStatus::Placed);
}

#[test]
fn a_line_is_not_recurring_unless_it_says_so() {
    let stored = serde_json::json!({
        "sku": "SETUP",
        "quantity": 2,
        "unit_price": {"currency": "EUR", "amount_minor": 500},
    });
    let read: OrderLine = serde_json::from_value(stored).unwrap();
    assert_eq!(read, line("SETUP", 2, eur(500), false));
}

// ----- Invoice -----------------------------------------------------------------------

#[test]
fn invoice_a_placed_order_with_the_invoice_and_due_time_given() {
    let order = given::<Order>([placed()])
        .when(invoice())
        .then([invoiced()]);
    assert_eq!(order.status, OrderStatus::Invoiced);
    assert_eq!(order.invoice_id, Some(id(60)));
    assert_eq!(order.due_at, Some(due()));
}

#[test]
fn invoice_an_order_that_is_not_placed_is_a_conflict() {
    for (history, status) in [
        (vec![placed(), invoiced()], "invoiced"),
        (vec![placed(), invoiced(), paid()], "paid"),
    ] {
        given::<Order>(history)
            .when(invoice())
            .then_err(DomainError::OrderNotInStatus {
                status,
                required: "placed",
            });
    }
    let refused = DomainError::OrderNotInStatus {
        status: "paid",
        required: "placed",
    };
    assert_eq!(refused.kind(), RejectionKind::Conflict);
    assert_eq!(refused.code(), "invalid-order-transition");
}

// ----- Pay ---------------------------------------------------------------------------

#[test]
fn pay_an_invoiced_order_its_total() {
    let order = given::<Order>([placed(), invoiced()])
        .when(OrderCommand::Pay {
            amount: eur(149_000),
        })
        .then([paid()]);
    assert_eq!(order.status, OrderStatus::Paid);
    assert_eq!(order.paid, Some(eur(149_000)));
}

#[test]
fn pay_another_amount_than_the_total_is_invalid() {
    for amount in [
        eur(148_999),
        eur(149_001),
        eur(0),
        Money::parse("USD", 149_000).unwrap(),
    ] {
        given::<Order>([placed(), invoiced()])
            .when(OrderCommand::Pay {
                amount: amount.clone(),
            })
            .then_err(DomainError::AmountMismatch {
                total: "149000 EUR".into(),
                given: amount.to_string(),
            });
    }
    let mismatch = DomainError::AmountMismatch {
        total: "1 EUR".into(),
        given: "2 EUR".into(),
    };
    assert_eq!(mismatch.kind(), RejectionKind::Invalid);
    assert_eq!(mismatch.code(), "amount-mismatch");
}

#[test]
fn pay_an_order_that_is_not_invoiced_is_a_conflict() {
    for (history, status) in [
        (vec![placed()], "placed"),
        (vec![placed(), invoiced(), paid()], "paid"),
        (
            vec![placed(), invoiced(), voided("wrong address")],
            "placed",
        ),
    ] {
        given::<Order>(history)
            .when(OrderCommand::Pay {
                amount: eur(149_000),
            })
            .then_err(DomainError::OrderNotInStatus {
                status,
                required: "invoiced",
            });
    }
}

#[test]
fn a_late_payment_is_refused_as_a_conflict_never_swallowed() {
    let history = [
        placed(),
        invoiced(),
        voided("payment-timeout"),
        cancelled("payment-timeout"),
    ];
    // Refused for the order's state, whatever the amount.
    for amount in [eur(149_000), eur(1)] {
        given::<Order>(history.clone())
            .when(OrderCommand::Pay { amount })
            .then_err(DomainError::OrderClosed {
                status: "cancelled",
            });
    }
    let closed = DomainError::OrderClosed {
        status: "cancelled",
    };
    assert_eq!(closed.kind(), RejectionKind::Conflict);
    assert_eq!(closed.code(), "order-closed");
}

// ----- Fulfil ------------------------------------------------------------------------

#[test]
fn fulfil_a_paid_order_closes_it() {
    let order = given::<Order>([placed(), invoiced(), paid()])
        .when(OrderCommand::Fulfil {})
        .then([OrderEvent::OrderFulfilled {}]);
    assert_eq!(order.status, OrderStatus::Fulfilled);
    assert!(order.status.is_closed());
}

#[test]
fn fulfil_an_unpaid_order_is_a_conflict() {
    for (history, status) in [
        (vec![placed()], "placed"),
        (vec![placed(), invoiced()], "invoiced"),
    ] {
        given::<Order>(history)
            .when(OrderCommand::Fulfil {})
            .then_err(DomainError::OrderNotInStatus {
                status,
                required: "paid",
            });
    }
}

// ----- VoidInvoice -------------------------------------------------------------------

#[test]
fn void_the_invoice_of_an_unpaid_order_takes_it_back_to_placed() {
    let order = given::<Order>([placed(), invoiced()])
        .when(OrderCommand::VoidInvoice {
            reason: reason("wrong address"),
        })
        .then([voided("wrong address")]);
    assert_eq!(order.status, OrderStatus::Placed);
    assert_eq!((order.invoice_id, order.due_at), (None, None));
    // It can be invoiced again.
    given::<Order>([placed(), invoiced(), voided("wrong address")])
        .when(invoice())
        .then([invoiced()]);
}

#[test]
fn void_an_invoice_that_is_not_open_is_a_conflict() {
    for (history, status) in [
        (vec![placed()], "placed"),
        (vec![placed(), invoiced(), paid()], "paid"),
    ] {
        given::<Order>(history)
            .when(OrderCommand::VoidInvoice {
                reason: reason("x"),
            })
            .then_err(DomainError::OrderNotInStatus {
                status,
                required: "invoiced",
            });
    }
}

// ----- Cancel ------------------------------------------------------------------------

#[test]
fn cancel_a_placed_order() {
    let order = given::<Order>([placed()])
        .when(cancel("changed their mind"))
        .then([cancelled("changed their mind")]);
    assert_eq!(order.status, OrderStatus::Cancelled);
}

#[test]
fn cancel_an_invoiced_order_voids_its_invoice_first() {
    let order = given::<Order>([placed(), invoiced()])
        .when(cancel("payment-timeout"))
        .then([voided("payment-timeout"), cancelled("payment-timeout")]);
    assert_eq!(order.status, OrderStatus::Cancelled);
    assert_eq!(order.invoice_id, None);
}

#[test]
fn cancel_a_paid_order_refunds_the_payment_after_cancelling() {
    let order = given::<Order>([placed(), invoiced(), paid()])
        .when(cancel("out of stock"))
        .then([
            cancelled("out of stock"),
            OrderEvent::PaymentRefunded {
                amount: eur(149_000),
            },
        ]);
    assert_eq!(order.status, OrderStatus::Cancelled);
    assert_eq!(order.refunded, Some(eur(149_000)));
}

// ----- CancelUnpaid (the payment deadline's) -------------------------------------------

#[test]
fn the_deadline_cancels_an_unpaid_order_as_cancel_does() {
    given::<Order>([placed()])
        .when(cancel_unpaid("payment-timeout"))
        .then([cancelled("payment-timeout")]);
    let order = given::<Order>([placed(), invoiced()])
        .when(cancel_unpaid("payment-timeout"))
        .then([voided("payment-timeout"), cancelled("payment-timeout")]);
    assert_eq!(order.status, OrderStatus::Cancelled);
    assert_eq!(order.refunded, None);
}

/// The payment committed before the deadline's cancel: the cancel, decided again on the
/// paid order, is refused, so nothing is refunded.
#[test]
fn the_deadline_never_cancels_a_paid_order() {
    given::<Order>([placed(), invoiced(), paid()])
        .when(cancel_unpaid("payment-timeout"))
        .then_err(DomainError::OrderNotInStatus {
            status: "paid",
            required: "invoiced",
        });
    assert_eq!(
        DomainError::OrderNotInStatus {
            status: "paid",
            required: "invoiced"
        }
        .kind(),
        RejectionKind::Conflict
    );
}

#[test]
fn a_cancellation_reason_is_one_to_five_hundred_characters() {
    assert!(Reason::parse(&"r".repeat(500)).is_ok());
    for bad in [String::new(), " ".into(), "r".repeat(501)] {
        assert_eq!(
            Reason::parse(&bad),
            Err(DomainError::InvalidText {
                field: "reason",
                min: 1,
                max: 500
            })
        );
    }
}

#[test]
fn a_closed_order_never_changes() {
    let fulfilled = vec![placed(), invoiced(), paid(), OrderEvent::OrderFulfilled {}];
    let cancelled_placed = vec![placed(), cancelled("x")];
    let refunded = vec![
        placed(),
        invoiced(),
        paid(),
        cancelled("x"),
        OrderEvent::PaymentRefunded {
            amount: eur(149_000),
        },
    ];
    for (history, status) in [
        (fulfilled, "fulfilled"),
        (cancelled_placed, "cancelled"),
        (refunded, "cancelled"),
    ] {
        for command in every_command() {
            let refused = if matches!(command, OrderCommand::Place { .. }) {
                DomainError::OrderExists(id(50))
            } else {
                DomainError::OrderClosed { status }
            };
            given::<Order>(history.clone())
                .when(command)
                .then_err(refused);
        }
    }
}

#[test]
fn commands_on_an_order_that_does_not_exist_are_not_found() {
    for command in every_command().into_iter().skip(1) {
        given::<Order>([])
            .when(command)
            .then_err(DomainError::OrderNotFound);
    }
    assert_eq!(DomainError::OrderNotFound.kind(), RejectionKind::NotFound);
    assert_eq!(DomainError::OrderNotFound.code(), "order-not-found");
}

#[test]
fn an_order_lives_in_its_own_stream() {
    assert_eq!(Order::stream_name(id(50)), format!("order-{}", id(50)));
}

/// A status read back from its word is the status that wrote it (the order board stores
/// the word); a word no status writes names none.
#[test]
fn every_order_status_word_names_its_status_and_no_other_word_does() {
    for status in std::iter::once(OrderStatus::Absent).chain(OrderStatus::PLACED.iter().copied()) {
        assert_eq!(OrderStatus::parse(status.as_str()), Some(status));
    }
    for word in ["", "Paid", "paid ", "closed", "refunded"] {
        assert_eq!(OrderStatus::parse(word), None, "{word:?}");
    }
    assert_eq!(
        OrderStatus::CLOSED,
        &[OrderStatus::Fulfilled, OrderStatus::Cancelled]
    );
}
