//! The `chappe` command line: `up` runs the platform; the other verbs are a
//! client a person can use from a terminal, one device per profile.
//!
//! A profile is a device's encrypted state directory,
//! `$CHAPPE_HOME/profiles/<profile>` (`~/.chappe` by default), unlocked by
//! `CHAPPE_PASSPHRASE`. One process at a time may use a profile.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use chappe_client::ids::{ConversationId, UserId};
use chappe_client::{Client, ClientConfig, ConversationKind, DecryptedMessage, Event};
use clap::{Args, Parser, Subcommand};
use tokio::io::AsyncBufReadExt;

use crate::platform::{BusChoice, Platform, PlatformConfig};
use chappe_bus::nats::NatsConfig;
use chappe_telemetry::program::{MetricsListen, ServiceTelemetry, ports};

/// Chappe: sovereign end-to-end-encrypted messaging.
#[derive(Debug, Parser)]
#[command(name = "chappe", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr: text or json.
    #[arg(long, env = "CHAPPE_LOG_FORMAT", default_value = "text", global = true)]
    pub log_format: chappe_telemetry::LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run every service in this process: embedded store, in-process bus,
    /// keydir, fanout and the gateway, with development logins.
    Up(UpArgs),
    /// Log a device in as a development user; creates its keys the first time.
    Login(LoginArgs),
    /// Create a conversation with other users; prints its id.
    Create(CreateArgs),
    /// List this user's conversations.
    Conversations(Profile),
    /// Send one message.
    Send(SendArgs),
    /// Print messages as they arrive, decrypted.
    Listen(Profile),
    /// Chat in one conversation: each line typed is sent, arrivals are printed.
    Chat(ChatArgs),
    /// Print a conversation's latest messages, decrypted.
    History(HistoryArgs),
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Address of the gateway.
    #[arg(long, env = "CHAPPE_LISTEN", default_value = "127.0.0.1:7443")]
    pub listen: SocketAddr,
    /// Talk over this NATS server (JetStream enabled) instead of the
    /// in-process bus, e.g. nats://127.0.0.1:4222.
    #[arg(long, env = "CHAPPE_NATS_URL")]
    pub nats: Option<String>,
    /// Directory of the embedded database and development secrets.
    #[arg(long, env = "CHAPPE_DATA_DIR", default_value = "chappe-data")]
    pub data_dir: PathBuf,
    /// Largest frame a client may send, in bytes.
    #[arg(long, env = "CHAPPE_MAX_FRAME_BYTES", default_value_t = 256 * 1024)]
    pub max_frame_bytes: usize,
    /// Largest message ciphertext, in bytes.
    #[arg(long, env = "CHAPPE_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,
    /// Most members of a group.
    #[arg(long, env = "CHAPPE_MAX_GROUP_MEMBERS", default_value_t = 1_000)]
    pub max_group_members: usize,
    /// Messages per second a device may send (and burst above it).
    #[arg(long, env = "CHAPPE_SEND_RATE", default_value_t = 50)]
    pub send_rate: u32,
    #[arg(long, env = "CHAPPE_SEND_BURST", default_value_t = 200)]
    pub send_burst: u32,
    /// Address of the operations HTTP server: `/metrics` (Prometheus, one
    /// registry for every service of the process), `/healthz`, `/readyz`.
    /// Default 127.0.0.1:9470, or a free port when that one is taken (the
    /// banner names it); an address given here must bind.
    #[arg(long, env = "CHAPPE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// OTLP/gRPC collector to export traces to (`http://collector:4317`).
    /// Off when unset; OTEL_EXPORTER_OTLP_ENDPOINT is honoured too.
    #[arg(long, env = "CHAPPE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// Which device this command acts as.
#[derive(Debug, Clone, Args)]
pub struct Profile {
    /// The device profile to use.
    #[arg(long, env = "CHAPPE_PROFILE", default_value = "default")]
    pub profile: String,
    /// Where profiles live (default ~/.chappe).
    #[arg(long, env = "CHAPPE_HOME")]
    pub home: Option<PathBuf>,
    /// Unlocks the profile's encrypted state.
    #[arg(long, env = "CHAPPE_PASSPHRASE", hide_env_values = true)]
    pub passphrase: String,
    /// The gateway; several, comma-separated, to fail over from one to the
    /// next when one is unreachable or drains.
    #[arg(
        long,
        env = "CHAPPE_SERVER",
        default_value = "http://127.0.0.1:7443",
        value_delimiter = ','
    )]
    pub server: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    #[command(flatten)]
    pub profile: Profile,
    /// The user to log in as (development logins only).
    #[arg(long)]
    pub user: String,
    /// This device's name: letters, digits, '_' and '-', at most 32.
    #[arg(long)]
    pub device: String,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub profile: Profile,
    /// A group (any number of members) rather than a direct conversation.
    #[arg(long)]
    pub group: bool,
    /// The other members.
    #[arg(required = true)]
    pub members: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SendArgs {
    #[command(flatten)]
    pub profile: Profile,
    pub conversation: String,
    /// The message; several words are joined with spaces.
    #[arg(required = true)]
    pub text: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub profile: Profile,
    pub conversation: String,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub profile: Profile,
    pub conversation: String,
    /// How many of the latest messages.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
}

impl Profile {
    fn state_dir(&self) -> Result<PathBuf> {
        let home = match &self.home {
            Some(home) => home.clone(),
            None => std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".chappe"))
                .context("set CHAPPE_HOME or HOME")?,
        };
        if self.profile.is_empty()
            || self.profile.contains(['/', '\\'])
            || self.profile.starts_with('.')
        {
            bail!("profile name {:?} is not a plain name", self.profile);
        }
        Ok(home.join("profiles").join(&self.profile))
    }

    fn config(&self) -> Result<ClientConfig> {
        let (first, others) = self
            .server
            .split_first()
            .context("--server names no gateway")?;
        let mut config =
            ClientConfig::new(first.clone(), self.state_dir()?, self.passphrase.clone());
        config.failover_urls = others.to_vec();
        Ok(config)
    }

    async fn open(&self) -> Result<Client> {
        let dir = self.state_dir()?;
        if !dir.exists() {
            bail!(
                "profile {:?} has no device yet: run `chappe login --profile {} --user USER --device DEVICE` first",
                self.profile,
                self.profile
            );
        }
        Client::open(self.config()?)
            .await
            .with_context(|| format!("opening profile {:?}", self.profile))
    }
}

fn conversation(id: &str) -> Result<ConversationId> {
    ConversationId::parse(id).with_context(|| format!("{id:?} is not a conversation id"))
}

fn print_message(m: &DecryptedMessage) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "<{}> {}/{}: {}",
        m.conversation_id, m.sender_user, m.sender_device, m.body
    );
    let _ = out.flush();
}

/// Runs one command to completion.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Up(args) => up(args).await,
        Command::Login(args) => {
            let client = Client::login_dev(args.profile.config()?, &args.user, &args.device)
                .await
                .context("login failed")?;
            println!(
                "logged in as {}/{} (profile {:?})",
                client.user_id(),
                client.device_id(),
                args.profile.profile
            );
            Ok(())
        }
        Command::Create(args) => {
            let client = args.profile.open().await?;
            let members = args
                .members
                .iter()
                .map(|m| {
                    UserId::parse(m.as_str()).with_context(|| format!("{m:?} is not a user id"))
                })
                .collect::<Result<Vec<_>>>()?;
            let kind = if args.group {
                ConversationKind::Group
            } else {
                ConversationKind::Direct
            };
            let created = client.create_conversation(kind, &members).await?;
            println!("{}", created.id);
            Ok(())
        }
        Command::Conversations(profile) => {
            let client = profile.open().await?;
            for c in client.conversations().await? {
                let members: Vec<String> = c.members.iter().map(ToString::to_string).collect();
                println!("{}  {}", c.id, members.join(", "));
            }
            Ok(())
        }
        Command::Send(args) => {
            let client = args.profile.open().await?;
            let id = conversation(&args.conversation)?;
            let sent = client.send_text(&id, &args.text.join(" ")).await?;
            println!("sent {}", sent.message_id);
            Ok(())
        }
        Command::Listen(profile) => {
            let client = profile.open().await?;
            let mut events = client.connect().await?;
            eprintln!("listening as {}/{}", client.user_id(), client.device_id());
            while let Some(event) = events.next().await {
                show(event, None);
            }
            Ok(())
        }
        Command::Chat(args) => chat(args).await,
        Command::History(args) => {
            let client = args.profile.open().await?;
            let id = conversation(&args.conversation)?;
            for m in client.history(&id, args.limit).await? {
                print_message(&m);
            }
            Ok(())
        }
    }
}

fn show(event: Event, only: Option<&ConversationId>) {
    match event {
        Event::Message(m) if only.is_none_or(|c| *c == m.conversation_id) => print_message(&m),
        Event::Undecryptable {
            conversation_id,
            message_id,
            reason,
            ..
        } if only.is_none_or(|c| *c == conversation_id) => {
            eprintln!("<{conversation_id}> message {message_id} cannot be decrypted yet: {reason}");
        }
        Event::Disconnected { reason } => eprintln!("disconnected ({reason}); reconnecting"),
        _ => {}
    }
}

async fn chat(args: ChatArgs) -> Result<()> {
    let client = args.profile.open().await?;
    let id = conversation(&args.conversation)?;
    let mut events = client.connect().await?;
    eprintln!(
        "chatting in {id} as {}/{}; type a line and press enter, Ctrl-D to leave",
        client.user_id(),
        client.device_id()
    );
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(event) => show(event, Some(&id)),
                None => bail!("the connection closed"),
            },
            line = lines.next_line() => match line? {
                Some(line) if line.trim().is_empty() => {}
                Some(line) => {
                    if let Err(e) = client.send_text(&id, &line).await {
                        eprintln!("not sent: {e}");
                    }
                }
                None => return Ok(()),
            },
        }
    }
}

async fn up(args: UpArgs) -> Result<()> {
    let mut config = PlatformConfig::new(&args.data_dir);
    if let Some(url) = &args.nats {
        config.bus = BusChoice::Nats(Box::new(NatsConfig::with_url(url.clone())));
    }
    config.gateway.listen = args.listen;
    config.gateway.max_frame_bytes = args.max_frame_bytes;
    config.gateway.send_rate_per_second = args.send_rate;
    config.gateway.send_burst = args.send_burst;
    config.fanout.max_message_bytes = args.max_message_bytes;
    config.fanout.max_group_members = args.max_group_members;
    if args.max_message_bytes >= args.max_frame_bytes {
        bail!("--max-message-bytes must be smaller than --max-frame-bytes");
    }
    let platform = Platform::start(config)
        .await
        .context("the platform did not start")?;
    let telemetry = ServiceTelemetry::start(
        "chappe",
        MetricsListen::or_default(args.metrics_listen, ports::UP),
        args.otlp_endpoint.as_deref(),
        platform.readiness(),
    )
    .await;
    let telemetry = match telemetry {
        Ok(t) => t,
        Err(e) => {
            let _ = platform.shutdown().await;
            return Err(e).context("telemetry did not start");
        }
    };
    let url = platform.gateway_url();
    println!("Chappe is up: gateway {url}");
    println!("  metrics: http://{}/metrics", telemetry.addr());
    println!(
        "  store: {} (embedded SQLite), bus: {}",
        platform.store().path().display(),
        match &args.nats {
            Some(url) => format!("NATS at {url}"),
            None => "in-process".to_owned(),
        }
    );
    println!("  log in a device (development users, any name):");
    println!(
        "    CHAPPE_PASSPHRASE=... chappe login --server {url} --profile alice --user alice --device laptop"
    );
    println!("  stop with Ctrl-C");
    let _ = std::io::stdout().flush();
    chappe_telemetry::shutdown_signal().await;
    eprintln!("shutting down");
    let stopped = platform.shutdown().await;
    telemetry.shutdown().await;
    stopped?;
    Ok(())
}
