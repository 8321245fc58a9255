//! The order saga on both backends: complete sagas per second (placed, invoiced, paid,
//! subscription started, fulfilled), and the time from a payment's acknowledgement to
//! its subscription's `SubscriptionStarted`, at p50 and p99.
//!
//! `cargo bench -p annals-consumers --bench sagas` (PostgreSQL at
//! `ANNALS_TEST_DATABASE_URL`). `ANNALS_BENCH_ORDERS` (default 1,000) orders per run,
//! `ANNALS_BENCH_RUNS` (default 3).
//!
//! 16 clients each place orders for one won deal and pay each once it is invoiced, while
//! the saga's runner runs as a server runs it. A saga is 7 commands (2 the client's:
//! place, pay; 5 the process's: schedule the deadline, invoice, cancel the deadline,
//! start the subscription, fulfil). Baseline, in the same run: as many plain commands
//! (7 per order: timers scheduled on new streams) sent by 16 clients; the ratio is the
//! saga's command rate over that.

use std::sync::Arc;
use std::time::{Duration, Instant};

use annals_commands::{CommandContext, CommandHandler, HandlerConfig, Handlers};
use annals_consumers::processes::order_saga::OrderSaga;
use annals_consumers::timers::schedule;
use annals_domain::account::{Account, AccountCommand};
use annals_domain::deal::{Deal, DealCommand};
use annals_domain::order::{Order, OrderCommand, OrderDeal, OrderLine, OrderLines, OrderStatus};
use annals_domain::timer::Timer;
use annals_domain::values::{Currency, Money, Name, Quantity, Sku, Tier};
use annals_engine::{Consumer, ConsumerRunner, ReadDatabase};
use annals_store::{EventStore, LogFilter, PostgresStore, SqliteStore, StoreConfig};
use anyhow::Context;
use chrono::Utc;
use serde_json::json;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

const CLIENTS: usize = 16;

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn context() -> CommandContext {
    CommandContext {
        actor: "bench".into(),
        ..CommandContext::default()
    }
}

/// A won deal of a new account, in EUR.
async fn won_deal(handlers: &Handlers) -> anyhow::Result<(Uuid, Uuid)> {
    let (account, deal) = (Uuid::now_v7(), Uuid::now_v7());
    let open = AccountCommand::Open {
        account_id: account,
        name: Name::parse("Initech")?,
        domain: None,
        industry: None,
        employees: None,
        tier: Tier::Standard,
    };
    handlers
        .of::<Account>()
        .execute(account, open, &context())
        .await?;
    let open = DealCommand::Open {
        deal_id: deal,
        account_id: account,
        account_exists: true,
        name: Name::parse("Engines")?,
        amount: Money::parse("EUR", 100_000)?,
        owner: None,
        expected_close: None,
    };
    let deals = handlers.of::<Deal>();
    deals.execute(deal, open, &context()).await?;
    deals.execute(deal, DealCommand::Win, &context()).await?;
    Ok((account, deal))
}

/// One client's orders, placed and paid in turn; each payment's acknowledgement time.
async fn client(
    orders: Arc<CommandHandler<Order>>,
    deal: OrderDeal,
    count: usize,
) -> anyhow::Result<Vec<(Uuid, Instant)>> {
    let mut paid = Vec::with_capacity(count);
    for _ in 0..count {
        let id = Uuid::now_v7();
        let lines = OrderLines::new(vec![
            OrderLine {
                sku: Sku::parse("ENGINE")?,
                quantity: Quantity::parse(1)?,
                unit_price: Money::parse("EUR", 100_000)?,
                recurring: false,
            },
            OrderLine {
                sku: Sku::parse("SUPPORT")?,
                quantity: Quantity::parse(1)?,
                unit_price: Money::parse("EUR", 9_900)?,
                recurring: true,
            },
        ])?;
        let place = OrderCommand::Place {
            order_id: id,
            deal: deal.clone(),
            lines,
        };
        orders.execute(id, place, &context()).await?;
        // Paid as soon as it is invoiced.
        let deadline = Instant::now() + Duration::from_secs(60);
        while orders.current(id).await?.state.status != OrderStatus::Invoiced {
            anyhow::ensure!(Instant::now() < deadline, "order {id} never invoiced");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let pay = OrderCommand::Pay {
            amount: Money::parse("EUR", 109_900)?,
        };
        orders.execute(id, pay, &context()).await?;
        paid.push((id, Instant::now()));
    }
    Ok(paid)
}

fn spread(values: &[f64], show: impl Fn(f64) -> String) -> String {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    format!(
        "{} ({}–{})",
        show(sorted[sorted.len() / 2]),
        show(sorted[0]),
        show(sorted[sorted.len() - 1])
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let admin = std::env::var("ANNALS_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let orders_per_run: usize = setting("ANNALS_BENCH_ORDERS", 1_000);
    let runs: usize = setting("ANNALS_BENCH_RUNS", 3usize).max(1);
    println!("{runs} runs, {orders_per_run} orders each: median (min–max)\n");
    println!(
        "| backend | sagas/s | saga commands/s | plain commands/s (baseline) | ratio | payment → subscription p50 | p99 |"
    );
    println!("|---|---|---|---|---|---|---|");
    for backend in ["sqlite", "postgres"] {
        let (mut sagas, mut saga_commands, mut plain, mut ratios, mut p50s, mut p99s) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for _ in 0..runs {
            let dir = tempfile::tempdir()?;
            let mut pg_name = None;
            let (store, db): (Arc<dyn EventStore>, ReadDatabase) = if backend == "sqlite" {
                let url = format!("sqlite://{}", dir.path().join("bench.db").display());
                let store = SqliteStore::open(&url, StoreConfig::default()).await?;
                (Arc::new(store.clone()), ReadDatabase::new(Arc::new(store)))
            } else {
                let name = format!("annals_bench_{}", Uuid::new_v4().simple());
                let mut connection = PgConnection::connect(&admin)
                    .await
                    .context("PostgreSQL must be running")?;
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut connection)
                    .await?;
                let (server, _) = admin.rsplit_once('/').context("a URL with a path")?;
                let store =
                    PostgresStore::open(&format!("{server}/{name}"), StoreConfig::default())
                        .await?;
                pg_name = Some(name);
                (Arc::new(store.clone()), ReadDatabase::new(Arc::new(store)))
            };
            let handlers = Handlers::new(store.clone(), HandlerConfig::default());
            let (account_id, deal_id) = won_deal(&handlers).await?;
            let deal = OrderDeal::Won {
                deal_id,
                account_id,
                currency: Currency::parse("EUR")?,
            };
            let saga = Arc::new(ConsumerRunner::new(
                store.clone(),
                db.clone(),
                Consumer::Process(Arc::new(OrderSaga::new(
                    &handlers,
                    chrono::Duration::days(7),
                    Arc::new(annals_consumers::timers::SystemClock),
                ))),
            ));
            saga.register().await?;
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let running = {
                let saga = saga.clone();
                tokio::spawn(async move { saga.run_until_stopped(stopped).await })
            };
            let after = store.head().await?;
            let started = Instant::now();
            let mut tasks = Vec::new();
            for n in 0..CLIENTS {
                let count = orders_per_run / CLIENTS + usize::from(n < orders_per_run % CLIENTS);
                tasks.push(tokio::spawn(client(
                    handlers.of::<Order>(),
                    deal.clone(),
                    count,
                )));
            }
            let mut paid = Vec::new();
            for task in tasks {
                paid.extend(task.await??);
            }
            // Every saga complete: as many fulfilments as orders.
            let deadline = Instant::now() + Duration::from_secs(120);
            let fulfilled = loop {
                let page = store
                    .read_all(
                        after + 1,
                        100_000,
                        &LogFilter::event_types(["OrderFulfilled"]),
                    )
                    .await?;
                if page.events.len() >= orders_per_run {
                    break page.events;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "only {} fulfilled",
                    page.events.len()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let took = started.elapsed().as_secs_f64();
            drop(fulfilled);
            stop.send(true)?;
            running.await?;
            // Payment acknowledged → subscription started, per order.
            let started_at = store
                .read_all(
                    after + 1,
                    100_000,
                    &LogFilter::event_types(["SubscriptionStarted"]),
                )
                .await?
                .events;
            let wall_offset = Utc::now() - chrono::Duration::from_std(Instant::now() - started)?;
            let mut delays: Vec<f64> = Vec::new();
            for (order, at) in &paid {
                let acked = wall_offset + chrono::Duration::from_std(*at - started)?;
                if let Some(event) = started_at
                    .iter()
                    .find(|e| e.data["order_id"] == json!(order))
                {
                    delays.push((event.recorded_at - acked).as_seconds_f64().max(0.0));
                }
            }
            anyhow::ensure!(
                delays.len() == orders_per_run,
                "{} subscriptions",
                delays.len()
            );
            delays.sort_by(f64::total_cmp);
            let quantile = |q: f64| delays[((delays.len() as f64 - 1.0) * q).round() as usize];
            p50s.push(quantile(0.5));
            p99s.push(quantile(0.99));
            sagas.push(orders_per_run as f64 / took);
            saga_commands.push(orders_per_run as f64 * 7.0 / took);

            // Baseline: as many plain commands, from as many clients.
            let timers = handlers.of::<Timer>();
            let plain_started = Instant::now();
            let commands = orders_per_run * 7;
            let mut tasks = Vec::new();
            for n in 0..CLIENTS {
                let timers = timers.clone();
                tasks.push(tokio::spawn(async move {
                    for k in (n..commands).step_by(CLIENTS) {
                        let due = Utc::now() + chrono::Duration::days(30);
                        schedule(
                            &timers,
                            "bench",
                            &format!("plain-{k}"),
                            due,
                            json!({}),
                            &context(),
                        )
                        .await?;
                    }
                    anyhow::Ok(())
                }));
            }
            for task in tasks {
                task.await??;
            }
            let rate = commands as f64 / plain_started.elapsed().as_secs_f64();
            plain.push(rate);
            ratios.push(orders_per_run as f64 * 7.0 / took / rate);
            drop(store);
            drop(db);
            if let Some(name) = pg_name {
                let mut connection = PgConnection::connect(&admin).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut connection)
                    .await?;
            }
        }
        let millis = |v: f64| format!("{:.0} ms", v * 1000.0);
        let whole = |v: f64| format!("{v:.0}");
        println!(
            "| {backend} | {} | {} | {} | {} | {} | {} |",
            spread(&sagas, whole),
            spread(&saga_commands, whole),
            spread(&plain, whole),
            spread(&ratios, |v| format!("{v:.2}")),
            spread(&p50s, millis),
            spread(&p99s, millis),
        );
    }
    Ok(())
}
