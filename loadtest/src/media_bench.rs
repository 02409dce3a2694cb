//! `chappe-loadtest media`: how fast an encrypted file goes up and down
//! through a gateway, and how much memory the processes on its way take
//! while it does (issue 5: streaming, not buffering).
//!
//! One run: a file of `--size-mib` MiB of random (incompressible) bytes is
//! written chunk by chunk to a temporary directory, hashed as it is written;
//! a device of a fresh user uploads it with the SDK ([`Client::send_file`])
//! to a direct conversation with a second fresh user, whose device receives
//! the file message and downloads it ([`Client::download`]); the downloaded
//! plaintext's SHA-256 must equal the original's. Rates are plaintext bytes
//! over the wall time of each call: the upload's includes the SDK's first
//! pass over the file (it seals it once to learn the hashes it declares,
//! then again to send), also reported apart; the download's includes the
//! SDK's verification and the final fsync of the file.
//!
//! Memory: every `--pid NAME=PID` (and this process, as `loadtest`) is
//! sampled from `/proc/PID/status` (`VmRSS`) every `--sample-ms` by a
//! background task during each phase. Before each phase the kernel's peak
//! (`VmHWM`) is reset to the current RSS where allowed (writing `5` to
//! `/proc/PID/clear_refs`, a process of the same user), so that `VmHWM`
//! read after the phase is its exact peak, spikes between samples included.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use chappe_client::ids::UserId;
use chappe_client::{Attachment, Client, ClientConfig, ConversationKind, Event, KdfParams};
use clap::Args;
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::nats_bench::{cpu_seconds, loadavg};
use crate::report::Machine;

const MIB: u64 = 1024 * 1024;

/// `chappe-loadtest media`.
#[derive(Debug, Clone, Args)]
pub struct MediaBenchArgs {
    /// The gateway, e.g. http://127.0.0.1:7443 (its `--dev-login` on).
    #[arg(long, env = "CHAPPE_LOADTEST_TARGET")]
    pub target: String,
    /// Size of the file, in MiB.
    #[arg(long, default_value_t = 64)]
    pub size_mib: u64,
    /// A process to watch, as NAME=PID (repeatable): its RSS before, its
    /// peak during each phase, and its growth.
    #[arg(long = "pid", value_parser = parse_named_pid)]
    pub pids: Vec<NamedPid>,
    /// Interval of the RSS samples, in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub sample_ms: u64,
    /// Where the file, its download and the devices' state go (a temporary
    /// directory under it, removed at the end). Default: the system's.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The SDK's request timeout, which is also how long an upload or a
    /// download may stall before it is retried.
    #[arg(long, default_value = "10s", value_parser = crate::config::parse_duration)]
    pub request_timeout: Duration,
    /// How long the receiving device may wait for the file message.
    #[arg(long, default_value = "60s", value_parser = crate::config::parse_duration)]
    pub message_timeout: Duration,
    /// Write the JSON report here (`-`: standard output).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// A process to watch, as `NAME=PID` on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedPid {
    pub name: String,
    pub pid: u32,
}

/// Parses `gateway=1234`.
pub fn parse_named_pid(s: &str) -> Result<NamedPid, String> {
    let (name, pid) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=PID"))?;
    if name.is_empty() {
        return Err(format!("{s:?}: the name is empty"));
    }
    let pid = pid
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: {pid:?} is not a process id"))?;
    Ok(NamedPid {
        name: name.to_owned(),
        pid,
    })
}

/// One transfer: plaintext bytes over its wall time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transfer {
    pub seconds: f64,
    pub mib_per_s: f64,
    /// Upload: the SDK's first pass over the file (sealing it to learn the
    /// hashes), until the first chunk could go.
    pub first_pass_seconds: Option<f64>,
    /// Upload: the rate after the first pass.
    pub after_first_pass_mib_per_s: Option<f64>,
}

/// A watched process's memory during one phase, in bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseMemory {
    /// The highest `VmRSS` sampled.
    pub rss_peak_sampled: Option<u64>,
    /// `VmHWM` after the phase (its exact peak if `hwm_reset`).
    pub hwm: Option<u64>,
    /// Whether `VmHWM` was reset to the RSS at the start of the phase.
    pub hwm_reset: bool,
    pub rss_after: Option<u64>,
    pub samples: u64,
    /// CPU seconds (user + system) the process used during the phase.
    #[serde(default)]
    pub cpu_s: Option<f64>,
}

impl PhaseMemory {
    /// The phase's peak: the kernel's when it was reset, else the samples'.
    pub fn peak(&self) -> Option<u64> {
        if self.hwm_reset {
            self.hwm.max(self.rss_peak_sampled)
        } else {
            self.rss_peak_sampled
        }
    }
}

/// A watched process's memory over the run, in bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessMemory {
    pub name: String,
    pub pid: u32,
    /// `VmRSS` before the upload began.
    pub rss_before: u64,
    /// `VmHWM` before the run (the process's peak over its whole life).
    pub hwm_before: Option<u64>,
    pub upload: PhaseMemory,
    pub download: PhaseMemory,
    /// The higher of both phases' peaks.
    pub peak: u64,
    /// `peak − rss_before`.
    pub growth: i64,
}

/// The JSON report of `chappe-loadtest media`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MediaBenchReport {
    pub target: String,
    pub machine: Machine,
    pub size_bytes: u64,
    /// Plaintext bytes of every chunk but the last, and the chunks.
    pub chunk_bytes: u32,
    pub chunks: u32,
    /// Chunks the upload sent (all of them: the conversation is new).
    pub chunks_sent: u32,
    pub media_id: String,
    pub upload: Transfer,
    pub download: Transfer,
    /// From the end of the upload until the receiving device had the file
    /// message.
    pub message_seconds: f64,
    /// SHA-256 of the file written, hex.
    pub sha256: String,
    /// The downloaded file has the same length and SHA-256.
    pub verified: bool,
    pub sample_ms: u64,
    pub processes: Vec<ProcessMemory>,
    /// `/proc/loadavg` before the upload and after the download.
    pub loadavg_before: String,
    pub loadavg_after: String,
}

impl MediaBenchReport {
    pub fn from_json(text: &str) -> Result<Self> {
        Ok(serde_json::from_str(text)?)
    }

    /// The report as a table people read.
    pub fn to_text(&self) -> String {
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / MIB as f64);
        let opt_mib = |b: Option<u64>| b.map_or_else(|| "-".to_owned(), mib);
        let mut out = format!(
            "media through {}: {} ({} bytes, {} chunks of {} plaintext bytes), {} CPUs\n\
             load average before: {}\n",
            self.target,
            mib(self.size_bytes),
            self.size_bytes,
            self.chunks,
            self.chunk_bytes,
            self.machine.cpus,
            self.loadavg_before
        );
        out.push_str(&format!(
            "{:<9} {:>9} {:>9}\n",
            "transfer", "seconds", "MiB/s"
        ));
        out.push_str(&format!(
            "{:<9} {:>9.2} {:>9.1}",
            "upload", self.upload.seconds, self.upload.mib_per_s
        ));
        if let (Some(first), Some(rate)) = (
            self.upload.first_pass_seconds,
            self.upload.after_first_pass_mib_per_s,
        ) {
            out.push_str(&format!(
                "   (SDK's first pass over the file {first:.2} s; after it {rate:.1} MiB/s)"
            ));
        }
        out.push('\n');
        out.push_str(&format!(
            "{:<9} {:>9.2} {:>9.1}\n",
            "download", self.download.seconds, self.download.mib_per_s
        ));
        out.push_str(&format!(
            "file message reached the receiver {:.2} s after the upload; \
             download {} (SHA-256 {})\n",
            self.message_seconds,
            if self.verified { "verified" } else { "DIFFERS" },
            self.sha256
        ));
        out.push_str(&format!(
            "{:<10} {:>8} {:>11} {:>12} {:>14} {:>11} {:>15}  {}\n",
            "process",
            "pid",
            "RSS before",
            "upload peak",
            "download peak",
            "growth",
            "CPU s up/down",
            "VmHWM reset"
        ));
        let cpu = |s: Option<f64>| s.map_or_else(|| "-".to_owned(), |s| format!("{s:.1}"));
        for p in &self.processes {
            out.push_str(&format!(
                "{:<10} {:>8} {:>11} {:>12} {:>14} {:>11} {:>15}  {}\n",
                p.name,
                p.pid,
                mib(p.rss_before),
                opt_mib(p.upload.peak()),
                opt_mib(p.download.peak()),
                format!("{:+.1} MiB", p.growth as f64 / MIB as f64),
                format!("{}/{}", cpu(p.upload.cpu_s), cpu(p.download.cpu_s)),
                if p.upload.hwm_reset && p.download.hwm_reset {
                    "yes"
                } else {
                    "no (sampled peak)"
                }
            ));
        }
        out.push_str(&format!(
            "RSS sampled every {} ms; load average after: {}\n",
            self.sample_ms, self.loadavg_after
        ));
        out
    }
}

/// `chappe-loadtest media`: measures, prints, writes `--out`.
pub async fn run(args: MediaBenchArgs) -> Result<()> {
    let report = measure(args.clone()).await?;
    crate::output::emit(&report, args.out.as_deref(), || report.to_text())?;
    if !report.verified {
        bail!("the downloaded file differs from the uploaded one");
    }
    Ok(())
}

/// Runs the upload and the download and returns the report.
pub async fn measure(args: MediaBenchArgs) -> Result<MediaBenchReport> {
    if args.size_mib == 0 {
        bail!("--size-mib must be at least 1");
    }
    if args.sample_ms == 0 {
        bail!("--sample-ms must be at least 1");
    }
    let mut watched = vec![NamedPid {
        name: "loadtest".into(),
        pid: std::process::id(),
    }];
    watched.extend(args.pids.iter().cloned());
    for p in &watched {
        if read_status(p.pid).is_none() {
            bail!("cannot read /proc/{}/status ({}={})", p.pid, p.name, p.pid);
        }
    }

    let temp = match &args.dir {
        Some(dir) => tempfile::Builder::new()
            .prefix("chappe-media-bench-")
            .tempdir_in(dir),
        None => tempfile::Builder::new()
            .prefix("chappe-media-bench-")
            .tempdir(),
    }
    .context("creating the temporary directory")?;
    let size = args.size_mib * MIB;
    let run = format!("{:08x}", rand::random::<u32>());
    let source = temp.path().join(format!("bench-{run}.bin"));
    let dest = temp.path().join(format!("bench-{run}.down"));
    eprintln!("writing {} MiB to {}", args.size_mib, source.display());
    let sha256 = write_random_file(&source, size).await?;

    // Two fresh users, so that nothing of an earlier run is in the way.
    let config = |name: &str| {
        let mut config = ClientConfig::new(
            args.target.clone(),
            temp.path().join("devices").join(name),
            format!("{name} passphrase"),
        );
        config.kdf = KdfParams::insecure_fast();
        config.request_timeout = args.request_timeout;
        config
    };
    let (sender_name, receiver_name) = (format!("media-a-{run}"), format!("media-b-{run}"));
    let sender = Client::login_dev(config("sender"), &sender_name, "bench")
        .await
        .context("logging in the sender")?;
    let receiver = Client::login_dev(config("receiver"), &receiver_name, "bench")
        .await
        .context("logging in the receiver")?;
    let _sender_events = sender.connect().await.context("connecting the sender")?;
    let mut events = receiver
        .connect()
        .await
        .context("connecting the receiver")?;
    let conversation = sender
        .create_conversation(ConversationKind::Direct, &[UserId::parse(&receiver_name)?])
        .await
        .context("creating the conversation")?;

    let loadavg_before = loadavg();
    let before: Vec<(u64, Option<u64>)> = watched
        .iter()
        .map(|p| {
            let s = read_status(p.pid).unwrap_or_default();
            (s.rss.unwrap_or(0), s.hwm)
        })
        .collect();

    // Upload.
    eprintln!("uploading");
    let watch = Watch::start(&watched, Duration::from_millis(args.sample_ms));
    let began = Instant::now();
    let first_progress: Mutex<Option<Instant>> = Mutex::new(None);
    let sent = sender
        .send_file(&conversation.id, &source, |_| {
            let mut first = first_progress.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert_with(Instant::now);
        })
        .await
        .context("uploading the file")?;
    let upload_seconds = began.elapsed().as_secs_f64();
    let uploaded_at = Instant::now();
    let upload_memory = watch.finish().await;
    let first_pass = first_progress
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .map(|t| (t - began).as_secs_f64());

    let attachment = wait_for_file(&mut events, &sent.media_id, args.message_timeout).await?;
    let message_seconds = uploaded_at.elapsed().as_secs_f64();

    // Download.
    eprintln!("downloading");
    let watch = Watch::start(&watched, Duration::from_millis(args.sample_ms));
    let began = Instant::now();
    receiver
        .download(&attachment, &dest, |_| {})
        .await
        .context("downloading the file")?;
    let download_seconds = began.elapsed().as_secs_f64();
    let download_memory = watch.finish().await;
    let loadavg_after = loadavg();

    let (got_len, got_sha) = hash_file(&dest).await?;
    let verified = got_len == size && got_sha == sha256;
    sender.disconnect();
    receiver.disconnect();

    let rate = |seconds: f64| size as f64 / MIB as f64 / seconds;
    let processes = watched
        .iter()
        .zip(before)
        .zip(upload_memory.into_iter().zip(download_memory))
        .map(|((p, (rss_before, hwm_before)), (upload, download))| {
            let peak = [upload.peak(), download.peak(), Some(rss_before)]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(rss_before);
            ProcessMemory {
                name: p.name.clone(),
                pid: p.pid,
                rss_before,
                hwm_before,
                upload,
                download,
                peak,
                growth: peak as i64 - rss_before as i64,
            }
        })
        .collect();
    Ok(MediaBenchReport {
        target: args.target.clone(),
        machine: Machine::detect(),
        size_bytes: size,
        chunk_bytes: attachment.chunk_size,
        chunks: u32::try_from(size.div_ceil(u64::from(attachment.chunk_size.max(1))))
            .unwrap_or(u32::MAX),
        chunks_sent: sent.chunks_sent,
        media_id: sent.media_id.clone(),
        upload: Transfer {
            seconds: upload_seconds,
            mib_per_s: rate(upload_seconds),
            first_pass_seconds: first_pass,
            after_first_pass_mib_per_s: first_pass.map(|f| rate(upload_seconds - f)),
        },
        download: Transfer {
            seconds: download_seconds,
            mib_per_s: rate(download_seconds),
            first_pass_seconds: None,
            after_first_pass_mib_per_s: None,
        },
        message_seconds,
        sha256: hex(&sha256),
        verified,
        sample_ms: args.sample_ms,
        processes,
        loadavg_before,
        loadavg_after,
    })
}

/// Waits for the file message carrying `media_id`.
async fn wait_for_file(
    events: &mut chappe_client::Events,
    media_id: &str,
    within: Duration,
) -> Result<Attachment> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let event = tokio::time::timeout_at(deadline, events.next())
            .await
            .map_err(|_| anyhow::anyhow!("the receiver got no file message within {within:?}"))?
            .context("the receiver's events ended")?;
        if let Event::Message(m) = event
            && let Some(attachment) = m.attachment
            && attachment.media_id == media_id
        {
            return Ok(attachment);
        }
    }
}

/// Block size of writing and hashing files.
const BLOCK: usize = MIB as usize;

/// Writes `size` random bytes to `path`, a block at a time; returns their
/// SHA-256.
async fn write_random_file(path: &Path, size: u64) -> Result<[u8; 32]> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || -> Result<[u8; 32]> {
        let mut file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut rng = rand::rng();
        let mut hasher = Sha256::new();
        let mut block = vec![0u8; BLOCK];
        let mut left = size;
        while left > 0 {
            let n = usize::try_from(left.min(BLOCK as u64)).unwrap_or(BLOCK);
            let block = &mut block[..n];
            rng.fill_bytes(block);
            hasher.update(&*block);
            file.write_all(block)
                .with_context(|| format!("writing {}", path.display()))?;
            left -= n as u64;
        }
        file.flush()?;
        Ok(hasher.finalize().into())
    })
    .await
    .context("the file writer")?
}

/// The length and SHA-256 of a file, read a block at a time.
async fn hash_file(path: &Path) -> Result<(u64, [u8; 32])> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || -> Result<(u64, [u8; 32])> {
        let mut file =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut hasher = Sha256::new();
        let mut block = vec![0u8; BLOCK];
        let mut len = 0u64;
        loop {
            let n = file
                .read(&mut block)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&block[..n]);
            len += n as u64;
        }
        Ok((len, hasher.finalize().into()))
    })
    .await
    .context("the file reader")?
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `VmRSS` and `VmHWM` of a process, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryStatus {
    pub rss: Option<u64>,
    pub hwm: Option<u64>,
}

/// Reads `/proc/PID/status`; `None` if the process is gone (or not ours to
/// read).
pub fn read_status(pid: u32) -> Option<MemoryStatus> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    Some(MemoryStatus {
        rss: field("VmRSS:"),
        hwm: field("VmHWM:"),
    })
}

/// Resets the kernel's peak RSS (`VmHWM`) of `pid` to its current RSS.
fn reset_hwm(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// A background task sampling the RSS of some processes until finished.
struct Watch {
    pids: Vec<u32>,
    reset: Vec<bool>,
    cpu_before: Vec<Option<f64>>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<(Option<u64>, u64)>>,
}

impl Watch {
    fn start(watched: &[NamedPid], every: Duration) -> Watch {
        let pids: Vec<u32> = watched.iter().map(|p| p.pid).collect();
        let reset = pids.iter().map(|&pid| reset_hwm(pid)).collect();
        let cpu_before = pids
            .iter()
            .map(|pid| cpu_seconds(&pid.to_string()))
            .collect();
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let sampled = pids.clone();
        let task = tokio::spawn(async move {
            let mut peaks: Vec<(Option<u64>, u64)> = vec![(None, 0); sampled.len()];
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {}
                }
                for (pid, (peak, samples)) in sampled.iter().zip(peaks.iter_mut()) {
                    if let Some(rss) = read_status(*pid).and_then(|s| s.rss) {
                        *peak = Some(peak.map_or(rss, |p| p.max(rss)));
                        *samples += 1;
                    }
                }
            }
            peaks
        });
        Watch {
            pids,
            reset,
            cpu_before,
            stop,
            task,
        }
    }

    /// Stops sampling; one [`PhaseMemory`] per watched process.
    async fn finish(self) -> Vec<PhaseMemory> {
        let _ = self.stop.send(());
        let peaks = self.task.await.unwrap_or_default();
        self.pids
            .iter()
            .zip(self.reset)
            .zip(self.cpu_before)
            .enumerate()
            .map(|(i, ((&pid, reset), cpu_before))| {
                let cpu_after = cpu_seconds(&pid.to_string());
                let status = read_status(pid).unwrap_or_default();
                let (peak, samples) = peaks.get(i).copied().unwrap_or((None, 0));
                PhaseMemory {
                    rss_peak_sampled: peak,
                    hwm: status.hwm,
                    hwm_reset: reset,
                    rss_after: status.rss,
                    samples,
                    cpu_s: cpu_after.zip(cpu_before).map(|(a, b)| a - b),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_pids_parse() {
        assert_eq!(
            parse_named_pid("gateway=42"),
            Ok(NamedPid {
                name: "gateway".into(),
                pid: 42
            })
        );
        assert!(parse_named_pid("42").is_err());
        assert!(parse_named_pid("=42").is_err());
        assert!(parse_named_pid("media=x").is_err());
    }

    #[test]
    fn this_process_has_a_status() {
        let s = read_status(std::process::id()).unwrap();
        assert!(s.rss.unwrap() > 0);
        assert!(s.hwm.unwrap() >= s.rss.unwrap());
    }
}
