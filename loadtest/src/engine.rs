//! One worker's run: set up devices and conversations, offer load in the
//! chosen model, count every send and every delivery, and report.
//!
//! Every send carries the wall-clock time it was *due* (open model) or
//! issued (closed model), so that a recipient in any process computes
//! send→delivered without a shared clock object, and so that the open
//! model charges queueing time to the server rather than hiding it.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chappe_client::ids::{ConversationId, UserId};
use chappe_client::{Client, ClientConfig, ConversationKind, Event, KdfParams};
use chappe_proto::v1::{self, SendMessage, client_frame, server_frame};
use hdrhistogram::Histogram;
use rand::Rng;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tonic::Code;

use crate::config::{Crypto, Mode, RunArgs, Scenario};
use crate::measure::{Metric, Recorder};
use crate::raw::{CallError, RawDevice};
use crate::report::{
    CryptoMode, LoadMode, LoadModel, Machine, Report, RunMeta, SetupReport, StepWindow, Worker,
};

/// Wall-clock microseconds since the Unix epoch.
pub fn wall_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The gRPC status of an SDK error; errors of the client itself (crypto,
/// local state) count as UNKNOWN.
fn code_of(e: &chappe_client::Error) -> Code {
    e.code().unwrap_or(Code::Unknown)
}

/// What went wrong in a run (not in a send: those are counted).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("setting up {what}: {message}")]
    Setup { what: String, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A simulated device.
enum Device {
    Sdk(Client),
    Raw(Arc<RawDevice>),
}

/// One source of sends: a device and the conversation it writes to.
#[derive(Clone)]
struct Slot {
    device: usize,
    conversation: usize,
    /// Devices that must receive each message of this slot.
    recipients: u64,
}

struct Conversation {
    id: ConversationId,
    /// Megolm session of pre-encrypted payloads, by message size.
    payloads: Vec<(usize, Vec<u8>)>,
    session_id: String,
}

/// Counts deliveries once per (device, message), whatever the path.
struct Tally {
    recorder: Recorder,
    seen: Vec<Mutex<HashSet<String>>>,
    delivered: AtomicU64,
    expected: AtomicU64,
    steps: Mutex<Vec<LiveStep>>,
    /// Ciphertext lengths of pre-encrypted payloads (what recipients check).
    payload_lengths: Mutex<HashSet<usize>>,
}

/// A step of step mode as it runs: sends due in [start, end) belong to it.
struct LiveStep {
    start: u64,
    end: u64,
    latencies: Histogram<u64>,
    errors: u64,
}

impl Tally {
    fn delivery(&self, device: usize, message_id: &str, due_micros: u64) {
        let fresh = self.seen[device]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(message_id.to_owned());
        if !fresh {
            return;
        }
        let latency = Duration::from_micros(wall_micros().saturating_sub(due_micros));
        self.recorder.record(Metric::SendToDelivered, latency);
        self.recorder.delivered();
        self.delivered.fetch_add(1, Ordering::Relaxed);
        let mut steps = self.steps.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(step) = steps
            .iter_mut()
            .find(|s| s.start <= due_micros && due_micros < s.end)
        {
            let _ = step.latencies.record(latency.as_micros().max(1) as u64);
        }
    }

    fn failed(&self, code: Code, due_micros: u64) {
        self.recorder.error(code);
        let mut steps = self.steps.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(step) = steps
            .iter_mut()
            .find(|s| s.start <= due_micros && due_micros < s.end)
        {
            step.errors += 1;
        }
    }
}

/// The marker of a load-test message: `lt <due micros> <padding>` in the
/// plaintext (full crypto), `lt-<worker>-<n>-<due micros>` as client_msg_id
/// (pre-encrypted).
fn body(due_micros: u64, size: usize) -> String {
    let mut s = format!("lt {due_micros} ");
    while s.len() < size {
        s.push('x');
    }
    s
}

fn due_of_body(body: &str) -> Option<u64> {
    body.strip_prefix("lt ")?.split(' ').next()?.parse().ok()
}

fn due_of_client_msg_id(id: &str) -> Option<u64> {
    id.strip_prefix("lt-")?.rsplit('-').next()?.parse().ok()
}

/// A worker's whole run.
pub struct Engine {
    args: RunArgs,
    url: String,
    local: Option<IpAddr>,
    run_id: String,
    state_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl Engine {
    pub fn new(args: RunArgs, url: String) -> Result<Self, Error> {
        let local = if args.source_ips.is_empty() {
            None
        } else {
            Some(args.source_ips[args.worker_index % args.source_ips.len()])
        };
        let run_id = args
            .run_id
            .clone()
            .unwrap_or_else(|| format!("{:08x}", rand::rng().random::<u32>()));
        let (state_dir, temp) = match &args.state_dir {
            Some(dir) => (dir.join(format!("w{}", args.worker_index)), None),
            None => {
                let temp = tempfile::tempdir()?;
                (temp.path().to_path_buf(), Some(temp))
            }
        };
        Ok(Self {
            args,
            url,
            local,
            run_id,
            state_dir,
            _temp: temp,
        })
    }

    fn user_name(&self, user: usize) -> String {
        format!("lt{}-w{}-u{user}", self.run_id, self.args.worker_index)
    }

    /// The users of each conversation, by scenario.
    fn conversations(&self) -> Vec<(ConversationKind, Vec<usize>)> {
        let users = self.args.users;
        let pairs = |range: std::ops::Range<usize>| {
            range
                .step_by(2)
                .filter(move |u| u + 1 < users)
                .map(|u| (ConversationKind::Direct, vec![u, u + 1]))
                .collect::<Vec<_>>()
        };
        let groups = |range: std::ops::Range<usize>, size: usize| {
            let end = range.end;
            range
                .step_by(size)
                .filter(move |u| u + size <= end)
                .map(move |u| (ConversationKind::Group, (u..u + size).collect()))
                .collect::<Vec<_>>()
        };
        match self.args.scenario {
            Scenario::OneToOne => pairs(0..users),
            Scenario::Group => groups(0..users, self.args.group_size),
            Scenario::Idle | Scenario::ReconnectStorm => Vec::new(),
            Scenario::Mixed => {
                // Users split in proportion to the mix, at least one group.
                let mix = self.args.mix;
                let share = mix.one_to_one as f64 / f64::from(mix.one_to_one + mix.group);
                let mut split = ((users as f64) * share) as usize & !1;
                split = split.min(users.saturating_sub(self.args.group_size));
                let mut all = pairs(0..split);
                all.extend(groups(split..users, self.args.group_size));
                all
            }
        }
    }

    fn client_config(&self, name: &str) -> ClientConfig {
        let mut config = ClientConfig::new(
            self.url.clone(),
            self.state_dir.join(name),
            "chappe-loadtest",
        );
        // Device state is a throwaway of the run: a cheap KDF keeps setup
        // measuring the platform, not Argon2.
        config.kdf = KdfParams::insecure_fast();
        config.local_address = self.local;
        config.request_timeout = self.args.request_timeout;
        config.send_attempts = 1;
        config
    }

    /// Runs the worker's part and returns its report.
    pub async fn run(self) -> Result<Report, Error> {
        let args = self.args.clone();
        let devices_total = args.users * args.devices_per_user;
        let setup_started = Instant::now();
        let recorder = Recorder::new(Instant::now());
        let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Delivered)>();

        // Devices; the server is sampled before they connect, and again at
        // the end while they are all still connected.
        let server_before = process_sample(args.server_pid);
        let metrics_before = scrape_all(&args.metrics_url, args.request_timeout).await;
        let devices = self.setup_devices(&recorder, tx.clone()).await?;

        // Conversations, and the sends each can make.
        let plan = self.conversations();
        let mut conversations = Vec::new();
        let mut slots = Vec::new();
        for (kind, members) in &plan {
            let creator = &devices[members[0] * args.devices_per_user];
            let others: Vec<UserId> = members[1..]
                .iter()
                .map(|u| UserId::parse(self.user_name(*u)))
                .collect::<Result<_, _>>()
                .map_err(|e| Error::Setup {
                    what: "user ids".into(),
                    message: e.to_string(),
                })?;
            let id = create_conversation(creator, *kind, &others).await?;
            let (payloads, session_id) = pre_encrypt(&args.message_sizes);
            let index = conversations.len();
            conversations.push(Conversation {
                id,
                payloads,
                session_id,
            });
            let recipients = (members.len() * args.devices_per_user) as u64 - 1;
            for member in members {
                slots.push(Slot {
                    device: member * args.devices_per_user,
                    conversation: index,
                    recipients,
                });
            }
        }
        let tally = Arc::new(Tally {
            recorder: recorder.clone(),
            seen: (0..devices.len()).map(|_| Mutex::default()).collect(),
            delivered: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            steps: Mutex::new(Vec::new()),
            payload_lengths: Mutex::new(
                conversations
                    .iter()
                    .flat_map(|c| c.payloads.iter().map(|(_, p)| p.len()))
                    .collect(),
            ),
        });
        let devices = Arc::new(devices);
        let conversations = Arc::new(conversations);

        // Full crypto: one warm-up send per slot shares the room keys, so
        // the measured phase measures messaging, not session setup.
        if args.crypto == Crypto::Full && !slots.is_empty() {
            let warmups = warm_up(&devices, &conversations, &slots, args.setup_concurrency).await;
            if let Err(e) = warmups {
                return Err(Error::Setup {
                    what: "room keys (warm-up sends)".into(),
                    message: e.message,
                });
            }
        }
        let setup_took = setup_started.elapsed();

        // Deliveries are counted from here on.
        {
            let tally = tally.clone();
            tokio::spawn(async move {
                while let Some((device, d)) = rx.recv().await {
                    match d {
                        Delivered::Body { message_id, body } => {
                            if let Some(due) = due_of_body(&body) {
                                tally.delivery(device, &message_id, due);
                            }
                        }
                        Delivered::Raw {
                            message_id,
                            client_msg_id,
                            length,
                        } => {
                            let Some(due) = due_of_client_msg_id(&client_msg_id) else {
                                continue;
                            };
                            let known = tally
                                .payload_lengths
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .contains(&length);
                            if known {
                                tally.delivery(device, &message_id, due);
                            } else {
                                tally.recorder.error(Code::DataLoss);
                            }
                        }
                    }
                }
            });
        }
        drop(tx);

        let progress =
            (!args.quiet).then(|| spawn_progress(recorder.clone(), devices.len() as u64));
        recorder.set_connected(devices.len() as u64);
        let measured = Instant::now();
        let mut notes = Vec::new();
        let mut step_windows = None;
        let started_at_unix_ms = wall_micros() / 1000;
        let ctx = SendCtx {
            devices: devices.clone(),
            conversations: conversations.clone(),
            tally: tally.clone(),
            worker: args.worker_index,
            seq: Arc::new(AtomicU64::new(0)),
            crypto: args.crypto,
            sizes: args.message_sizes.clone(),
        };
        match args.scenario {
            Scenario::Idle => tokio::time::sleep(args.steady).await,
            Scenario::ReconnectStorm => self.storm(&devices, &recorder).await,
            _ => match args.mode {
                Mode::Open => {
                    let rate = args.rate / args.worker_count as f64;
                    open_phases(&ctx, &slots, rate, &args).await;
                }
                Mode::Closed => closed(&ctx, &slots, &args).await,
                Mode::Step => {
                    step_windows = Some(step(&ctx, &slots, &args, recorder.origin()).await);
                }
            },
        }

        // Drain: wait for what was stored to arrive everywhere.
        let draining = Instant::now();
        let deadline = draining + args.drain_timeout;
        while tally.delivered.load(Ordering::Relaxed) < tally.expected.load(Ordering::Relaxed)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let drained_seconds = draining.elapsed().as_secs_f64();
        let measured_seconds = measured.elapsed().as_secs_f64();
        if let Some(p) = progress {
            p.abort();
        }
        let server_after = process_sample(args.server_pid);
        let metrics_after = scrape_all(&args.metrics_url, args.request_timeout).await;
        let mut server_metrics = match (server_before, server_after) {
            (Some(before), Some(after)) => {
                let per_device = (after.rss_bytes as f64 - before.rss_bytes as f64)
                    / devices.len().max(1) as f64;
                notes.push(format!(
                    "{} {}: RSS {} → {} bytes ({per_device:.0} bytes per device), CPU {:.2} s",
                    if args.embedded {
                        "this process (platform and load generator together)"
                    } else {
                        "server process"
                    },
                    args.server_pid.unwrap_or_default(),
                    before.rss_bytes,
                    after.rss_bytes,
                    after.cpu_seconds - before.cpu_seconds
                ));
                Some(serde_json::json!({
                    "pid": args.server_pid,
                    "rss_bytes_before": before.rss_bytes,
                    "rss_bytes_after": after.rss_bytes,
                    "rss_bytes_per_device": per_device,
                    "cpu_seconds": after.cpu_seconds - before.cpu_seconds,
                }))
            }
            _ => None,
        };

        if !args.metrics_url.is_empty() {
            let mut scraped = serde_json::Map::new();
            for (url, (before, after)) in args
                .metrics_url
                .iter()
                .zip(metrics_before.into_iter().zip(metrics_after))
            {
                let value = match (before, after) {
                    (Ok(before), Ok(after)) => crate::scrape::delta(&before, &after),
                    (Err(e), _) | (_, Err(e)) => {
                        notes.push(format!("metrics not scraped: {e}"));
                        serde_json::json!({ "error": e })
                    }
                };
                scraped.insert(url.clone(), value);
            }
            let entry = server_metrics.get_or_insert_with(|| serde_json::json!({}));
            if let Some(map) = entry.as_object_mut() {
                map.insert("prometheus".into(), serde_json::Value::Object(scraped));
            }
        }
        let measured_phase = match args.mode {
            Mode::Step => (0.0, 0.0),
            _ => (args.ramp_up.as_secs_f64(), args.steady.as_secs_f64()),
        };
        let meta = RunMeta {
            scenario: serde_json::to_value(args.scenario)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            parameters: serde_json::to_value(&args).unwrap_or_default(),
            load: LoadModel {
                mode: match args.mode {
                    Mode::Open => LoadMode::Open,
                    Mode::Closed => LoadMode::Closed,
                    Mode::Step => LoadMode::Step,
                },
                target_rate: match args.mode {
                    Mode::Open => Some(args.rate / args.worker_count as f64),
                    Mode::Step => Some(args.step_start),
                    Mode::Closed => None,
                },
                in_flight_per_device: (args.mode == Mode::Closed).then_some(args.in_flight as u32),
                warmup_s: measured_phase.0,
                measure_s: measured_phase.1,
                drain_s: drained_seconds,
                late_threshold_us: args.late_threshold.as_micros() as u64,
            },
            crypto: match args.crypto {
                Crypto::Full => CryptoMode::Full,
                Crypto::PreEncrypted => CryptoMode::PreEncrypted,
            },
            target: if args.embedded {
                "embedded".to_owned()
            } else {
                self.url.clone()
            },
            devices: devices_total as u64,
            worker: Worker {
                index: args.worker_index as u32,
                count: args.worker_count as u32,
            },
            started_at_unix_ms,
            machine: Machine::detect(),
            notes,
        };
        let mut report = recorder.finish(meta);
        report.setup = Some(SetupReport::new(devices_total as u64, setup_took));
        report.server_metrics = server_metrics;
        if let Some(windows) = step_windows {
            report
                .evaluate_steps(&windows, args.p99_threshold)
                .map_err(|e| Error::Setup {
                    what: "the step verdicts".into(),
                    message: e.to_string(),
                })?;
        }
        report.meta.notes.push(format!(
            "measured phase with drain: {measured_seconds:.1} s"
        ));
        Ok(report)
    }

    async fn setup_devices(
        &self,
        recorder: &Recorder,
        deliveries: mpsc::UnboundedSender<(usize, Delivered)>,
    ) -> Result<Vec<Device>, Error> {
        let args = &self.args;
        let permits = Arc::new(Semaphore::new(args.setup_concurrency));
        let mut tasks = JoinSet::new();
        for user in 0..args.users {
            for d in 0..args.devices_per_user {
                let index = user * args.devices_per_user + d;
                let name = self.user_name(user);
                let device_name = format!("d{d}");
                let config = self.client_config(&format!("{name}-{device_name}"));
                let (url, local, timeout) = (self.url.clone(), self.local, args.request_timeout);
                let crypto = args.crypto;
                let permits = permits.clone();
                let recorder = recorder.clone();
                let deliveries = deliveries.clone();
                tasks.spawn(async move {
                    let _permit = permits.acquire_owned().await;
                    let started = Instant::now();
                    let device = match crypto {
                        Crypto::Full => {
                            let client = Client::login_dev(config, &name, &device_name)
                                .await
                                .map_err(|e| (e.to_string(), code_of(&e)))?;
                            let connecting = Instant::now();
                            let mut events = client
                                .connect()
                                .await
                                .map_err(|e| (e.to_string(), code_of(&e)))?;
                            // Connected once the stream is open and answering.
                            let opened = tokio::time::timeout(timeout, async {
                                while let Some(event) = events.next().await {
                                    if matches!(event, Event::Connected) {
                                        return true;
                                    }
                                }
                                false
                            })
                            .await;
                            if opened != Ok(true) {
                                let message = "the stream did not open in time".to_owned();
                                return Err((message, Code::Unavailable));
                            }
                            recorder.record(Metric::Connect, connecting.elapsed());
                            tokio::spawn(forward_events(index, events, deliveries));
                            Device::Sdk(client)
                        }
                        Crypto::PreEncrypted => {
                            let raw = RawDevice::login(&url, local, &name, &device_name, timeout)
                                .await
                                .map_err(|e| (e.message.clone(), e.code))?;
                            let connecting = Instant::now();
                            let (tx, mut rx) = mpsc::unbounded_channel::<v1::Message>();
                            raw.connect(tx)
                                .await
                                .map_err(|e| (e.message.clone(), e.code))?;
                            recorder.record(Metric::Connect, connecting.elapsed());
                            tokio::spawn(async move {
                                while let Some(m) = rx.recv().await {
                                    let d = Delivered::Raw {
                                        message_id: m.message_id,
                                        client_msg_id: m.client_msg_id,
                                        length: m.ciphertext.len(),
                                    };
                                    if deliveries.send((index, d)).is_err() {
                                        return;
                                    }
                                }
                            });
                            Device::Raw(Arc::new(raw))
                        }
                    };
                    recorder.record(Metric::SessionSetup, started.elapsed());
                    Ok::<_, (String, Code)>((index, device))
                });
            }
        }
        let mut devices: Vec<Option<Device>> = (0..args.users * args.devices_per_user)
            .map(|_| None)
            .collect();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok((index, device))) => devices[index] = Some(device),
                Ok(Err((message, code))) => {
                    return Err(Error::Setup {
                        what: format!("a device ({code:?})"),
                        message,
                    });
                }
                Err(e) => {
                    return Err(Error::Setup {
                        what: "a device".into(),
                        message: e.to_string(),
                    });
                }
            }
        }
        Ok(devices.into_iter().flatten().collect())
    }

    /// Drops every connection at once and reconnects, `reconnects` times.
    async fn storm(&self, devices: &Arc<Vec<Device>>, recorder: &Recorder) {
        for _ in 0..self.args.reconnects {
            for d in devices.iter() {
                match d {
                    Device::Sdk(c) => c.disconnect(),
                    Device::Raw(r) => r.disconnect(),
                }
            }
            let mut tasks = JoinSet::new();
            for i in 0..devices.len() {
                let devices = devices.clone();
                let recorder = recorder.clone();
                tasks.spawn(async move {
                    let started = Instant::now();
                    let result = match &devices[i] {
                        Device::Sdk(c) => match c.connect().await {
                            Ok(events) => {
                                recorder.record(Metric::Connect, started.elapsed());
                                let syncing = Instant::now();
                                drop(events);
                                c.sync()
                                    .await
                                    .map(|_| syncing.elapsed())
                                    .map_err(|e| code_of(&e))
                            }
                            Err(e) => Err(code_of(&e)),
                        },
                        Device::Raw(r) => {
                            let (tx, _rx) = mpsc::unbounded_channel();
                            match r.connect(tx).await {
                                Ok(()) => {
                                    recorder.record(Metric::Connect, started.elapsed());
                                    let syncing = Instant::now();
                                    r.sync()
                                        .await
                                        .map(|_| syncing.elapsed())
                                        .map_err(|e| e.code)
                                }
                                Err(e) => Err(e.code),
                            }
                        }
                    };
                    match result {
                        Ok(sync) => recorder.record(Metric::Sync, sync),
                        Err(code) => recorder.error(code),
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        }
    }
}

/// A delivery as a device saw it.
enum Delivered {
    /// Decrypted by the SDK.
    Body { message_id: String, body: String },
    /// Received as ciphertext (pre-encrypted mode).
    Raw {
        message_id: String,
        client_msg_id: String,
        length: usize,
    },
}

async fn forward_events(
    index: usize,
    mut events: chappe_client::Events,
    deliveries: mpsc::UnboundedSender<(usize, Delivered)>,
) {
    while let Some(event) = events.next().await {
        if let Event::Message(m) = event {
            let d = Delivered::Body {
                message_id: m.message_id.to_string(),
                body: m.body,
            };
            if deliveries.send((index, d)).is_err() {
                return;
            }
        }
    }
}

async fn create_conversation(
    creator: &Device,
    kind: ConversationKind,
    others: &[UserId],
) -> Result<ConversationId, Error> {
    let setup = |message: String| Error::Setup {
        what: "a conversation".into(),
        message,
    };
    match creator {
        Device::Sdk(c) => c
            .create_conversation(kind, others)
            .await
            .map(|c| c.id)
            .map_err(|e| setup(e.to_string())),
        Device::Raw(r) => {
            let kind = match kind {
                ConversationKind::Direct => v1::ConversationKind::Direct,
                ConversationKind::Group => v1::ConversationKind::Group,
            };
            let created = r
                .gateway()
                .create_conversation(v1::CreateConversationRequest {
                    kind: kind as i32,
                    member_user_ids: others.iter().map(ToString::to_string).collect(),
                })
                .await
                .map_err(|e| setup(e.to_string()))?
                .into_inner();
            let id = created
                .conversation
                .map(|c| c.conversation_id)
                .unwrap_or_default();
            ConversationId::parse(&id).map_err(|e| setup(e.to_string()))
        }
    }
}

/// Real Megolm ciphertexts of every configured size, made once.
fn pre_encrypt(sizes: &[usize]) -> (Vec<(usize, Vec<u8>)>, String) {
    let mut session =
        vodozemac::megolm::GroupSession::new(vodozemac::megolm::SessionConfig::version_1());
    let payloads = sizes
        .iter()
        .map(|size| (*size, session.encrypt(body(0, *size)).to_bytes()))
        .collect();
    (payloads, session.session_id())
}

async fn warm_up(
    devices: &Arc<Vec<Device>>,
    conversations: &Arc<Vec<Conversation>>,
    slots: &[Slot],
    concurrency: usize,
) -> Result<(), CallError> {
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    for slot in slots {
        let (devices, conversations, slot) = (devices.clone(), conversations.clone(), slot.clone());
        let permits = permits.clone();
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            if let Device::Sdk(c) = &devices[slot.device] {
                c.send_text(&conversations[slot.conversation].id, "warmup")
                    .await
                    .map_err(|e| CallError {
                        code: code_of(&e),
                        message: e.to_string(),
                    })?;
            }
            Ok(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        if let Ok(Err(e)) = joined {
            return Err(e);
        }
    }
    Ok(())
}

/// What every send needs.
#[derive(Clone)]
struct SendCtx {
    devices: Arc<Vec<Device>>,
    conversations: Arc<Vec<Conversation>>,
    tally: Arc<Tally>,
    worker: usize,
    seq: Arc<AtomicU64>,
    crypto: Crypto,
    sizes: Vec<usize>,
}

impl SendCtx {
    /// One send due at `due_micros`; records stored or the error.
    async fn send(&self, slot: &Slot, due_micros: u64) {
        let recorder = &self.tally.recorder;
        recorder.sent();
        let size_index = if self.sizes.len() > 1 {
            rand::rng().random_range(0..self.sizes.len())
        } else {
            0
        };
        let conversation = &self.conversations[slot.conversation];
        let result: Result<(), Code> = match (&self.devices[slot.device], self.crypto) {
            (Device::Sdk(c), _) => c
                .send_text(&conversation.id, &body(due_micros, self.sizes[size_index]))
                .await
                .map(|_| ())
                .map_err(|e| code_of(&e)),
            (Device::Raw(r), _) => {
                let n = self.seq.fetch_add(1, Ordering::Relaxed);
                let send = SendMessage {
                    conversation_id: conversation.id.to_string(),
                    client_msg_id: format!("lt-{}-{n}-{due_micros}", self.worker),
                    ciphertext: conversation.payloads[size_index].1.clone(),
                    session_id: conversation.session_id.clone(),
                };
                match r.ask(client_frame::Body::Send(send)).await {
                    Ok(server_frame::Body::Sent(_)) => Ok(()),
                    Ok(_) => Err(Code::Internal),
                    Err(e) => Err(e.code),
                }
            }
        };
        match result {
            Ok(()) => {
                recorder.stored();
                recorder.record(
                    Metric::SendToStored,
                    Duration::from_micros(wall_micros().saturating_sub(due_micros)),
                );
                self.tally
                    .expected
                    .fetch_add(slot.recipients, Ordering::Relaxed);
                recorder.expect_deliveries(slot.recipients);
            }
            Err(code) => self.tally.failed(code, due_micros),
        }
    }
}

/// The open model over ramp-up, steady and ramp-down.
async fn open_phases(ctx: &SendCtx, slots: &[Slot], rate: f64, args: &RunArgs) {
    let phases = Phases {
        ramp_up: args.ramp_up.as_secs_f64(),
        steady: args.steady.as_secs_f64(),
        ramp_down: args.ramp_down.as_secs_f64(),
        rate,
    };
    open(
        ctx,
        slots,
        &phases,
        args.max_outstanding,
        args.late_threshold,
    )
    .await;
}

/// A rate profile: linear ramp up, flat, linear ramp down.
struct Phases {
    ramp_up: f64,
    steady: f64,
    ramp_down: f64,
    rate: f64,
}

impl Phases {
    fn total(&self) -> f64 {
        self.ramp_up + self.steady + self.ramp_down
    }

    fn count(&self) -> u64 {
        (self.rate * (self.ramp_up / 2.0 + self.steady + self.ramp_down / 2.0)).floor() as u64
    }

    /// When the `n`th send (from 0) is due, in seconds from the start: the
    /// inverse of the cumulative arrivals of the profile.
    fn due(&self, n: u64) -> f64 {
        let k = n as f64 + 1.0;
        let r = self.rate;
        let up = r * self.ramp_up / 2.0;
        if k <= up {
            return (2.0 * k * self.ramp_up / r).sqrt();
        }
        let flat = up + r * self.steady;
        if k <= flat {
            return self.ramp_up + (k - up) / r;
        }
        // Ramp down: k - flat = r (t - t²/(2D)); solve for t in [0, D].
        let d = self.ramp_down.max(1e-9);
        let left = (k - flat).min(r * d / 2.0);
        let disc = (1.0 - 2.0 * left / (r * d)).max(0.0);
        self.ramp_up + self.steady + d * (1.0 - disc.sqrt())
    }
}

/// Issues sends at their due times, whatever the server does.
async fn open(
    ctx: &SendCtx,
    slots: &[Slot],
    phases: &Phases,
    max_outstanding: usize,
    late: Duration,
) {
    if slots.is_empty() {
        return;
    }
    let start = Instant::now();
    let start_wall = wall_micros();
    let outstanding = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for n in 0..phases.count() {
        let due = Duration::from_secs_f64(phases.due(n).min(phases.total()));
        let due_at = start + due;
        tokio::time::sleep_until(due_at.into()).await;
        if Instant::now().duration_since(due_at) > late {
            ctx.tally.recorder.late();
        }
        if outstanding.load(Ordering::Relaxed) >= max_outstanding {
            ctx.tally.recorder.dropped();
            continue;
        }
        while tasks.try_join_next().is_some() {}
        let slot = slots[(n as usize) % slots.len()].clone();
        let due_micros = start_wall + due.as_micros() as u64;
        let (ctx, outstanding) = (ctx.clone(), outstanding.clone());
        outstanding.fetch_add(1, Ordering::Relaxed);
        tasks.spawn(async move {
            ctx.send(&slot, due_micros).await;
            outstanding.fetch_sub(1, Ordering::Relaxed);
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Each sender keeps `in_flight` sends outstanding for the whole run.
async fn closed(ctx: &SendCtx, slots: &[Slot], args: &RunArgs) {
    let until = Instant::now() + args.ramp_up + args.steady + args.ramp_down;
    let mut tasks = JoinSet::new();
    // Each device sends in each of its slots; slots of one device share it.
    for slot in slots {
        for _ in 0..args.in_flight {
            let (ctx, slot, think) = (ctx.clone(), slot.clone(), args.think_time);
            tasks.spawn(async move {
                while Instant::now() < until {
                    ctx.send(&slot, wall_micros()).await;
                    if !think.is_zero() {
                        tokio::time::sleep(think).await;
                    }
                }
            });
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// Raises the open-model rate until a step's p99 send→delivered breaks
/// the threshold (or a send fails); the knee is the last rate that held.
async fn step(ctx: &SendCtx, slots: &[Slot], args: &RunArgs, origin: Instant) -> Vec<StepWindow> {
    let threshold_us = args.p99_threshold.as_micros() as u64;
    let mut rate = args.step_start;
    let mut steps = Vec::new();
    while rate <= args.step_max {
        // Steps start on a whole second of the timeline, so the report's
        // per-second windows of two steps never share a second.
        let from_s = origin.elapsed().as_secs_f64().ceil() as u64;
        tokio::time::sleep_until((origin + Duration::from_secs(from_s)).into()).await;
        let per_worker = rate / args.worker_count as f64;
        let start = wall_micros();
        let length = args.step_duration.as_micros() as u64;
        {
            let mut windows = ctx.tally.steps.lock().unwrap_or_else(|e| e.into_inner());
            windows.push(LiveStep {
                start,
                end: start + length + 1,
                latencies: Histogram::new_with_bounds(1, 600_000_000, 3)
                    .unwrap_or_else(|_| unreachable!("valid histogram bounds")),
                errors: 0,
            });
        }
        let phases = Phases {
            ramp_up: 0.0,
            steady: args.step_duration.as_secs_f64(),
            ramp_down: 0.0,
            rate: per_worker,
        };
        open(
            ctx,
            slots,
            &phases,
            args.max_outstanding,
            args.late_threshold,
        )
        .await;
        // Let this step's deliveries land before judging it.
        let deadline = Instant::now() + args.p99_threshold * 4 + Duration::from_millis(500);
        while ctx.tally.delivered.load(Ordering::Relaxed)
            < ctx.tally.expected.load(Ordering::Relaxed)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (p99, errors) = {
            let windows = ctx.tally.steps.lock().unwrap_or_else(|e| e.into_inner());
            let w = windows
                .last()
                .unwrap_or_else(|| unreachable!("pushed above"));
            (w.latencies.value_at_quantile(0.99), w.errors)
        };
        let missing = ctx.tally.expected.load(Ordering::Relaxed)
            > ctx.tally.delivered.load(Ordering::Relaxed);
        let held = p99 <= threshold_us && errors == 0 && !missing;
        if !args.quiet {
            eprintln!(
                "step {rate:.0}/s: p99 {:.1} ms, errors {errors}{} → {}",
                p99 as f64 / 1000.0,
                if missing { ", deliveries missing" } else { "" },
                if held { "held" } else { "broke" }
            );
        }
        // The report judges each step again from the merged timeline
        // (exact across workers); this run stops where its own view broke.
        steps.push(StepWindow {
            rate,
            from_s,
            to_s: origin.elapsed().as_secs_f64().ceil() as u64,
        });
        if !held {
            break;
        }
        rate += args.step_increase;
    }
    steps
}

fn spawn_progress(recorder: Recorder, devices: u64) -> tokio::task::JoinHandle<()> {
    recorder.set_connected(devices);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            eprintln!("{}", recorder.progress());
        }
    })
}

async fn scrape_all(
    urls: &[String],
    timeout: Duration,
) -> Vec<Result<crate::scrape::Samples, String>> {
    let mut out = Vec::with_capacity(urls.len());
    for url in urls {
        out.push(crate::scrape::scrape(url, timeout).await);
    }
    out
}

/// Memory and CPU of a process on this machine, from /proc.
struct ProcessSample {
    rss_bytes: u64,
    cpu_seconds: f64,
}

fn process_sample(pid: Option<u32>) -> Option<ProcessSample> {
    let pid = pid?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ProcessSample {
        rss_bytes: rss_kib * 1024,
        cpu_seconds: ticks / 100.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_times_follow_the_profile() {
        let p = Phases {
            ramp_up: 2.0,
            steady: 10.0,
            ramp_down: 2.0,
            rate: 100.0,
        };
        assert_eq!(p.count(), 1_200);
        let dues: Vec<f64> = (0..p.count()).map(|n| p.due(n)).collect();
        assert!(
            dues.windows(2).all(|w| w[0] <= w[1]),
            "due times never go back"
        );
        // Half the ramp's sends happen in its second half.
        let in_ramp = dues.iter().filter(|d| **d <= 2.0).count();
        assert!((95..=105).contains(&in_ramp), "{in_ramp}");
        let steady = dues.iter().filter(|d| **d > 2.0 && **d <= 12.0).count();
        assert!((995..=1_005).contains(&steady), "{steady}");
        assert!(dues.last().copied().unwrap() <= 14.0 + 1e-9);
    }

    #[test]
    fn markers_round_trip() {
        assert_eq!(due_of_body(&body(123, 64)), Some(123));
        assert_eq!(body(123, 64).len(), 64);
        assert_eq!(due_of_client_msg_id("lt-0-5-987"), Some(987));
        assert_eq!(due_of_body("warmup"), None);
    }
}
