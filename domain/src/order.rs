//! The order: what a won deal sells, line by line, from placement through invoice and
//! payment to fulfilment, or cancelled on the way (`domain.md`, Order). Stream
//! `order-{id}`.
//!
//! Invariants: an order is placed only for a won deal, in the deal's currency; its total
//! is the sum of quantity × unit price over its lines and its recurring total the same
//! over the recurring lines, both fixed when it is placed and never above
//! `Money::MAX_MINOR`; it moves only `placed` → `invoiced` → `paid` → `fulfilled`, or to
//! `cancelled` from any of the first three (a voided invoice takes it back to `placed`);
//! it takes one payment, only while invoiced and only of its total; a paid order that is
//! cancelled refunds that payment; a closed order (fulfilled, cancelled) never changes.
//! Invoice ids and due times are facts from outside: the order process sends them in
//! `Invoice`, the domain reads no clock.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::deal::DealStatus;
use crate::values::{Currency, Money, Quantity, Reason, Sku};
use crate::{Aggregate, Command, DomainError, Event};

/// One line of an order: so many units of a SKU at a unit price.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: Sku,
    pub quantity: Quantity,
    /// Never negative (it is `Money`); in the deal's currency once the order is placed.
    pub unit_price: Money,
    /// Whether the unit price is monthly (recurring revenue); false unless said.
    #[serde(default)]
    pub recurring: bool,
}

impl OrderLine {
    /// Quantity × unit price in minor units; `None` when it does not fit in 64 bits.
    pub fn amount_minor(&self) -> Option<i64> {
        i64::from(self.quantity.get()).checked_mul(self.unit_price.amount_minor)
    }
}

/// The lines of an order: 1–100 of them (see `new`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderLines(Vec<OrderLine>);

impl OrderLines {
    /// The most lines an order holds.
    pub const MAX_LINES: usize = 100;

    /// The lines of an order, refused (invalid) when there are none or more than 100.
    pub fn new(lines: Vec<OrderLine>) -> Result<Self, DomainError> {
        if lines.is_empty() || lines.len() > Self::MAX_LINES {
            return Err(DomainError::InvalidCount {
                field: "lines",
                min: 1,
                max: Self::MAX_LINES,
            });
        }
        Ok(OrderLines(lines))
    }

    /// The lines, in the order the client gave them.
    pub fn as_slice(&self) -> &[OrderLine] {
        &self.0
    }

    /// The total (quantity × unit price summed over every line) and the recurring total
    /// (the same over the recurring lines), in `deal_currency`. Refused (invalid) when a
    /// unit price is in another currency, or when the total is more than
    /// `Money::MAX_MINOR`: the arithmetic is checked, it never wraps.
    pub fn totals(&self, deal_currency: &Currency) -> Result<(Money, Money), DomainError> {
        if let Some(line) = self
            .0
            .iter()
            .find(|line| line.unit_price.currency != *deal_currency)
        {
            return Err(DomainError::CurrencyMismatch {
                deal: deal_currency.as_str().to_owned(),
                given: line.unit_price.currency.as_str().to_owned(),
            });
        }
        let too_large = || DomainError::TooLarge {
            field: "total",
            max: Money::MAX_MINOR,
        };
        let (mut total, mut recurring) = (0i64, 0i64);
        for line in &self.0 {
            let amount = line.amount_minor().ok_or_else(too_large)?;
            total = total
                .checked_add(amount)
                .filter(|sum| *sum <= Money::MAX_MINOR)
                .ok_or_else(too_large)?;
            if line.recurring {
                // At most the total, so it fits too.
                recurring = recurring.checked_add(amount).ok_or_else(too_large)?;
            }
        }
        let money = |amount_minor| Money {
            currency: deal_currency.clone(),
            amount_minor,
        };
        Ok((money(total), money(recurring)))
    }
}

/// The deal an order is placed for, as the handler found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderDeal {
    /// No deal has this id: the order is refused (not found).
    Unknown(Uuid),
    /// The deal exists but is not won (open or lost): the order is refused (conflict).
    NotWon { deal_id: Uuid, status: DealStatus },
    /// A won deal: the order is for its account, in the currency of its amount.
    Won {
        deal_id: Uuid,
        account_id: Uuid,
        currency: Currency,
    },
}

impl OrderDeal {
    pub fn id(&self) -> Uuid {
        match self {
            OrderDeal::Unknown(deal_id)
            | OrderDeal::NotWon { deal_id, .. }
            | OrderDeal::Won { deal_id, .. } => *deal_id,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Not placed yet: the stream is empty.
    #[default]
    Absent,
    Placed,
    Invoiced,
    Paid,
    Fulfilled,
    Cancelled,
}

impl OrderStatus {
    /// Every status a placed order can be in, in the order's life: the words a client
    /// lists orders by.
    pub const PLACED: &'static [OrderStatus] = &[
        OrderStatus::Placed,
        OrderStatus::Invoiced,
        OrderStatus::Paid,
        OrderStatus::Fulfilled,
        OrderStatus::Cancelled,
    ];

    /// The statuses of a closed order.
    pub const CLOSED: &'static [OrderStatus] = &[OrderStatus::Fulfilled, OrderStatus::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Absent => "absent",
            OrderStatus::Placed => "placed",
            OrderStatus::Invoiced => "invoiced",
            OrderStatus::Paid => "paid",
            OrderStatus::Fulfilled => "fulfilled",
            OrderStatus::Cancelled => "cancelled",
        }
    }

    /// The status an `as_str` word names.
    pub fn parse(word: &str) -> Option<OrderStatus> {
        std::iter::once(OrderStatus::Absent)
            .chain(OrderStatus::PLACED.iter().copied())
            .find(|status| status.as_str() == word)
    }

    pub fn is_closed(self) -> bool {
        OrderStatus::CLOSED.contains(&self)
    }

    /// The status after `event`: the one rule the aggregate and the order board share.
    /// A voided invoice takes the order back to `placed`, to be invoiced again or
    /// cancelled; a refund follows the cancellation and leaves the order cancelled.
    pub fn after(self, event: &OrderEvent) -> OrderStatus {
        match event {
            OrderEvent::OrderPlaced { .. } | OrderEvent::InvoiceVoided { .. } => {
                OrderStatus::Placed
            }
            OrderEvent::OrderInvoiced { .. } => OrderStatus::Invoiced,
            OrderEvent::PaymentReceived { .. } => OrderStatus::Paid,
            OrderEvent::OrderFulfilled {} => OrderStatus::Fulfilled,
            OrderEvent::OrderCancelled { .. } => OrderStatus::Cancelled,
            OrderEvent::PaymentRefunded { .. } => self,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum OrderCommand {
    /// `deal` is the fact the handler looks up: whether the deal exists, is won, and
    /// its account and currency.
    Place {
        order_id: Uuid,
        deal: OrderDeal,
        lines: OrderLines,
    },
    /// The order process's: the id of the invoice it issues and when payment is due.
    Invoice {
        invoice_id: Uuid,
        due_at: DateTime<Utc>,
    },
    Pay {
        amount: Money,
    },
    /// The order process's, once the order is paid.
    Fulfil {},
    /// The order process's: withdraws the invoice of an unpaid order.
    VoidInvoice {
        reason: Reason,
    },
    Cancel {
        reason: Reason,
    },
    /// The order process's, at the payment deadline: cancels an order that is not paid
    /// (voiding its invoice) and refuses a paid one (conflict `not-in-status`), so a
    /// payment that committed first is never refunded by the deadline, however late the
    /// cancel is decided again on the paid order.
    CancelUnpaid {
        reason: Reason,
    },
}

impl Command for OrderCommand {
    fn name(&self) -> &'static str {
        match self {
            OrderCommand::Place { .. } => "PlaceOrder",
            OrderCommand::Invoice { .. } => "InvoiceOrder",
            OrderCommand::Pay { .. } => "PayOrder",
            OrderCommand::Fulfil {} => "FulfilOrder",
            OrderCommand::VoidInvoice { .. } => "VoidInvoice",
            OrderCommand::Cancel { .. } => "CancelOrder",
            OrderCommand::CancelUnpaid { .. } => "CancelUnpaidOrder",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum OrderEvent {
    /// `total` and `recurring_total` are in the deal's currency, as every unit price.
    OrderPlaced {
        order_id: Uuid,
        deal_id: Uuid,
        account_id: Uuid,
        lines: OrderLines,
        total: Money,
        recurring_total: Money,
    },
    OrderInvoiced {
        invoice_id: Uuid,
        due_at: DateTime<Utc>,
    },
    PaymentReceived {
        amount: Money,
    },
    OrderFulfilled {},
    InvoiceVoided {
        reason: Reason,
    },
    OrderCancelled {
        reason: Reason,
    },
    /// Follows the `OrderCancelled` of a paid order: the payment given back.
    PaymentRefunded {
        amount: Money,
    },
}

impl Event for OrderEvent {
    fn event_type(&self) -> &'static str {
        match self {
            OrderEvent::OrderPlaced { .. } => "OrderPlaced",
            OrderEvent::OrderInvoiced { .. } => "OrderInvoiced",
            OrderEvent::PaymentReceived { .. } => "PaymentReceived",
            OrderEvent::OrderFulfilled {} => "OrderFulfilled",
            OrderEvent::InvoiceVoided { .. } => "InvoiceVoided",
            OrderEvent::OrderCancelled { .. } => "OrderCancelled",
            OrderEvent::PaymentRefunded { .. } => "PaymentRefunded",
        }
    }

    fn current_version(_event_type: &str) -> u32 {
        1
    }
}

/// An order as its events left it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub id: Option<Uuid>,
    pub deal_id: Option<Uuid>,
    pub account_id: Option<Uuid>,
    pub status: OrderStatus,
    /// 1–100 lines once placed; none before.
    pub lines: Vec<OrderLine>,
    /// The sum of quantity × unit price over the lines; set once, by `OrderPlaced`.
    pub total: Option<Money>,
    /// The same over the recurring lines (zero when there are none): the MRR the order
    /// process starts a subscription with.
    pub recurring_total: Option<Money>,
    /// The invoice awaiting payment, or paid: set by `OrderInvoiced`, cleared when the
    /// invoice is voided.
    pub invoice_id: Option<Uuid>,
    pub due_at: Option<DateTime<Utc>>,
    /// The payment received (the total); set once, by `PaymentReceived`.
    pub paid: Option<Money>,
    /// The payment given back when a paid order was cancelled.
    pub refunded: Option<Money>,
}

impl Order {
    /// The total of an order in the `required` status, or why the order cannot take the
    /// command: it does not exist, it is closed, or it is in another status.
    fn in_status(&self, required: OrderStatus) -> Result<&Money, DomainError> {
        match (self.status, &self.total) {
            (status, Some(total)) if status == required => Ok(total),
            (OrderStatus::Absent, _) => Err(DomainError::OrderNotFound),
            (status, _) if status.is_closed() => Err(DomainError::OrderClosed {
                status: status.as_str(),
            }),
            (status, _) => Err(DomainError::OrderNotInStatus {
                status: status.as_str(),
                required: required.as_str(),
            }),
        }
    }
}

impl Aggregate for Order {
    type Command = OrderCommand;
    type Event = OrderEvent;
    const CATEGORY: &'static str = "order";
    const SNAPSHOT_VERSION: u32 = 1;

    fn decide(&self, command: OrderCommand) -> Result<Vec<OrderEvent>, DomainError> {
        match command {
            OrderCommand::Place {
                order_id,
                deal,
                lines,
            } => {
                if let Some(id) = self.id {
                    return Err(DomainError::OrderExists(id));
                }
                let (deal_id, account_id, currency) = match deal {
                    OrderDeal::Unknown(_) => return Err(DomainError::DealNotFound),
                    OrderDeal::NotWon { status, .. } => {
                        return Err(DomainError::DealNotWon {
                            status: status.as_str(),
                        });
                    }
                    OrderDeal::Won {
                        deal_id,
                        account_id,
                        currency,
                    } => (deal_id, account_id, currency),
                };
                let (total, recurring_total) = lines.totals(&currency)?;
                Ok(vec![OrderEvent::OrderPlaced {
                    order_id,
                    deal_id,
                    account_id,
                    lines,
                    total,
                    recurring_total,
                }])
            }
            OrderCommand::Invoice { invoice_id, due_at } => {
                self.in_status(OrderStatus::Placed)?;
                Ok(vec![OrderEvent::OrderInvoiced { invoice_id, due_at }])
            }
            OrderCommand::Pay { amount } => {
                // The status first: a late payment (the order cancelled meanwhile) is
                // refused as a conflict whatever its amount, never swallowed.
                let total = self.in_status(OrderStatus::Invoiced)?;
                if amount != *total {
                    return Err(DomainError::AmountMismatch {
                        total: total.to_string(),
                        given: amount.to_string(),
                    });
                }
                Ok(vec![OrderEvent::PaymentReceived { amount }])
            }
            OrderCommand::Fulfil {} => {
                self.in_status(OrderStatus::Paid)?;
                Ok(vec![OrderEvent::OrderFulfilled {}])
            }
            OrderCommand::VoidInvoice { reason } => {
                self.in_status(OrderStatus::Invoiced)?;
                Ok(vec![OrderEvent::InvoiceVoided { reason }])
            }
            // A paid order's payment stands; otherwise as Cancel.
            OrderCommand::CancelUnpaid { reason } => match self.status {
                OrderStatus::Paid => Err(DomainError::OrderNotInStatus {
                    status: OrderStatus::Paid.as_str(),
                    required: OrderStatus::Invoiced.as_str(),
                }),
                _ => self.decide(OrderCommand::Cancel { reason }),
            },
            OrderCommand::Cancel { reason } => match (self.status, &self.paid) {
                (OrderStatus::Absent, _) => Err(DomainError::OrderNotFound),
                (OrderStatus::Placed, _) => Ok(vec![OrderEvent::OrderCancelled { reason }]),
                // An invoice is never left open on a cancelled order.
                (OrderStatus::Invoiced, _) => Ok(vec![
                    OrderEvent::InvoiceVoided {
                        reason: reason.clone(),
                    },
                    OrderEvent::OrderCancelled { reason },
                ]),
                (OrderStatus::Paid, Some(amount)) => Ok(vec![
                    OrderEvent::OrderCancelled { reason },
                    OrderEvent::PaymentRefunded {
                        amount: amount.clone(),
                    },
                ]),
                // Fulfilled or cancelled (a paid order always holds its payment).
                (status, _) => Err(DomainError::OrderClosed {
                    status: status.as_str(),
                }),
            },
        }
    }

    fn evolve(mut self, event: &OrderEvent) -> Self {
        self.status = self.status.after(event);
        match event {
            OrderEvent::OrderPlaced {
                order_id,
                deal_id,
                account_id,
                lines,
                total,
                recurring_total,
            } => {
                self.id = Some(*order_id);
                self.deal_id = Some(*deal_id);
                self.account_id = Some(*account_id);
                self.lines = lines.as_slice().to_vec();
                self.total = Some(total.clone());
                self.recurring_total = Some(recurring_total.clone());
            }
            OrderEvent::OrderInvoiced { invoice_id, due_at } => {
                self.invoice_id = Some(*invoice_id);
                self.due_at = Some(*due_at);
            }
            OrderEvent::PaymentReceived { amount } => self.paid = Some(amount.clone()),
            OrderEvent::InvoiceVoided { .. } => {
                self.invoice_id = None;
                self.due_at = None;
            }
            OrderEvent::PaymentRefunded { amount } => self.refunded = Some(amount.clone()),
            OrderEvent::OrderFulfilled {} | OrderEvent::OrderCancelled { .. } => {}
        }
        self
    }
}
