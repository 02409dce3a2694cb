//! Command-line settings of a load run. Every knob is a named flag with a
//! documented default (`chappe-loadtest run --help`).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

/// What the simulated people do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Pairs of users in direct conversations; the first device of each sends.
    OneToOne,
    /// Groups of `--group-size` users; the first device of each member sends.
    Group,
    /// Devices connect and stay connected, sending nothing (memory and CPU
    /// per connected device, connect time).
    Idle,
    /// Devices connect, then all drop and reconnect at once, `--reconnects`
    /// times (connect and sync time under a storm).
    ReconnectStorm,
    /// Direct conversations and groups together, sends split by `--mix`,
    /// message sizes drawn from `--message-sizes`.
    Mixed,
}

/// How load is offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// A target arrival rate that does not slow down when the server does;
    /// latency counts from when each send was due (no coordinated omission).
    Open,
    /// `--in-flight` sends outstanding per sending device; latency counts
    /// from the actual send (what naive load tools report).
    Closed,
    /// Open model, rate raised by `--step-increase` every `--step-duration`
    /// until p99 send→delivered exceeds `--p99-threshold`; reports the knee.
    Step,
}

/// How much of the crypto runs in the load generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Crypto {
    /// Every device is a full SDK client: Olm sessions, Megolm encryption,
    /// every recipient decrypts.
    Full,
    /// Real Megolm ciphertexts made before the run; recipients check ids and
    /// sizes. Keeps a small load generator from being the bottleneck.
    PreEncrypted,
}

/// Durations in reports and worker specs as people write them (`250ms`).
mod human_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_secs_f64() * 1000.0))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// Parses `250ms`, `5s`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .ok_or_else(|| format!("{s:?} needs a unit: ms, s, m or h"))?;
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{s:?}: unit must be ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{s:?}: {e}"))
}

/// Parses `one-to-one=70,group=30`.
pub fn parse_mix(s: &str) -> Result<Mix, String> {
    let mut mix = Mix {
        one_to_one: 0,
        group: 0,
    };
    for part in s.split(',') {
        let (name, weight) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected name=weight"))?;
        let weight: u32 = weight
            .parse()
            .map_err(|_| format!("{part:?}: bad weight"))?;
        match name {
            "one-to-one" => mix.one_to_one = weight,
            "group" => mix.group = weight,
            _ => return Err(format!("{name:?}: known kinds are one-to-one and group")),
        }
    }
    if mix.one_to_one + mix.group == 0 {
        return Err("the mix needs a positive weight".into());
    }
    Ok(mix)
}

/// Share of sends per conversation kind in the mixed scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mix {
    pub one_to_one: u32,
    pub group: u32,
}

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct RunArgs {
    /// Start a platform inside this process (embedded store, in-process bus)
    /// and load it: one command gives a number on a laptop.
    #[arg(long, conflicts_with = "target")]
    pub embedded: bool,
    /// The gateway to load, e.g. http://127.0.0.1:7443.
    #[arg(long, env = "CHAPPE_LOADTEST_TARGET")]
    pub target: Option<String>,
    #[arg(long, value_enum, default_value = "one-to-one")]
    pub scenario: Scenario,
    /// Simulated users (per worker process).
    #[arg(long, default_value_t = 20)]
    pub users: usize,
    /// Devices of each user; every one of them receives.
    #[arg(long, default_value_t = 1)]
    pub devices_per_user: usize,
    /// Members of each group (group and mixed scenarios).
    #[arg(long, default_value_t = 10)]
    pub group_size: usize,
    /// Sends per conversation kind in the mixed scenario.
    #[arg(long, default_value = "one-to-one=70,group=30", value_parser = parse_mix)]
    pub mix: Mix,
    #[arg(long, value_enum, default_value = "open")]
    pub mode: Mode,
    /// Target messages per second, all senders together (open mode; the
    /// whole run when several processes share it).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Sends outstanding per sending device (closed mode).
    #[arg(long, default_value_t = 1)]
    pub in_flight: usize,
    /// Pause between a send's answer and the next send (closed mode).
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    #[serde(with = "human_duration")]
    pub think_time: Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    #[serde(with = "human_duration")]
    pub ramp_up: Duration,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "human_duration")]
    pub steady: Duration,
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    #[serde(with = "human_duration")]
    pub ramp_down: Duration,
    /// First rate of step mode, and its increase per step.
    #[arg(long, default_value_t = 100.0)]
    pub step_start: f64,
    #[arg(long, default_value_t = 100.0)]
    pub step_increase: f64,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    #[serde(with = "human_duration")]
    pub step_duration: Duration,
    /// Step mode stops at this rate even if p99 still holds.
    #[arg(long, default_value_t = 100_000.0)]
    pub step_max: f64,
    /// The p99 send→delivered that a step must hold.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub p99_threshold: Duration,
    #[arg(long, value_enum, default_value = "full")]
    pub crypto: Crypto,
    /// Plaintext sizes in bytes, drawn uniformly per send.
    #[arg(long, default_value = "256", value_delimiter = ',')]
    pub message_sizes: Vec<usize>,
    /// Worker processes on this machine; their reports are merged exactly.
    #[arg(long, default_value_t = 1)]
    pub processes: usize,
    /// Source addresses, one per worker in turn (e.g. 127.0.0.2,127.0.0.3),
    /// to spread connections beyond one address's ports and one process's
    /// open files.
    #[arg(long, value_delimiter = ',')]
    pub source_ips: Vec<IpAddr>,
    /// Devices set up at once.
    #[arg(long, default_value_t = 32)]
    pub setup_concurrency: usize,
    /// Open mode: sends in flight beyond this are dropped (and counted).
    #[arg(long, default_value_t = 20_000)]
    pub max_outstanding: usize,
    /// A send issued later than this after it was due counts as late.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    #[serde(with = "human_duration")]
    pub late_threshold: Duration,
    /// How long to wait for the last deliveries after the last send.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    #[serde(with = "human_duration")]
    pub drain_timeout: Duration,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "human_duration")]
    pub request_timeout: Duration,
    /// Reconnections of every device (reconnect-storm scenario).
    #[arg(long, default_value_t = 3)]
    pub reconnects: usize,
    /// The server process, for memory and CPU per device (idle scenario
    /// against a target on this machine).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// The server's Prometheus endpoints (e.g. http://127.0.0.1:9090/metrics),
    /// scraped before and after the run; the report keeps the differences.
    #[arg(long, value_delimiter = ',')]
    pub metrics_url: Vec<String>,
    /// Device state directories (full crypto); default: a temporary directory.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Write the JSON report here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the HTML report here.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,
    /// Names this run's users so runs never collide (default: random).
    #[arg(long)]
    pub run_id: Option<String>,
    /// This worker's index among `--worker-count` (several machines, e.g.
    /// `$JOB_COMPLETION_INDEX` of an indexed Kubernetes Job); its users are
    /// its own and it offers 1/worker-count of `--rate`.
    #[arg(long, default_value_t = 0)]
    pub worker_index: usize,
    #[arg(long, default_value_t = 1)]
    pub worker_count: usize,
    /// The worker program of `--processes` (default: this one).
    #[arg(long, hide = true)]
    pub worker_exe: Option<PathBuf>,
}

impl RunArgs {
    /// Refuses settings that cannot make a meaningful run.
    pub fn validate(&self) -> Result<(), String> {
        if self.users == 0 || self.devices_per_user == 0 {
            return Err("--users and --devices-per-user must be at least 1".into());
        }
        if matches!(self.scenario, Scenario::OneToOne) && self.users < 2 {
            return Err("one-to-one needs at least 2 users".into());
        }
        if matches!(self.scenario, Scenario::Group | Scenario::Mixed)
            && (self.group_size < 2 || self.group_size > self.users)
        {
            return Err("--group-size must be between 2 and --users".into());
        }
        if self.rate <= 0.0 || self.step_start <= 0.0 || self.step_increase <= 0.0 {
            return Err("rates must be positive".into());
        }
        if self.in_flight == 0 || self.processes == 0 || self.setup_concurrency == 0 {
            return Err(
                "--in-flight, --processes and --setup-concurrency must be at least 1".into(),
            );
        }
        if self.message_sizes.is_empty()
            || self.message_sizes.iter().any(|s| *s == 0 || *s > 60_000)
        {
            return Err("--message-sizes must be between 1 and 60000 bytes".into());
        }
        if self.steady.is_zero() && !matches!(self.mode, Mode::Step) {
            return Err("--steady must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip_through_json_as_text() {
        #[derive(Serialize, Deserialize)]
        struct T {
            #[serde(with = "human_duration")]
            d: Duration,
        }
        let json = serde_json::to_string(&T {
            d: Duration::from_millis(250),
        })
        .unwrap();
        assert_eq!(json, r#"{"d":"250ms"}"#);
        let back: T = serde_json::from_str(r#"{"d":"0.5ms"}"#).unwrap();
        assert_eq!(back.d, Duration::from_micros(500));
    }

    #[test]
    fn durations_and_mixes_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5y").is_err());
        assert_eq!(parse_mix("one-to-one=1,group=3").unwrap().group, 3);
        assert!(parse_mix("group=0").is_err());
        assert!(parse_mix("lunch=3").is_err());
    }
}
