//! `annals demo`: a seeded, reproducible revenue history, written through the command
//! layer as real clients would: leads from every source with their signals, owners,
//! qualifications, disqualifications and conversions; accounts opened by hand and by the
//! conversion process; deals moved through the stages to won and lost; orders on some
//! won deals, most paid (their subscriptions then expanded, contracted or churned), of
//! the rest half cancelled by their customer and half left awaiting payment.
//!
//! The consumers and the timer scheduler run as on a server: under their leases, on the
//! real clock. Beside a running server (SQLite or PostgreSQL), that server holds the
//! leases and runs them; the demo waits for the processes' effects (reading their
//! checkpoints from the database) and never fires a timer itself, so a payment deadline
//! falls due only on the real clock, 7 days (`ANNALS_PAYMENT_TIMEOUT`) after the invoice.
//!
//! Every command carries an idempotency key made of the seed and its place in the
//! story, so running the same demo twice appends nothing the second time.

use annals_api::System;
use annals_commands::{CommandContext, CommandError};
use annals_consumers::processes::order_saga;
use annals_domain::account::{Account, AccountCommand};
use annals_domain::deal::{Deal, DealCommand};
use annals_domain::lead::{ConversionAccount, ConversionDeal, Lead, LeadCommand};
use annals_domain::order::{Order, OrderCommand, OrderDeal, OrderLine, OrderLines};
use annals_domain::subscription::{Subscription, SubscriptionCommand};
use annals_domain::values::{
    Email, Label, Money, Name, Owner, PersonName, Quantity, Reason, SignalKind, Sku, Source, Stage,
    Tier,
};
use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use uuid::Uuid;

const FIRST: [&str; 16] = [
    "ada",
    "grace",
    "alan",
    "barbara",
    "edsger",
    "frances",
    "john",
    "katherine",
    "linus",
    "margaret",
    "niklaus",
    "radia",
    "ken",
    "sophie",
    "tim",
    "hedy",
];
const LAST: [&str; 16] = [
    "lovelace", "hopper", "turing", "liskov", "dijkstra", "allen", "backus", "johnson", "torvalds",
    "hamilton", "wirth", "perlman", "thompson", "wilson", "berners", "lamarr",
];
const COMPANIES: [&str; 12] = [
    "Analytical Engines",
    "Initech",
    "Globex",
    "Umbrella Logistics",
    "Hooli",
    "Stark Mills",
    "Wayne Freight",
    "Acme Rockets",
    "Tyrell Robotics",
    "Soylent Foods",
    "Cyberdyne",
    "Vandelay Imports",
];
const OWNERS: [&str; 5] = ["ada", "grace", "alan", "barbara", "linus"];

#[derive(Debug, Default)]
struct Tally {
    leads: usize,
    qualified: usize,
    converted: usize,
    disqualified: usize,
    accounts: usize,
    deals: usize,
    won: usize,
    lost: usize,
    orders: usize,
    paid: usize,
    cancelled: usize,
    awaiting: usize,
    churned: usize,
    refused: usize,
}

/// An order the demo placed: its id, its total, and whether it will be paid.
struct Placed {
    id: Uuid,
    total: Money,
    pays: bool,
}

/// How long the demo waits for a process (its own, or a server's) to take an event.
const PROCESS_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

struct Story<'a> {
    system: &'a System,
    seed: u64,
    rng: ChaCha8Rng,
    tally: Tally,
    orders: Vec<Placed>,
}

impl Story<'_> {
    fn id(&mut self) -> Uuid {
        uuid::Builder::from_random_bytes(self.rng.random()).into_uuid()
    }

    fn context(&self, step: &str) -> CommandContext {
        CommandContext {
            actor: "demo".to_owned(),
            idempotency_key: Some(format!("demo-{}-{step}", self.seed)),
            ..CommandContext::default()
        }
    }

    /// A refusal (a second demo with another seed can meet the first one's emails) is
    /// counted and the story goes on; anything else stops the demo.
    fn accepted(
        &mut self,
        result: Result<annals_commands::CommandOutcome, CommandError>,
    ) -> anyhow::Result<bool> {
        match result {
            Ok(_) => Ok(true),
            Err(CommandError::Domain(_)) => {
                self.tally.refused += 1;
                Ok(false)
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Waits until the consumer `name` has taken the log up to `position`, whichever
    /// process runs it.
    async fn wait_for(&self, name: &str, position: u64) -> anyhow::Result<()> {
        if !self
            .system
            .wait_for_consumer(name, position, PROCESS_WAIT)
            .await?
        {
            let status = match self.system.consumer(name) {
                Some(consumer) => consumer.status().await?.status,
                None => "unknown",
            };
            bail!(
                "{name} did not reach position {position} within {} s (it is {status}; \
                 see `annals parked list --consumer {name}` or GET /admin/consumers)",
                PROCESS_WAIT.as_secs()
            );
        }
        Ok(())
    }

    /// Waits until every consumer has taken the whole log, its processes' commands too.
    async fn settle(&self) -> anyhow::Result<u64> {
        loop {
            let head = self.system.store.head().await?;
            for name in self.system.consumer_names() {
                self.wait_for(name, head).await?;
            }
            if self.system.store.head().await? == head {
                return Ok(head);
            }
        }
    }

    fn money(&mut self) -> anyhow::Result<Money> {
        let currency = if self.rng.random_bool(0.8) {
            "EUR"
        } else {
            "USD"
        };
        let amount = self.rng.random_range(50..2_000) * 10_000;
        Ok(Money::parse(currency, amount)?)
    }

    async fn lead(&mut self, n: usize) -> anyhow::Result<()> {
        let leads = self.system.handler::<Lead>();
        let id = self.id();
        let first = *FIRST.choose(&mut self.rng).unwrap_or(&"ada");
        let last = *LAST.choose(&mut self.rng).unwrap_or(&"lovelace");
        let company = *COMPANIES.choose(&mut self.rng).unwrap_or(&"Initech");
        let domain = company.to_lowercase().replace(' ', "-");
        let source = Source::ALL[n % Source::ALL.len()];
        let capture = LeadCommand::Capture {
            lead_id: id,
            email: Email::parse(&format!("{first}.{last}.{n}@{domain}.example"))?,
            name: PersonName::parse(&format!("{} {}", title(first), title(last)))?,
            company: self
                .rng
                .random_bool(0.85)
                .then(|| Label::parse(company))
                .transpose()?,
            source,
        };
        let captured = leads
            .execute(id, capture, &self.context(&format!("{n}/capture")))
            .await;
        if !self.accepted(captured)? {
            return Ok(());
        }
        self.tally.leads += 1;
        if self.rng.random_bool(0.7) {
            let owner = Owner::parse(OWNERS.choose(&mut self.rng).unwrap_or(&"ada"))?;
            let assigned = leads
                .execute(
                    id,
                    LeadCommand::Assign { owner },
                    &self.context(&format!("{n}/assign")),
                )
                .await;
            self.accepted(assigned)?;
        }
        // Engaged leads send more and stronger signals.
        let engaged = self.rng.random_bool(0.45);
        let signals = if engaged {
            self.rng.random_range(3..9)
        } else {
            self.rng.random_range(0..4)
        };
        let mut qualified = false;
        for s in 0..signals {
            let kinds = if engaged {
                &SignalKind::ALL[2..]
            } else {
                &SignalKind::ALL[..4]
            };
            let kind = *kinds.choose(&mut self.rng).unwrap_or(&SignalKind::PageView);
            let command = LeadCommand::RecordSignal {
                kind,
                occurred_at: None,
            };
            let recorded = leads
                .execute(id, command, &self.context(&format!("{n}/signal/{s}")))
                .await;
            if let Ok(outcome) = &recorded {
                qualified |= outcome.events.iter().any(|e| e == "LeadQualified");
            }
            self.accepted(recorded)?;
        }
        if qualified {
            self.tally.qualified += 1;
            if self.rng.random_bool(0.6) {
                return self.convert(n, id).await;
            }
        } else if self.rng.random_bool(0.2) {
            let reason = Reason::parse(["no budget", "wrong fit", "unresponsive"][n % 3])?;
            let disqualified = leads
                .execute(
                    id,
                    LeadCommand::Disqualify { reason },
                    &self.context(&format!("{n}/disqualify")),
                )
                .await;
            if self.accepted(disqualified)? {
                self.tally.disqualified += 1;
            }
        }
        Ok(())
    }

    async fn convert(&mut self, n: usize, lead: Uuid) -> anyhow::Result<()> {
        let (account_id, deal_id) = (self.id(), self.id());
        let command = LeadCommand::Convert {
            deal_name: Name::parse(&format!("Deal {n}"))?,
            amount: self.money()?,
            account: ConversionAccount::New(account_id),
            deal: ConversionDeal::New(deal_id),
        };
        let converted = self
            .system
            .handler::<Lead>()
            .execute(lead, command, &self.context(&format!("{n}/convert")))
            .await;
        let position = converted.as_ref().map_or(0, |outcome| outcome.position);
        if self.accepted(converted)? {
            self.tally.converted += 1;
            self.tally.accounts += 1;
            // The conversion process opens the account and the deal (here, or on a
            // server beside the demo).
            self.wait_for(annals_consumers::processes::lead_conversion::NAME, position)
                .await?;
            self.tally.deals += 1;
            self.work_deal(&format!("{n}"), deal_id).await?;
        }
        Ok(())
    }

    /// Opens an account by hand, with a deal or two.
    async fn account(&mut self, n: usize) -> anyhow::Result<()> {
        let id = self.id();
        let company = COMPANIES[n % COMPANIES.len()];
        let command = AccountCommand::Open {
            account_id: id,
            name: Name::parse(&format!("{company} Holdings"))?,
            domain: Some(Label::parse(&format!(
                "{}.example",
                company.to_lowercase().replace(' ', "-")
            ))?),
            industry: Some(Label::parse(
                ["manufacturing", "logistics", "software"][n % 3],
            )?),
            employees: Some(self.rng.random_range(10..5_000)),
            tier: if self.rng.random_bool(0.3) {
                Tier::Key
            } else {
                Tier::Standard
            },
        };
        let opened = self
            .system
            .handler::<Account>()
            .execute(id, command, &self.context(&format!("account/{n}")))
            .await;
        if !self.accepted(opened)? {
            return Ok(());
        }
        self.tally.accounts += 1;
        for d in 0..self.rng.random_range(1..3) {
            let deal_id = self.id();
            let command = DealCommand::Open {
                deal_id,
                account_id: id,
                account_exists: true,
                name: Name::parse(&format!("{company} expansion {}", d + 1))?,
                amount: self.money()?,
                owner: Some(Owner::parse(
                    OWNERS.choose(&mut self.rng).unwrap_or(&"ada"),
                )?),
                expected_close: None,
            };
            let step = format!("account/{n}/deal/{d}");
            let opened = self
                .system
                .handler::<Deal>()
                .execute(deal_id, command, &self.context(&step))
                .await;
            if self.accepted(opened)? {
                self.tally.deals += 1;
                self.work_deal(&step, deal_id).await?;
            }
        }
        Ok(())
    }

    /// Moves a deal through some stages, then wins it, loses it, or leaves it open.
    async fn work_deal(&mut self, step: &str, id: Uuid) -> anyhow::Result<()> {
        let deals = self.system.handler::<Deal>();
        let reached = self.rng.random_range(0..Stage::ALL.len());
        for (s, stage) in Stage::ALL.iter().enumerate().skip(1).take(reached) {
            if self.rng.random_bool(0.2) {
                continue; // Stages may be skipped.
            }
            let advanced = deals
                .execute(
                    id,
                    DealCommand::Advance { stage: *stage },
                    &self.context(&format!("{step}/stage/{s}")),
                )
                .await;
            self.accepted(advanced)?;
        }
        let ending: f64 = self.rng.random();
        if ending < 0.4 {
            let won = deals
                .execute(id, DealCommand::Win, &self.context(&format!("{step}/win")))
                .await;
            if self.accepted(won)? {
                self.tally.won += 1;
                self.order(step, id).await?;
            }
        } else if ending < 0.65 {
            let reason =
                Reason::parse(["lost to a competitor", "no decision", "price"][reached % 3])?;
            let lost = deals
                .execute(
                    id,
                    DealCommand::Lose { reason },
                    &self.context(&format!("{step}/lose")),
                )
                .await;
            if self.accepted(lost)? {
                self.tally.lost += 1;
            }
        }
        Ok(())
    }
}

impl Story<'_> {
    /// Places an order on most won deals: the deal's amount once, and on some a monthly
    /// support line; most will be paid.
    async fn order(&mut self, step: &str, deal_id: Uuid) -> anyhow::Result<()> {
        if !self.rng.random_bool(0.6) {
            return Ok(());
        }
        let deal = self.system.handler::<Deal>().load(deal_id).await?.state;
        let (Some(account_id), Some(amount)) = (deal.account_id, deal.amount) else {
            return Ok(());
        };
        let mut lines = vec![OrderLine {
            sku: Sku::parse("LICENCE")?,
            quantity: Quantity::parse(1)?,
            unit_price: amount.clone(),
            recurring: false,
        }];
        if self.rng.random_bool(0.7) {
            let monthly = self.rng.random_range(5..60) * 10_000;
            lines.push(OrderLine {
                sku: Sku::parse("SUPPORT")?,
                quantity: Quantity::parse(self.rng.random_range(1..4))?,
                unit_price: Money::parse(amount.currency.as_str(), monthly)?,
                recurring: true,
            });
        }
        let lines = OrderLines::new(lines)?;
        let (total, _) = lines.totals(&amount.currency)?;
        let id = self.id();
        let place = OrderCommand::Place {
            order_id: id,
            deal: OrderDeal::Won {
                deal_id,
                account_id,
                currency: amount.currency,
            },
            lines,
        };
        let placed = self
            .system
            .handler::<Order>()
            .execute(id, place, &self.context(&format!("{step}/order")))
            .await;
        if self.accepted(placed)? {
            self.tally.orders += 1;
            let pays = self.rng.random_bool(0.8);
            self.orders.push(Placed { id, total, pays });
        }
        Ok(())
    }

    /// The orders' lives: invoiced by the order process, most paid (their subscriptions
    /// started, then some expanded, contracted or churned); of the others, half are
    /// cancelled by their customer and half left awaiting payment (their deadline falls
    /// due on the real clock, long after the demo).
    async fn sell(&mut self) -> anyhow::Result<()> {
        let head = self.system.store.head().await?;
        self.wait_for(order_saga::NAME, head).await?;
        let orders = self.system.handler::<Order>();
        let subscriptions = self.system.handler::<Subscription>();
        let placed = std::mem::take(&mut self.orders);
        for order in placed.iter().filter(|o| o.pays) {
            let pay = OrderCommand::Pay {
                amount: order.total.clone(),
            };
            let paid = orders
                .execute(order.id, pay, &self.context(&format!("{}/pay", order.id)))
                .await;
            if self.accepted(paid)? {
                self.tally.paid += 1;
            }
        }
        let head = self.system.store.head().await?;
        self.wait_for(order_saga::NAME, head).await?;
        for order in placed.iter().filter(|o| o.pays) {
            let id = order_saga::subscription_id(order.id);
            let roll: f64 = self.rng.random();
            let started = subscriptions.load(id).await?;
            // None for a one-off order; moved already by an earlier run of this demo.
            let (Some(mrr), 1) = (started.state.mrr, started.version) else {
                continue;
            };
            let step = |what: &str| format!("{}/{what}", order.id);
            let (command, what) = if roll < 0.3 {
                let more = Money::parse(mrr.currency.as_str(), mrr.amount_minor * 3 / 2)?;
                (SubscriptionCommand::Expand { mrr: more }, "expand")
            } else if roll < 0.5 && mrr.amount_minor > 1 {
                let less = Money::parse(mrr.currency.as_str(), mrr.amount_minor / 2)?;
                (SubscriptionCommand::Contract { mrr: less }, "contract")
            } else if roll < 0.65 {
                let reason = Some(Reason::parse("budget cut")?);
                (SubscriptionCommand::Churn { reason }, "churn")
            } else {
                continue;
            };
            let churns = what == "churn";
            let done = subscriptions
                .execute(id, command, &self.context(&step(what)))
                .await;
            if self.accepted(done)? && churns {
                self.tally.churned += 1;
            }
        }
        // The unpaid orders: every other one cancelled by its customer; the rest await
        // payment until their deadline on the real clock.
        for (n, order) in placed.iter().filter(|o| !o.pays).enumerate() {
            if n % 2 == 1 {
                self.tally.awaiting += 1;
                continue;
            }
            let cancel = OrderCommand::Cancel {
                reason: Reason::parse("the customer changed their mind")?,
            };
            let cancelled = orders
                .execute(
                    order.id,
                    cancel,
                    &self.context(&format!("{}/cancel", order.id)),
                )
                .await;
            if self.accepted(cancelled)? {
                self.tally.cancelled += 1;
            }
        }
        Ok(())
    }
}

fn title(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

pub async fn run(system: &System, leads: usize, seed: u64) -> anyhow::Result<()> {
    let mut story = Story {
        system,
        seed,
        rng: ChaCha8Rng::seed_from_u64(seed),
        tally: Tally::default(),
        orders: Vec::new(),
    };
    let accounts = (leads / 20).max(1);
    let bar = ProgressBar::new((leads + accounts) as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:32}] {pos}/{len}  {per_sec}  {eta} left")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message("demo");
    for n in 0..leads {
        story
            .lead(n)
            .await
            .with_context(|| format!("demo lead {n}"))?;
        bar.inc(1);
    }
    for n in 0..accounts {
        story
            .account(n)
            .await
            .with_context(|| format!("demo account {n}"))?;
        bar.inc(1);
    }
    story.sell().await.context("demo orders")?;
    let head = story.settle().await.context("demo consumers")?;
    bar.finish_and_clear();
    let t = &story.tally;
    println!(
        "demo (seed {seed}): {} leads ({} qualified, {} converted, {} disqualified), \
         {} accounts, {} deals ({} won, {} lost), {} orders ({} paid, {} cancelled by \
         their customer, {} awaiting payment), {} subscriptions churned; the log holds \
         {head} events",
        t.leads,
        t.qualified,
        t.converted,
        t.disqualified,
        t.accounts,
        t.deals,
        t.won,
        t.lost,
        t.orders,
        t.paid,
        t.cancelled,
        t.awaiting,
        t.churned
    );
    if t.refused > 0 {
        println!(
            "{} commands were refused (the store already held a history like it)",
            t.refused
        );
    }
    Ok(())
}
