//! HTTP load: the real server, in this process on 127.0.0.1:0, driven over keep-alive
//! connections by a seeded mix of commands and queries; beside it, the same mix run
//! in-process on the same system (command handlers and read models, no HTTP).
//!
//! `cargo bench -p annals-benches --bench load` (PostgreSQL at
//! `ANNALS_TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`).
//! `ANNALS_BENCH_SECONDS` (default 10) per measurement, `ANNALS_BENCH_RUNS` (default 3)
//! runs, `ANNALS_BENCH_TASKS` (default 32) concurrent loops, `ANNALS_BENCH_ONLY=sqlite|
//! postgres` narrows it; `ANNALS_BENCH_CLIENT=own` runs the HTTP loops on a Tokio runtime
//! of their own (default: the server's); `RUST_LOG=warn` shows the server's log.
//!
//! Every measurement opens a fresh database (a temporary SQLite file, or a PostgreSQL
//! database created here and dropped afterwards, also on failure), writes a pool
//! through the command handlers (2,000 leads; per loop one account and four deals),
//! starts the projectors (`System::start`, or `serve` for HTTP), waits until they have
//! applied the pool, runs `ANALYZE` on PostgreSQL (autovacuum would have by then on any
//! database older than a few seconds), and runs `TASKS` loops for a warm-up second and
//! then the measured time. The two modes alternate which goes first. Each loop draws its
//! operations from a seeded generator, so the in-process and the HTTP run send the same
//! sequence:
//!
//! - 10% capture a new lead (`POST /leads`, the client chooses the id);
//! - 35% record a signal on a pool lead (`POST /leads/{id}/signals`);
//! - 10% assign one of the loop's own pool leads to the next of eight owners
//!   (`POST /leads/{id}/assign`; never "already assigned");
//! - 15% move one of the loop's own deals: advance it to the next stage while one is
//!   left, then change its amount (`POST /deals/{id}/advance`, `/amount`);
//! - 20% read the lead of the loop's last lead command with `min_position` = the
//!   position of its last command (`GET /leads/{id}?min_position=`);
//! - 10% list the lead board (`GET /leads?limit=50&min_position=`).
//!
//! In-process, commands go to the system's lead and deal handlers and queries to the same
//! consistency wait (`App::consistent`) and read-model queries the routes call. Only 2xx
//! (or `Ok`) counts as done; other answers are counted by status and code. Over HTTP the
//! server's own histograms (`/metrics`) split a request's mean time into the server and
//! the command handler; CPU shares come from `/proc` (this process, `postgres`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use annals_api::auth::RouteAccess;
use annals_api::server::App;
use annals_api::{ApiError, Settings, System, Tokens};
use annals_commands::CommandContext;
use annals_consumers::queries::{self, LeadFilter};
use annals_domain::account::{Account, AccountCommand};
use annals_domain::deal::{Deal, DealCommand};
use annals_domain::lead::{Lead, LeadCommand};
use annals_domain::values::{
    Email, Money, Name, Owner, PersonName, SignalKind, Source, Stage, Tier,
};
use anyhow::Context;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;
use sqlx::{Connection, PgConnection};
use tokio::net::TcpListener;
use uuid::Uuid;

mod support;
use support::{Seeded, drop_pg_database, fresh_pg_database, percentile, spread};

const LEADS: usize = 2_000;
const DEALS_PER_TASK: usize = 4;
const OWNERS: usize = 8;
const WARMUP: Duration = Duration::from_secs(1);
const NAME: &str = "Load Lead";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Capture,
    Signal,
    Assign,
    DealMove,
    GetLead,
    ListLeads,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::Capture,
        Kind::Signal,
        Kind::Assign,
        Kind::DealMove,
        Kind::GetLead,
        Kind::ListLeads,
    ];

    /// Percent of the operations.
    fn weight(self) -> usize {
        match self {
            Kind::Capture => 10,
            Kind::Signal => 35,
            Kind::Assign => 10,
            Kind::DealMove => 15,
            Kind::GetLead => 20,
            Kind::ListLeads => 10,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Capture => "capture `POST /leads`",
            Kind::Signal => "signal `POST /leads/{id}/signals`",
            Kind::Assign => "assign `POST /leads/{id}/assign`",
            Kind::DealMove => "deal move `POST /deals/{id}/advance`, `/amount`",
            Kind::GetLead => "lead `GET /leads/{id}?min_position`",
            Kind::ListLeads => "board `GET /leads?limit=50&min_position`",
        }
    }

    fn is_command(self) -> bool {
        !matches!(self, Kind::GetLead | Kind::ListLeads)
    }

    fn index(self) -> usize {
        self as usize
    }

    fn pick(roll: usize) -> Kind {
        let mut left = roll;
        for kind in Kind::ALL {
            if left < kind.weight() {
                return kind;
            }
            left -= kind.weight();
        }
        Kind::ListLeads
    }
}

#[derive(Debug, Clone)]
enum Op {
    Capture {
        id: Uuid,
        email: String,
        source: Source,
    },
    Signal {
        lead: Uuid,
        kind: SignalKind,
    },
    Assign {
        lead: Uuid,
        owner: String,
    },
    Advance {
        deal: Uuid,
        stage: Stage,
    },
    Amount {
        deal: Uuid,
        amount_minor: i64,
    },
    GetLead {
        lead: Uuid,
        min_position: u64,
    },
    ListLeads {
        min_position: u64,
    },
}

impl Op {
    fn kind(&self) -> Kind {
        match self {
            Op::Capture { .. } => Kind::Capture,
            Op::Signal { .. } => Kind::Signal,
            Op::Assign { .. } => Kind::Assign,
            Op::Advance { .. } | Op::Amount { .. } => Kind::DealMove,
            Op::GetLead { .. } => Kind::GetLead,
            Op::ListLeads { .. } => Kind::ListLeads,
        }
    }

    /// The lead a lead command acts on.
    fn lead(&self) -> Option<Uuid> {
        match self {
            Op::Capture { id, .. } => Some(*id),
            Op::Signal { lead, .. } | Op::Assign { lead, .. } => Some(*lead),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
struct DealState {
    id: Uuid,
    /// Index into `Stage::ALL` of the stage it was last sent to.
    stage: usize,
    amount_minor: i64,
}

/// What the setup wrote: the shared lead pool and each loop's own deals.
struct Pool {
    leads: Arc<Vec<Uuid>>,
    deals: Vec<Vec<DealState>>,
    /// The log position of the last event the setup wrote.
    head: u64,
}

/// One loop's generator and what it knows of its own aggregates.
struct Worker {
    task: usize,
    random: Seeded,
    counter: u64,
    leads: Arc<Vec<Uuid>>,
    /// The loop's own pool leads (index `i` with `i % tasks == task`) and the turn of
    /// the owner each was last sent to (0: none yet).
    own_leads: Vec<(usize, usize)>,
    deals: Vec<DealState>,
    next_deal: usize,
    last_position: u64,
    last_lead: Uuid,
}

impl Worker {
    fn new(task: usize, tasks: usize, pool: &Pool) -> Worker {
        let own_leads = (0..pool.leads.len())
            .filter(|i| i % tasks == task)
            .map(|i| (i, 0))
            .collect();
        let mut random = Seeded(0x9E37_79B9_7F4A_7C15 ^ ((task as u64 + 1) * 0x1000_0001));
        let last_lead = pool.leads[random.below(pool.leads.len())];
        Worker {
            task,
            random,
            counter: 0,
            leads: pool.leads.clone(),
            own_leads,
            deals: pool.deals[task].clone(),
            next_deal: 0,
            last_position: 0,
            last_lead,
        }
    }

    fn next_op(&mut self) -> Op {
        self.counter += 1;
        match Kind::pick(self.random.below(100)) {
            Kind::Capture => Op::Capture {
                id: Uuid::now_v7(),
                email: format!("t{}-n{}@load.example", self.task, self.counter),
                source: Source::ALL[self.counter as usize % Source::ALL.len()],
            },
            Kind::Signal => Op::Signal {
                lead: self.leads[self.random.below(self.leads.len())],
                kind: SignalKind::ALL[self.random.below(SignalKind::ALL.len())],
            },
            Kind::Assign => {
                let pick = self.random.below(self.own_leads.len());
                let (index, turn) = &mut self.own_leads[pick];
                // 1, 2, …, OWNERS, 1, …: never the owner it was last sent to, nor the
                // one before (in case that send failed).
                *turn = *turn % OWNERS + 1;
                Op::Assign {
                    lead: self.leads[*index],
                    owner: format!("rep-{turn}"),
                }
            }
            Kind::DealMove => {
                let n = self.deals.len();
                let deal = &mut self.deals[self.next_deal % n];
                self.next_deal += 1;
                if deal.stage + 1 < Stage::ALL.len() {
                    deal.stage += 1;
                    Op::Advance {
                        deal: deal.id,
                        stage: Stage::ALL[deal.stage],
                    }
                } else {
                    deal.amount_minor += 100;
                    Op::Amount {
                        deal: deal.id,
                        amount_minor: deal.amount_minor,
                    }
                }
            }
            Kind::GetLead => Op::GetLead {
                lead: self.last_lead,
                min_position: self.last_position,
            },
            Kind::ListLeads => Op::ListLeads {
                min_position: self.last_position,
            },
        }
    }

    fn done(&mut self, op: &Op, position: Option<u64>) {
        if let Some(position) = position {
            self.last_position = self.last_position.max(position);
            if let Some(lead) = op.lead() {
                self.last_lead = lead;
            }
        }
    }
}

fn context() -> CommandContext {
    CommandContext {
        actor: "bench".into(),
        ..CommandContext::default()
    }
}

fn capture(id: Uuid, email: &str, source: Source) -> anyhow::Result<LeadCommand> {
    Ok(LeadCommand::Capture {
        lead_id: id,
        email: Email::parse(email)?,
        name: PersonName::parse(NAME)?,
        company: None,
        source,
    })
}

/// Writes the pool through the command handlers (not measured).
async fn setup(system: &Arc<System>, tasks: usize) -> anyhow::Result<Pool> {
    let leads: Vec<Uuid> = (0..LEADS).map(|_| Uuid::now_v7()).collect();
    let mut head = 0;
    let mut writers = Vec::new();
    for part in 0..tasks {
        let system = system.clone();
        let mine: Vec<(usize, Uuid)> = leads
            .iter()
            .copied()
            .enumerate()
            .filter(|(i, _)| i % tasks == part)
            .collect();
        writers.push(tokio::spawn(async move {
            let mut head = 0;
            for (i, id) in mine {
                let source = Source::ALL[i % Source::ALL.len()];
                let command = capture(id, &format!("pool{i}@load.example"), source)?;
                head = head.max(
                    system
                        .handler::<Lead>()
                        .execute(id, command, &context())
                        .await?
                        .position,
                );
            }
            anyhow::Ok(head)
        }));
    }
    for writer in writers {
        head = head.max(writer.await??);
    }
    let mut deals = Vec::new();
    for task in 0..tasks {
        let account = Uuid::now_v7();
        let open = AccountCommand::Open {
            account_id: account,
            name: Name::parse(&format!("Account {task}"))?,
            domain: None,
            industry: None,
            employees: None,
            tier: Tier::Standard,
        };
        system
            .handler::<Account>()
            .execute(account, open, &context())
            .await?;
        let mut own = Vec::new();
        for d in 0..DEALS_PER_TASK {
            let id = Uuid::now_v7();
            let amount_minor = 100_000 + d as i64;
            let open = DealCommand::Open {
                deal_id: id,
                account_id: account,
                account_exists: true,
                name: Name::parse(&format!("Deal {task}-{d}"))?,
                amount: Money::parse("EUR", amount_minor)?,
                owner: None,
                expected_close: None,
            };
            head = head.max(
                system
                    .handler::<Deal>()
                    .execute(id, open, &context())
                    .await?
                    .position,
            );
            own.push(DealState {
                id,
                stage: 0,
                amount_minor,
            });
        }
        deals.push(own);
    }
    Ok(Pool {
        leads: Arc::new(leads),
        deals,
        head,
    })
}

enum Outcome {
    /// 2xx; a command's position.
    Done(Option<u64>),
    /// Another status: "409 concurrency-conflict".
    Refused(String),
    /// No answer (a transport error) or an unreadable one.
    Failed(String),
}

enum Driver {
    InProcess(Arc<App>),
    Http {
        client: reqwest::Client,
        base: String,
    },
}

impl Driver {
    async fn perform(&self, op: &Op) -> Outcome {
        match self {
            Driver::InProcess(app) => match in_process(app, op).await {
                Ok(position) => Outcome::Done(position),
                Err(error) => {
                    let code = error.code();
                    let status = error.into_response().status().as_u16();
                    Outcome::Refused(format!("{status} {code}"))
                }
            },
            Driver::Http { client, base } => over_http(client, base, op).await,
        }
    }

    /// The server's histograms, over HTTP.
    async fn server_times(&self) -> Option<ServerTimes> {
        let Driver::Http { base, .. } = self else {
            return None;
        };
        // A client of this runtime (the loops' may run on another).
        let response = reqwest::get(format!("{base}/metrics")).await.ok()?;
        let text = response.text().await.ok()?;
        Some(ServerTimes::parse(&text))
    }
}

async fn in_process(app: &App, op: &Op) -> Result<Option<u64>, ApiError> {
    let system = &app.system;
    let context = context();
    let outcome = match op {
        Op::Capture { id, email, source } => {
            let command = LeadCommand::Capture {
                lead_id: *id,
                email: Email::parse(email)?,
                name: PersonName::parse(NAME)?,
                company: None,
                source: *source,
            };
            system
                .handler::<Lead>()
                .execute(*id, command, &context)
                .await?
        }
        Op::Signal { lead, kind } => {
            let command = LeadCommand::RecordSignal {
                kind: *kind,
                occurred_at: None,
            };
            system
                .handler::<Lead>()
                .execute(*lead, command, &context)
                .await?
        }
        Op::Assign { lead, owner } => {
            let command = LeadCommand::Assign {
                owner: Owner::parse(owner)?,
            };
            system
                .handler::<Lead>()
                .execute(*lead, command, &context)
                .await?
        }
        Op::Advance { deal, stage } => {
            let command = DealCommand::Advance { stage: *stage };
            system
                .handler::<Deal>()
                .execute(*deal, command, &context)
                .await?
        }
        Op::Amount { deal, amount_minor } => {
            let command = DealCommand::ChangeAmount {
                amount: Money::parse("EUR", *amount_minor)?,
            };
            system
                .handler::<Deal>()
                .execute(*deal, command, &context)
                .await?
        }
        Op::GetLead { lead, min_position } => {
            app.consistent(&["lead_board"], Some(*min_position)).await?;
            queries::lead(&system.db, &lead.to_string())
                .await?
                .ok_or_else(|| ApiError::not_found("lead-not-found", "no such lead"))?;
            return Ok(None);
        }
        Op::ListLeads { min_position } => {
            app.consistent(&["lead_board"], Some(*min_position)).await?;
            queries::leads(&system.db, &LeadFilter::default(), 50, None).await?;
            return Ok(None);
        }
    };
    Ok(Some(outcome.position))
}

#[derive(Deserialize)]
struct Answer {
    position: u64,
}

#[derive(Deserialize)]
struct Problem {
    code: String,
}

async fn over_http(client: &reqwest::Client, base: &str, op: &Op) -> Outcome {
    let request = match op {
        Op::Capture { id, email, source } => client.post(format!("{base}/leads")).json(&json!({
            "id": id, "email": email, "name": NAME, "source": source.as_str(),
        })),
        Op::Signal { lead, kind } => client
            .post(format!("{base}/leads/{lead}/signals"))
            .json(&json!({"kind": kind.as_str()})),
        Op::Assign { lead, owner } => client
            .post(format!("{base}/leads/{lead}/assign"))
            .json(&json!({"owner": owner})),
        Op::Advance { deal, stage } => client
            .post(format!("{base}/deals/{deal}/advance"))
            .json(&json!({"stage": stage.as_str()})),
        Op::Amount { deal, amount_minor } => client
            .post(format!("{base}/deals/{deal}/amount"))
            .json(&json!({"amount": {"currency": "EUR", "amount_minor": amount_minor}})),
        Op::GetLead { lead, min_position } => {
            client.get(format!("{base}/leads/{lead}?min_position={min_position}"))
        }
        Op::ListLeads { min_position } => {
            client.get(format!("{base}/leads?limit=50&min_position={min_position}"))
        }
    };
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) => return Outcome::Failed(format!("send: {error}")),
    };
    let status = response.status();
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(error) => return Outcome::Failed(format!("body: {error}")),
    };
    if !status.is_success() {
        let code = serde_json::from_slice::<Problem>(&body)
            .map(|p| p.code)
            .unwrap_or_else(|_| "(no problem body)".to_owned());
        return Outcome::Refused(format!("{} {code}", status.as_u16()));
    }
    if !op.kind().is_command() {
        return Outcome::Done(None);
    }
    match serde_json::from_slice::<Answer>(&body) {
        Ok(answer) => Outcome::Done(Some(answer.position)),
        Err(error) => Outcome::Failed(format!("answer: {error}")),
    }
}

/// What one loop saw while measuring.
#[derive(Default)]
struct Tally {
    latencies: [Vec<Duration>; 6],
    /// (kind, "status code") → count.
    refused: BTreeMap<(Kind, String), u64>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        for (mine, theirs) in self.latencies.iter_mut().zip(other.latencies) {
            mine.extend(theirs);
        }
        for (key, count) in other.refused {
            *self.refused.entry(key).or_default() += count;
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct KindFigures {
    per_second: f64,
    /// Answers counted (2xx) and their mean latency.
    count: usize,
    mean: Duration,
    p50: Duration,
    p99: Duration,
    p999: Duration,
}

/// Sums and counts of the server's own histograms (`/metrics`), in seconds.
#[derive(Debug, Clone, Copy, Default)]
struct ServerTimes {
    /// `annals_http_request_duration_seconds` of POST routes (from the outermost layer
    /// to the answer, inside the server).
    commands: (f64, f64),
    /// The same for GET routes but `/metrics`.
    queries: (f64, f64),
    /// `annals_append_duration_seconds`: the command handler's `execute`.
    handler: (f64, f64),
}

impl ServerTimes {
    fn parse(text: &str) -> ServerTimes {
        let mut times = ServerTimes::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let (metric, slot) = match name.rsplit_once('_') {
                Some((metric, "sum")) => (metric, 0),
                Some((metric, "count")) => (metric, 1),
                _ => continue,
            };
            let target = match metric {
                "annals_append_duration_seconds" => &mut times.handler,
                "annals_http_request_duration_seconds" if labels.contains("route=\"/metrics\"") => {
                    continue;
                }
                "annals_http_request_duration_seconds" if labels.contains("method=\"POST\"") => {
                    &mut times.commands
                }
                "annals_http_request_duration_seconds" if labels.contains("method=\"GET\"") => {
                    &mut times.queries
                }
                _ => continue,
            };
            if slot == 0 {
                target.0 += value;
            } else {
                target.1 += value;
            }
        }
        times
    }

    fn since(&self, before: &ServerTimes) -> ServerTimes {
        let delta = |a: (f64, f64), b: (f64, f64)| (a.0 - b.0, a.1 - b.1);
        ServerTimes {
            commands: delta(self.commands, before.commands),
            queries: delta(self.queries, before.queries),
            handler: delta(self.handler, before.handler),
        }
    }

    /// Mean in milliseconds.
    fn mean(pair: (f64, f64)) -> f64 {
        if pair.1 > 0.0 {
            pair.0 / pair.1 * 1000.0
        } else {
            f64::NAN
        }
    }
}

/// One measurement (a backend, a mode, a run).
struct Measurement {
    /// HTTP only: the server's own timings over the measured window.
    server: Option<ServerTimes>,
    kinds: [KindFigures; 6],
    commands_per_second: f64,
    requests_per_second: f64,
    refused: BTreeMap<(Kind, String), u64>,
    /// Share of the machine (all cores) busy, and this process's share, while measuring.
    machine_busy: Option<f64>,
    process_busy: Option<f64>,
    postgres_busy: Option<f64>,
}

impl Measurement {
    /// Mean latency in milliseconds of the commands (`true`) or the queries, as the
    /// loops saw it.
    fn mean(&self, commands: bool) -> f64 {
        let (mut total, mut count) = (0.0, 0usize);
        for kind in Kind::ALL.into_iter().filter(|k| k.is_command() == commands) {
            let k = &self.kinds[kind.index()];
            total += k.mean.as_secs_f64() * k.count as f64;
            count += k.count;
        }
        if count == 0 {
            f64::NAN
        } else {
            total / count as f64 * 1000.0
        }
    }
}

/// CPU ticks from /proc, summed over all cores.
#[derive(Clone, Copy)]
struct Ticks {
    busy: u64,
    total: u64,
    /// This process.
    own: u64,
    /// Every process named `postgres` (the server's backends, if it runs here).
    postgres: u64,
}

/// utime + stime of a process, from the text of its `/proc/<pid>/stat`, and its name.
fn process_ticks(stat: &str) -> Option<(&str, u64)> {
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1;
    // The fields after the name: state is the 3rd field of the line, utime the 14th.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

fn cpu_ticks() -> Option<Ticks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().sum();
    let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    let (_, own) = process_ticks(&own)?;
    let mut postgres = 0;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let is_pid = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
        if !is_pid {
            continue;
        }
        if let Ok(text) = std::fs::read_to_string(entry.path().join("stat"))
            && let Some(("postgres", ticks)) = process_ticks(&text)
        {
            postgres += ticks;
        }
    }
    Some(Ticks {
        busy: total - idle,
        total,
        own,
        postgres,
    })
}

struct Config {
    seconds: f64,
    runs: usize,
    tasks: usize,
    only: Option<String>,
    admin: String,
    /// `ANNALS_BENCH_CLIENT=own`: the HTTP loops on a runtime of their own.
    own_client_runtime: bool,
}

/// Runs the loops for the warm-up and the measured time.
async fn run_mix(
    driver: Arc<Driver>,
    pool: &Pool,
    config: &Config,
    runtime: &tokio::runtime::Handle,
) -> anyhow::Result<Measurement> {
    let started = Instant::now();
    let measure_from = started + WARMUP;
    let deadline = measure_from + Duration::from_secs_f64(config.seconds);
    let mut loops = Vec::new();
    for task in 0..config.tasks {
        let driver = driver.clone();
        let mut worker = Worker::new(task, config.tasks, pool);
        loops.push(runtime.spawn(async move {
            let mut tally = Tally::default();
            while Instant::now() < deadline {
                let op = worker.next_op();
                let kind = op.kind();
                let start = Instant::now();
                let outcome = driver.perform(&op).await;
                let measured = start >= measure_from;
                match outcome {
                    Outcome::Done(position) => {
                        worker.done(&op, position);
                        if measured {
                            tally.latencies[kind.index()].push(start.elapsed());
                        }
                    }
                    Outcome::Refused(label) | Outcome::Failed(label) => {
                        if measured {
                            *tally.refused.entry((kind, label)).or_default() += 1;
                        }
                    }
                }
            }
            tally
        }));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu_before = cpu_ticks();
    let server_before = driver.server_times().await;
    tokio::time::sleep_until(deadline.into()).await;
    let cpu_after = cpu_ticks();
    let server_after = driver.server_times().await;
    let mut tally = Tally::default();
    for handle in loops {
        tally.merge(handle.await.context("a load loop panicked")?);
    }
    let elapsed = config.seconds;
    let mut kinds = [KindFigures::default(); 6];
    let mut commands = 0usize;
    let mut requests = 0usize;
    for kind in Kind::ALL {
        let latencies = &mut tally.latencies[kind.index()];
        latencies.sort_unstable();
        requests += latencies.len();
        if kind.is_command() {
            commands += latencies.len();
        }
        let total: Duration = latencies.iter().sum();
        kinds[kind.index()] = KindFigures {
            per_second: latencies.len() as f64 / elapsed,
            count: latencies.len(),
            mean: total / (latencies.len().max(1) as u32),
            p50: percentile(latencies, 0.50),
            p99: percentile(latencies, 0.99),
            p999: percentile(latencies, 0.999),
        };
    }
    let share = |f: fn(&Ticks) -> u64| match (cpu_before, cpu_after) {
        (Some(before), Some(after)) if after.total > before.total => {
            Some(f(&after).saturating_sub(f(&before)) as f64 / (after.total - before.total) as f64)
        }
        _ => None,
    };
    let machine_busy = share(|t| t.busy);
    let process_busy = share(|t| t.own);
    let postgres_busy = share(|t| t.postgres);
    let server = match (server_before, server_after) {
        (Some(before), Some(after)) => Some(after.since(&before)),
        _ => None,
    };
    Ok(Measurement {
        server,
        kinds,
        commands_per_second: commands as f64 / elapsed,
        requests_per_second: requests as f64 / elapsed,
        refused: tally.refused,
        machine_busy,
        process_busy,
        postgres_busy,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    InProcess,
    Http,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::InProcess => "in-process",
            Mode::Http => "HTTP",
        }
    }
}

fn app(system: Arc<System>) -> anyhow::Result<App> {
    let openapi = serde_json::to_value(annals_api::openapi())?;
    Ok(App {
        system,
        tokens: Tokens::anonymous(),
        routes: RouteAccess::from_openapi(&openapi),
        settings: Settings::default(),
        openapi,
    })
}

/// Waits until every projection has applied the setup's events; then, on PostgreSQL,
/// gathers the planner's statistics (`ANALYZE`), as autovacuum would have done on a
/// database older than this one's few seconds (see BENCHMARKS.md for what the board
/// query does without them).
async fn settle(system: &System, url: &str, head: u64) -> anyhow::Result<()> {
    for runner in system.projections() {
        anyhow::ensure!(
            runner.wait_for(head, Duration::from_secs(120)).await,
            "projection {} did not apply the setup's events",
            runner.name()
        );
    }
    if url.starts_with("postgres") {
        let mut connection = PgConnection::connect(url).await?;
        sqlx::query("ANALYZE").execute(&mut connection).await?;
    }
    Ok(())
}

/// One measurement on a fresh database at `url`.
async fn measure(url: &str, mode: Mode, config: &Config) -> anyhow::Result<Measurement> {
    let system = Arc::new(System::open(url).await.context("opening the system")?);
    let pool = setup(&system, config.tasks)
        .await
        .context("writing the pool")?;
    match mode {
        Mode::InProcess => {
            let driver = Arc::new(Driver::InProcess(Arc::new(app(system.clone())?)));
            let background = system.start();
            let result = match settle(&system, url, pool.head).await {
                Ok(()) => run_mix(driver, &pool, config, &tokio::runtime::Handle::current()).await,
                Err(error) => Err(error),
            };
            background.stop().await;
            result
        }
        Mode::Http => {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let address = listener.local_addr()?;
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(config.tasks)
                .timeout(Duration::from_secs(60))
                .build()?;
            let driver = Arc::new(Driver::Http {
                client,
                base: format!("http://{address}"),
            });
            // The loops (and so reqwest's connection tasks) run on a runtime of their own
            // when asked, like a client in another process would.
            let client_runtime = if config.own_client_runtime {
                Some(
                    tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()?,
                )
            } else {
                None
            };
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(annals_api::serve(
                listener,
                system.clone(),
                Tokens::anonymous(),
                Settings::default(),
                async move {
                    let _ = stopped.await;
                },
            ));
            let result = match settle(&system, url, pool.head).await {
                Ok(()) => match &client_runtime {
                    Some(runtime) => run_mix(driver, &pool, config, runtime.handle()).await,
                    None => {
                        run_mix(driver, &pool, config, &tokio::runtime::Handle::current()).await
                    }
                },
                Err(error) => Err(error),
            };
            if let Some(runtime) = client_runtime {
                runtime.shutdown_background();
            }
            let _ = stop.send(());
            server
                .await
                .context("the server task panicked")?
                .context("the server failed")?;
            result
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        }
    }

    /// As `ANNALS_BENCH_ONLY` names it.
    fn key(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

async fn measure_on(
    backend: Backend,
    mode: Mode,
    config: &Config,
    dir: &tempfile::TempDir,
    n: usize,
) -> anyhow::Result<Measurement> {
    match backend {
        Backend::Sqlite => {
            let path = dir.path().join(format!("load-{n}.db"));
            let url = format!("sqlite://{}", path.display());
            measure(&url, mode, config).await
        }
        Backend::Postgres => {
            let (url, name) = fresh_pg_database(&config.admin, "load").await?;
            let result = measure(&url, mode, config).await;
            let dropped = drop_pg_database(&config.admin, &name).await;
            let measurement = result?;
            dropped.with_context(|| format!("dropping database {name}"))?;
            Ok(measurement)
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn whole(v: f64) -> String {
    format!("{v:.0}")
}

fn millis(v: f64) -> String {
    format!("{v:.2}")
}

fn percent(v: f64) -> String {
    format!("{:.0}%", v * 100.0)
}

fn print_measurement(backend: Backend, mode: Mode, run: usize, m: &Measurement) {
    let cpu = match (m.machine_busy, m.process_busy, m.postgres_busy) {
        (Some(machine), Some(process), Some(postgres)) => format!(
            "; machine {} busy: this process {}, postgres {}",
            percent(machine),
            percent(process),
            percent(postgres)
        ),
        _ => String::new(),
    };
    println!(
        "run {run}, {}, {}: {:.0} commands/s, {:.0} requests/s{cpu}",
        backend.name(),
        mode.name(),
        m.commands_per_second,
        m.requests_per_second,
    );
    for kind in Kind::ALL {
        let k = m.kinds[kind.index()];
        println!(
            "    {:<50} {:>7.0}/s  p50 {:>7} ms  p99 {:>7} ms  p99.9 {:>7} ms",
            kind.name(),
            k.per_second,
            ms(k.p50),
            ms(k.p99),
            ms(k.p999)
        );
    }
    match &m.server {
        Some(server) => println!(
            "    mean ms: commands {:.2} at the client, {:.2} in the server, {:.2} in the handler; \
             queries {:.2} at the client, {:.2} in the server",
            m.mean(true),
            ServerTimes::mean(server.commands),
            ServerTimes::mean(server.handler),
            m.mean(false),
            ServerTimes::mean(server.queries),
        ),
        None => println!(
            "    mean ms: commands {:.2}, queries {:.2}",
            m.mean(true),
            m.mean(false)
        ),
    }
    for ((kind, label), count) in &m.refused {
        println!("    not 2xx: {} → {label}: {count}", kind.name());
    }
}

fn summary(backend: Backend, results: &[(Measurement, Measurement)], config: &Config) {
    let pick = |f: &dyn Fn(&Measurement, &Measurement) -> f64| -> Vec<f64> {
        results.iter().map(|(i, h)| f(i, h)).collect()
    };
    println!(
        "\n### {} ({} runs of {} s, {} loops)\n",
        backend.name(),
        results.len(),
        config.seconds,
        config.tasks
    );
    println!("| figure | median (min–max) |");
    println!("|---|---|");
    let row = |name: &str, values: Vec<f64>, format: fn(f64) -> String| {
        println!("| {name} | {} |", spread(&values, format));
    };
    row(
        "in-process commands/s",
        pick(&|i, _| i.commands_per_second),
        whole,
    );
    row(
        "HTTP commands/s",
        pick(&|_, h| h.commands_per_second),
        whole,
    );
    row(
        "HTTP ÷ in-process (commands/s, same run)",
        pick(&|i, h| h.commands_per_second / i.commands_per_second),
        |v| format!("{v:.2}×"),
    );
    row(
        "in-process operations/s (commands + queries)",
        pick(&|i, _| i.requests_per_second),
        whole,
    );
    row(
        "HTTP requests/s (2xx, commands + queries)",
        pick(&|_, h| h.requests_per_second),
        whole,
    );
    let busy = |f: &dyn Fn(&Measurement) -> Option<f64>| {
        (
            spread(&pick(&|i, _| f(i).unwrap_or(f64::NAN)), percent),
            spread(&pick(&|_, h| f(h).unwrap_or(f64::NAN)), percent),
        )
    };
    let server = |f: fn(&ServerTimes) -> (f64, f64)| {
        let values = pick(&|_, h| {
            h.server
                .as_ref()
                .map_or(f64::NAN, |s| ServerTimes::mean(f(s)))
        });
        spread(&values, millis)
    };
    println!(
        "| mean command latency ms: in-process / HTTP at the client / in the server / in the handler | {} / {} / {} / {} |",
        spread(&pick(&|i, _| i.mean(true)), millis),
        spread(&pick(&|_, h| h.mean(true)), millis),
        server(|s| s.commands),
        server(|s| s.handler),
    );
    println!(
        "| mean query latency ms: in-process / HTTP at the client / in the server | {} / {} / {} |",
        spread(&pick(&|i, _| i.mean(false)), millis),
        spread(&pick(&|_, h| h.mean(false)), millis),
        server(|s| s.queries),
    );
    let (inp, http) = busy(&|m| m.machine_busy);
    println!("| machine busy (all cores), in-process / HTTP | {inp} / {http} |");
    let (inp, http) = busy(&|m| m.process_busy);
    println!("| this process (share of all cores), in-process / HTTP | {inp} / {http} |");
    let (inp, http) = busy(&|m| m.postgres_busy);
    println!("| postgres processes (share of all cores), in-process / HTTP | {inp} / {http} |");

    println!(
        "\n| kind | HTTP req/s | HTTP p50 ms | HTTP p99 ms | HTTP p99.9 ms | in-process ops/s | in-process p50 ms | in-process p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for kind in Kind::ALL {
        let i = kind.index();
        let figure = |f: &dyn Fn(&KindFigures) -> f64, http: bool| -> Vec<f64> {
            results
                .iter()
                .map(|(inp, h)| f(if http { &h.kinds[i] } else { &inp.kinds[i] }))
                .collect()
        };
        let rate = |k: &KindFigures| k.per_second;
        let p50 = |k: &KindFigures| k.p50.as_secs_f64() * 1000.0;
        let p99 = |k: &KindFigures| k.p99.as_secs_f64() * 1000.0;
        let p999 = |k: &KindFigures| k.p999.as_secs_f64() * 1000.0;
        println!(
            "| {} ({}%) | {} | {} | {} | {} | {} | {} | {} |",
            kind.name(),
            kind.weight(),
            spread(&figure(&rate, true), whole),
            spread(&figure(&p50, true), millis),
            spread(&figure(&p99, true), millis),
            spread(&figure(&p999, true), millis),
            spread(&figure(&rate, false), whole),
            spread(&figure(&p50, false), millis),
            spread(&figure(&p99, false), millis),
        );
    }
    for (mode, side) in [(Mode::InProcess, false), (Mode::Http, true)] {
        let mut refused: BTreeMap<(Kind, String), u64> = BTreeMap::new();
        for (i, h) in results {
            for (key, count) in if side { &h.refused } else { &i.refused } {
                *refused.entry(key.clone()).or_default() += count;
            }
        }
        if refused.is_empty() {
            println!("\n{}: every answer 2xx.", mode.name());
        } else {
            println!("\n{}: answers other than 2xx over all runs:", mode.name());
            for ((kind, label), count) in refused {
                println!("- {} → {label}: {count}", kind.name());
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let number = |name: &str, default: f64| -> f64 {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let config = Config {
        seconds: number("ANNALS_BENCH_SECONDS", 10.0),
        runs: (number("ANNALS_BENCH_RUNS", 3.0) as usize).max(1),
        tasks: (number("ANNALS_BENCH_TASKS", 32.0) as usize).max(1),
        only: std::env::var("ANNALS_BENCH_ONLY").ok(),
        own_client_runtime: std::env::var("ANNALS_BENCH_CLIENT").is_ok_and(|v| v == "own"),
        admin: std::env::var("ANNALS_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned()),
    };
    let backends: Vec<Backend> = [Backend::Sqlite, Backend::Postgres]
        .into_iter()
        .filter(|b| config.only.as_deref().is_none_or(|only| only == b.key()))
        .collect();
    println!(
        "Mix of {}: {} loops, {} s warm-up + {} s measured, {} runs; pool {LEADS} leads, {DEALS_PER_TASK} deals per loop\n",
        Kind::ALL
            .iter()
            .map(|k| format!("{}% {}", k.weight(), k.name()))
            .collect::<Vec<_>>()
            .join(", "),
        config.tasks,
        WARMUP.as_secs(),
        config.seconds,
        config.runs,
    );
    let dir = tempfile::tempdir()?;
    let mut results: Vec<(Backend, Vec<(Measurement, Measurement)>)> =
        backends.iter().map(|b| (*b, Vec::new())).collect();
    let mut n = 0;
    for run in 1..=config.runs {
        for (backend, runs) in &mut results {
            // The two modes alternate which goes first.
            let order = if run % 2 == 1 {
                [Mode::InProcess, Mode::Http]
            } else {
                [Mode::Http, Mode::InProcess]
            };
            let mut in_process = None;
            let mut http = None;
            for mode in order {
                n += 1;
                let m = measure_on(*backend, mode, &config, &dir, n)
                    .await
                    .with_context(|| format!("run {run}, {}, {}", backend.name(), mode.name()))?;
                print_measurement(*backend, mode, run, &m);
                match mode {
                    Mode::InProcess => in_process = Some(m),
                    Mode::Http => http = Some(m),
                }
            }
            if let (Some(i), Some(h)) = (in_process, http) {
                println!(
                    "run {run}, {}: HTTP ÷ in-process commands/s = {:.2}×\n",
                    backend.name(),
                    h.commands_per_second / i.commands_per_second
                );
                runs.push((i, h));
            }
        }
    }
    for (backend, runs) in &results {
        summary(*backend, runs, &config);
    }
    Ok(())
}
