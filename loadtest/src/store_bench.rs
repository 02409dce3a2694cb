//! `chappe-loadtest store`: the CQL store next to the embedded store, in
//! one run, on the same machine (issue 6's benchmark).
//!
//! For each store, in alternating rounds (embedded, CQL, embedded, CQL, …,
//! so that a slow moment of the machine falls on both):
//!
//! - **store**: `--concurrency` tasks insert `--messages` messages in all
//!   with `MessageRepo::insert_message`, the call a sent message costs the
//!   store, each task into a conversation of its own: stored messages/s
//!   and the latency of one insert (p50, p99);
//! - **service**: the same through a fanout on an in-process bus
//!   (`chappe.rpc.fanout.submit`: membership check, insert, delivery job):
//!   acknowledged messages/s and the latency of one submit.
//!
//! Then, on the CQL store only, the requests sent to the database (counted
//! by [`CqlStore::round_trips`], per table and kind), per sent message for
//! each of `--group-sizes` (the delivery jobs included: the count is taken
//! once every message reached the last member), and per sync of a device
//! (from scratch, and when nothing is new).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use chappe_bus::memory::MemoryBus;
use chappe_bus::rpc;
use chappe_bus::subjects::{FanoutMethod, Subjects};
use chappe_bus::{Bus, Subscription};
use chappe_fanout::{Fanout, FanoutConfig, FanoutStore};
use chappe_proto::ids::{ConversationId, MessageIdGenerator, UserId};
use chappe_proto::internal as wire;
use chappe_proto::v1;
use chappe_storage::cql::{self, CqlConfig, CqlStore, RequestKind, RoundTrips};
use chappe_storage::{EmbeddedStore, MessageRow};
use clap::Args;
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::nats_bench::{Latency, latency, loadavg};
use crate::report::Machine;

/// `chappe-loadtest store`.
#[derive(Debug, Clone, Args)]
pub struct StoreBenchArgs {
    /// The CQL cluster, as `--store` takes it:
    /// `scylla://HOST:9042/KEYSPACE?dc=DC&rf=DC:1`. The keyspace is
    /// migrated first (created when missing) and filled with the
    /// benchmark's conversations: name one of its own.
    #[arg(long, env = "CHAPPE_BENCH_CQL")]
    pub cql: String,
    /// The embedded store's file (default: one in a temporary directory).
    #[arg(long)]
    pub embedded: Option<PathBuf>,
    /// Messages per store per round, in each of the two phases.
    #[arg(long, default_value_t = 4000)]
    pub messages: usize,
    /// Inserts (or submits) in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Alternating rounds of both stores.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Group sizes whose requests per sent message are counted.
    #[arg(long, value_delimiter = ',', default_value = "2,50")]
    pub group_sizes: Vec<usize>,
    /// Messages sent per group size when counting requests.
    #[arg(long, default_value_t = 100)]
    pub count_messages: usize,
    /// Ciphertext bytes of one message.
    #[arg(long, default_value_t = 512)]
    pub message_bytes: usize,
    /// Where to write the JSON report (`-`: stdout, and no text).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// What `chappe-loadtest store` measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreBenchReport {
    pub machine: Machine,
    pub loadavg_before: String,
    pub loadavg_after: String,
    pub messages: usize,
    pub concurrency: usize,
    pub message_bytes: usize,
    /// One per store per round, in the order run.
    pub runs: Vec<StoreRun>,
    /// Per store and phase, over every round: messages/s (the mean of the
    /// rounds) and the CQL/embedded ratio.
    pub summary: Vec<PhaseSummary>,
    /// Requests to the CQL database per sent message, per group size.
    pub per_message: Vec<RoundTripCount>,
    /// Requests to the CQL database per sync.
    pub per_sync: Vec<RoundTripCount>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreRun {
    pub round: usize,
    pub store: String,
    pub phase: String,
    pub messages: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub latency: Option<Latency>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseSummary {
    pub phase: String,
    pub embedded_per_second: f64,
    pub cql_per_second: f64,
    /// CQL messages/s over embedded messages/s.
    pub ratio: f64,
    pub embedded_p99_us: u64,
    pub cql_p99_us: u64,
}

/// Requests counted over `operations` operations.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundTripCount {
    pub what: String,
    pub operations: u64,
    /// Every request, per operation.
    pub total: f64,
    pub reads: f64,
    pub writes: f64,
    pub lwts: f64,
    /// Writes to the `messages` table, per operation.
    pub message_writes: f64,
    /// `table kind: requests per operation`, every table that had one.
    pub tables: Vec<String>,
}

const STORES: [&str; 2] = ["embedded", "cql"];
const PHASES: [&str; 2] = ["store", "service"];
/// Patience for one request of the benchmark.
const T: Duration = Duration::from_secs(30);

pub async fn run(args: StoreBenchArgs) -> Result<()> {
    if args.concurrency == 0 || args.messages < args.concurrency {
        bail!("--messages must be at least --concurrency, which must be at least 1");
    }
    let config = CqlConfig::from_url(&args.cql).context("--cql")?;
    let session = cql::open_session(&config)
        .await
        .with_context(|| format!("connecting to {}", args.cql))?;
    cql::migrate(&session, &config)
        .await
        .context("migrating the benchmark's keyspace")?;
    let cql = CqlStore::with_session(Arc::new(session), &config).await?;
    let tmp = tempfile::tempdir()?;
    let path = args
        .embedded
        .clone()
        .unwrap_or_else(|| tmp.path().join("bench.db"));
    let embedded =
        EmbeddedStore::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let stores: [Arc<dyn FanoutStore>; 2] = [Arc::new(embedded), Arc::new(cql.clone())];

    let loadavg_before = loadavg();
    let mut runs = Vec::new();
    for round in 1..=args.rounds {
        for (name, store) in STORES.iter().zip(&stores) {
            let rig = Rig::start(store.clone()).await?;
            let (n, seconds, hist) = insert_directly(&rig, store.clone(), &args).await?;
            runs.push(run_of(round, name, "store", n, seconds, &hist));
            let (n, seconds, hist) = submit_through_fanout(&rig, &args).await?;
            runs.push(run_of(round, name, "service", n, seconds, &hist));
            rig.stop().await;
            eprintln!("round {round} {name}: done");
        }
    }

    let rig = Rig::start(stores[1].clone()).await?;
    let mut per_message = Vec::new();
    let mut per_sync = Vec::new();
    for &size in &args.group_sizes {
        let (sent, synced) = count_round_trips(&rig, &cql, size, &args).await?;
        per_message.push(sent);
        per_sync.extend(synced);
    }
    rig.stop().await;

    let report = StoreBenchReport {
        machine: Machine::detect(),
        loadavg_before,
        loadavg_after: loadavg(),
        messages: args.messages,
        concurrency: args.concurrency,
        message_bytes: args.message_bytes,
        summary: summarize(&runs),
        runs,
        per_message,
        per_sync,
    };
    crate::output::emit(&report, args.out.as_deref(), || text(&report))
}

fn run_of(
    round: usize,
    store: &str,
    phase: &str,
    messages: u64,
    seconds: f64,
    hist: &Histogram<u64>,
) -> StoreRun {
    StoreRun {
        round,
        store: store.into(),
        phase: phase.into(),
        messages,
        seconds,
        per_second: messages as f64 / seconds,
        latency: latency(hist),
    }
}

/// A fanout on an in-process bus over one store.
struct Rig {
    caller: Arc<Caller>,
    fanout: Fanout,
}

/// Calls the rig's fanout over its bus (shared by the sending tasks).
struct Caller {
    bus: Arc<dyn Bus>,
    subjects: Subjects,
}

impl Rig {
    async fn start(store: Arc<dyn FanoutStore>) -> Result<Rig> {
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::default());
        let subjects = Subjects::default();
        let fanout = Fanout::start(
            FanoutConfig::default(),
            store,
            bus.clone(),
            subjects.clone(),
        )
        .await?;
        Ok(Rig {
            caller: Arc::new(Caller { bus, subjects }),
            fanout,
        })
    }

    async fn stop(self) {
        self.fanout.stop().await;
    }
}

impl std::ops::Deref for Rig {
    type Target = Caller;

    fn deref(&self) -> &Caller {
        &self.caller
    }
}

impl Caller {
    async fn call<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        method: FanoutMethod,
        request: &Req,
    ) -> Result<Resp> {
        Ok(rpc::call(&*self.bus, &self.subjects.fanout(method), request, T).await?)
    }

    /// A conversation of `creator` with `others`; its id.
    async fn conversation(&self, creator: &str, others: Vec<String>) -> Result<String> {
        let kind = if others.len() == 1 {
            v1::ConversationKind::Direct
        } else {
            v1::ConversationKind::Group
        };
        let created: v1::CreateConversationResponse = self
            .call(
                FanoutMethod::CreateConversation,
                &wire::CreateConversation {
                    actor: device(creator),
                    request: Some(v1::CreateConversationRequest {
                        kind: kind as i32,
                        member_user_ids: others,
                    }),
                },
            )
            .await?;
        Ok(created
            .conversation
            .context("no conversation")?
            .conversation_id)
    }

    async fn submit(&self, sender: &str, message: v1::SendMessage) -> Result<v1::SendResult> {
        self.call(
            FanoutMethod::Submit,
            &wire::Submit {
                actor: device(sender),
                request: Some(message),
            },
        )
        .await
    }

    async fn sync(
        &self,
        user: &str,
        cursors: Vec<v1::ConversationCursor>,
    ) -> Result<v1::SyncResponse> {
        self.call(
            FanoutMethod::Sync,
            &wire::Sync {
                actor: device(user),
                request: Some(v1::SyncRequest {
                    cursors,
                    ..Default::default()
                }),
            },
        )
        .await
    }

    async fn deliveries_of(&self, user: &str) -> Result<Subscription> {
        let user = UserId::parse(user)?;
        Ok(self
            .bus
            .subscribe(&self.subjects.deliver_user(&user))
            .await?)
    }
}

fn device(user: &str) -> Option<v1::DeviceRef> {
    Some(v1::DeviceRef {
        user_id: user.into(),
        device_id: "D1".into(),
    })
}

/// Users of this run only: every round and store starts from empty
/// conversations.
fn run_tag() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// `--concurrency` tasks, each with a conversation of its own, together
/// `--messages` calls of `insert_message`.
async fn insert_directly(
    rig: &Rig,
    store: Arc<dyn FanoutStore>,
    args: &StoreBenchArgs,
) -> Result<(u64, f64, Histogram<u64>)> {
    let tag = run_tag();
    let ids = Arc::new(MessageIdGenerator::new());
    let per_task = args.messages / args.concurrency;
    let mut tasks = Vec::new();
    let start = Instant::now();
    for task in 0..args.concurrency {
        let sender = format!("s{tag}x{task}");
        let conversation = rig
            .conversation(&sender, vec![format!("r{tag}x{task}")])
            .await?;
        let conversation = ConversationId::parse(&conversation)?;
        let (store, ids) = (store.clone(), ids.clone());
        let bytes = args.message_bytes;
        tasks.push(tokio::spawn(async move {
            let mut hist = new_histogram();
            for i in 0..per_task {
                let message_id = ids.next();
                let row = MessageRow {
                    conversation_id: conversation,
                    message_id,
                    sender_user_id: sender.clone(),
                    sender_device_id: "D1".into(),
                    client_msg_id: format!("c{i}"),
                    ciphertext: megolm(bytes).0,
                    session_id: "bench".into(),
                    sent_at_ms: message_id.timestamp_ms() as i64,
                };
                let t = Instant::now();
                store.insert_message(&row).await?;
                record(&mut hist, t);
            }
            anyhow::Ok(hist)
        }));
    }
    finish(tasks, per_task, args.concurrency, start).await
}

/// The same through the fanout: `Submit` requests.
async fn submit_through_fanout(
    rig: &Rig,
    args: &StoreBenchArgs,
) -> Result<(u64, f64, Histogram<u64>)> {
    let tag = run_tag();
    let per_task = args.messages / args.concurrency;
    let mut conversations = Vec::new();
    for task in 0..args.concurrency {
        let sender = format!("s{tag}x{task}");
        let conversation = rig
            .conversation(&sender, vec![format!("r{tag}x{task}")])
            .await?;
        conversations.push((sender, conversation));
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (sender, conversation) in conversations {
        let rig = rig.caller.clone();
        let bytes = args.message_bytes;
        tasks.push(tokio::spawn(async move {
            let mut hist = new_histogram();
            for i in 0..per_task {
                let t = Instant::now();
                rig.submit(&sender, message(&conversation, i, bytes))
                    .await?;
                record(&mut hist, t);
            }
            anyhow::Ok(hist)
        }));
    }
    finish(tasks, per_task, args.concurrency, start).await
}

fn message(conversation: &str, i: usize, bytes: usize) -> v1::SendMessage {
    let (ciphertext, session_id) = megolm(bytes);
    v1::SendMessage {
        conversation_id: conversation.into(),
        client_msg_id: format!("c{i}"),
        ciphertext,
        session_id,
    }
}

/// A Megolm message (fanout checks the format) of about `bytes` bytes,
/// made once per size: encrypting is the clients' work, not the store's.
fn megolm(bytes: usize) -> (Vec<u8>, String) {
    static MADE: std::sync::Mutex<Option<(usize, Vec<u8>, String)>> = std::sync::Mutex::new(None);
    let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
    match &*made {
        Some((size, ciphertext, session)) if *size == bytes => {
            (ciphertext.clone(), session.clone())
        }
        _ => {
            let mut session =
                vodozemac::megolm::GroupSession::new(vodozemac::megolm::SessionConfig::version_1());
            // A Megolm message adds about 100 bytes (version, index, MAC,
            // signature) to its plaintext.
            let plaintext = "x".repeat(bytes.saturating_sub(100));
            let ciphertext = session.encrypt(plaintext).to_bytes();
            let id = session.session_id();
            *made = Some((bytes, ciphertext.clone(), id.clone()));
            (ciphertext, id)
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn record(hist: &mut Histogram<u64>, since: Instant) {
    let us = since.elapsed().as_micros().clamp(1, 60_000_000) as u64;
    hist.record(us).expect("within the histogram's bounds");
}

async fn finish(
    tasks: Vec<tokio::task::JoinHandle<Result<Histogram<u64>>>>,
    per_task: usize,
    concurrency: usize,
    start: Instant,
) -> Result<(u64, f64, Histogram<u64>)> {
    let mut all = new_histogram();
    for task in tasks {
        all.add(task.await??)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(((per_task * concurrency) as u64, seconds, all))
}

/// Requests per sent message in a group of `size` (the delivery jobs
/// included), then per sync of a member's device.
async fn count_round_trips(
    rig: &Rig,
    cql: &CqlStore,
    size: usize,
    args: &StoreBenchArgs,
) -> Result<(RoundTripCount, Vec<RoundTripCount>)> {
    let tag = run_tag();
    let sender = format!("g{tag}x0");
    let others: Vec<String> = (1..size).map(|i| format!("g{tag}x{i}")).collect();
    let last = others.last().context("a group of at least two")?.clone();
    let conversation = rig.conversation(&sender, others).await?;
    let mut deliveries = rig.deliveries_of(&last).await?;
    // One message first, so that the caches a conversation's first message
    // fills (it exists, its time bucket is written) are warm, as they are
    // for all but the first message of a conversation.
    rig.submit(&sender, message(&conversation, 0, args.message_bytes))
        .await?;
    await_deliveries(&mut deliveries, 1).await?;

    let before = cql.round_trips();
    for i in 1..=args.count_messages {
        rig.submit(&sender, message(&conversation, i, args.message_bytes))
            .await?;
    }
    await_deliveries(&mut deliveries, args.count_messages).await?;
    let sent = counted(
        format!("sent message, group of {size}"),
        args.count_messages as u64,
        &cql.round_trips().since(&before),
    );

    let mut syncs = Vec::new();
    if size == 2 {
        let before = cql.round_trips();
        let first = rig.sync(&last, Vec::new()).await?;
        syncs.push(counted(
            format!(
                "sync from scratch (1 conversation, {} messages)",
                1 + args.count_messages
            ),
            1,
            &cql.round_trips().since(&before),
        ));
        let cursors = first
            .conversations
            .iter()
            .map(|c| v1::ConversationCursor {
                conversation_id: c
                    .conversation
                    .as_ref()
                    .map(|c| c.conversation_id.clone())
                    .unwrap_or_default(),
                message_id: c
                    .messages
                    .last()
                    .map(|m| m.message_id.clone())
                    .unwrap_or_default(),
            })
            .collect();
        let before = cql.round_trips();
        rig.sync(&last, cursors).await?;
        syncs.push(counted(
            "sync with nothing new (1 conversation)".into(),
            1,
            &cql.round_trips().since(&before),
        ));
    }
    Ok((sent, syncs))
}

/// Waits for `n` messages delivered to a member.
async fn await_deliveries(deliveries: &mut Subscription, n: usize) -> Result<()> {
    let mut seen = 0;
    while seen < n {
        let m = tokio::time::timeout(T, deliveries.next())
            .await
            .context("deliveries stopped coming")?
            .context("the delivery subscription ended")?;
        let delivery = wire::UserDelivery::decode(m.payload)?;
        if let Some(wire::user_delivery::Item::Message(_)) = delivery.item {
            seen += 1;
        }
    }
    Ok(())
}

fn counted(what: String, operations: u64, trips: &RoundTrips) -> RoundTripCount {
    let per = |n: u64| n as f64 / operations as f64;
    RoundTripCount {
        what,
        operations,
        total: per(trips.total()),
        reads: per(trips.of(RequestKind::Read)),
        writes: per(trips.of(RequestKind::Write)),
        lwts: per(trips.of(RequestKind::Lwt)),
        message_writes: per(trips.table("messages", RequestKind::Write)),
        tables: trips
            .iter()
            .map(|(table, kind, n)| format!("{table} {kind:?}: {:.2}", per(n)))
            .collect(),
    }
}

fn summarize(runs: &[StoreRun]) -> Vec<PhaseSummary> {
    PHASES
        .iter()
        .map(|phase| {
            let of = |store: &str| -> Vec<&StoreRun> {
                runs.iter()
                    .filter(|r| r.phase == *phase && r.store == store)
                    .collect()
            };
            let mean = |rs: &[&StoreRun]| {
                rs.iter().map(|r| r.per_second).sum::<f64>() / rs.len().max(1) as f64
            };
            let worst_p99 = |rs: &[&StoreRun]| {
                rs.iter()
                    .filter_map(|r| r.latency.as_ref().map(|l| l.p99_us))
                    .max()
                    .unwrap_or(0)
            };
            let (e, c) = (of("embedded"), of("cql"));
            let (ep, cp) = (mean(&e), mean(&c));
            PhaseSummary {
                phase: (*phase).into(),
                embedded_per_second: ep,
                cql_per_second: cp,
                ratio: if ep > 0.0 { cp / ep } else { 0.0 },
                embedded_p99_us: worst_p99(&e),
                cql_p99_us: worst_p99(&c),
            }
        })
        .collect()
}

fn text(report: &StoreBenchReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "store benchmark: {} messages of {} B per store and phase, {} in flight; {} cpus; load {} -> {}",
        report.messages,
        report.message_bytes,
        report.concurrency,
        report.machine.cpus,
        report.loadavg_before,
        report.loadavg_after
    );
    let _ = writeln!(
        out,
        "{:>5} {:>9} {:>8} {:>10} {:>9} {:>9} {:>9}",
        "round", "store", "phase", "msgs/s", "p50 ms", "p99 ms", "max ms"
    );
    for r in &report.runs {
        let (p50, p99, max) = r
            .latency
            .as_ref()
            .map(|l| (l.p50_us, l.p99_us, l.max_us))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:>5} {:>9} {:>8} {:>10.0} {:>9.2} {:>9.2} {:>9.2}",
            r.round,
            r.store,
            r.phase,
            r.per_second,
            p50 as f64 / 1e3,
            p99 as f64 / 1e3,
            max as f64 / 1e3
        );
    }
    for s in &report.summary {
        let _ = writeln!(
            out,
            "{}: cql {:.0}/s vs embedded {:.0}/s (ratio {:.2}); worst p99 cql {:.2} ms, embedded {:.2} ms",
            s.phase,
            s.cql_per_second,
            s.embedded_per_second,
            s.ratio,
            s.cql_p99_us as f64 / 1e3,
            s.embedded_p99_us as f64 / 1e3
        );
    }
    for c in report.per_message.iter().chain(&report.per_sync) {
        let _ = writeln!(
            out,
            "{} (over {}): {:.2} requests (reads {:.2}, writes {:.2}, LWT {:.2}; messages-table writes {:.2})",
            c.what, c.operations, c.total, c.reads, c.writes, c.lwts, c.message_writes
        );
        for t in &c.tables {
            let _ = writeln!(out, "    {t}");
        }
    }
    out
}
