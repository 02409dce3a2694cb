//! The `chappe` command line: `up` runs the platform; the other verbs are a
//! client a person can use from a terminal, one device per profile.
//!
//! A profile is a device's encrypted state directory,
//! `$CHAPPE_HOME/profiles/<profile>` (`~/.chappe` by default), unlocked by
//! `CHAPPE_PASSPHRASE`. One process at a time may use a profile.
//!
//! Files: `send-file` encrypts and uploads a file with a progress bar
//! (resuming a cut upload of the same file to the same conversation), and
//! `download` finds the file's message, downloads, verifies and decrypts
//! it. `presence` shows who is around and sets whether others see one's
//! last-seen time.

use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use chappe_client::ids::{ConversationId, MessageId, UserId};
use chappe_client::{
    Client, ClientConfig, ConversationKind, DecryptedMessage, Event, Progress, SendFileOptions,
};
use chappe_storage::StoreLocation;
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
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
    /// keydir, fanout, presence, media and the gateway, with development
    /// logins.
    Up(UpArgs),
    /// Bring a store's schema to this version (a CQL keyspace: versioned
    /// migrations, idempotent, safe to run twice at once); prints the
    /// version.
    Migrate(MigrateArgs),
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
    /// Encrypt a file on this device and send it to a conversation; prints
    /// `sent <message-id> media <media-id> (...)`. Running it again for the
    /// same file and conversation resumes an upload that was cut, without
    /// resending what the server stored.
    SendFile(SendFileArgs),
    /// Download a file sent in a conversation, verify and decrypt it.
    #[command(long_about = DOWNLOAD_HELP)]
    Download(DownloadArgs),
    /// Show users' presence: online, away or offline, and when they were
    /// last seen (only users who share a conversation with you appear;
    /// others show as unknown). Also hides or shows your last-seen time.
    Presence(PresenceArgs),
}

const DOWNLOAD_HELP: &str = "\
Download a file sent in a conversation, verify and decrypt it.

ID is the message id that `chappe send-file` printed (and that `listen`,
`chat` and `history` show for a file), or the file's media id. The file's
key travels only inside that end-to-end-encrypted message, so the message is
looked up: first among what a sync brings (which also fetches pending room
keys), then by message id in each of your conversations (or only in
--conversation), then, for a media id, among the latest --search messages of
each.

DEST is a file path, or an existing directory to save the file in under the
name its sender gave. The file is written to a hidden temporary file beside
DEST and renamed to DEST only once every chunk and the whole file verified;
an existing DEST is replaced only with --force. The file is readable by its
owner only.";

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
    /// Keep data elsewhere than DATA_DIR/chappe.db: `embedded:PATH`, or a
    /// CQL cluster `scylla://host1:9042,host2/KEYSPACE?dc=DC&rf=DC:3`
    /// (migrated at start).
    #[arg(long, env = "CHAPPE_STORE")]
    pub store: Option<StoreLocation>,
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

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The store: `scylla://host1:9042,host2/KEYSPACE?dc=DC&rf=DC1:3,DC2:3`
    /// (see the README), or `embedded:PATH` (its tables are created on open).
    #[arg(long, env = "CHAPPE_STORE")]
    pub store: StoreLocation,
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

#[derive(Debug, Args)]
pub struct SendFileArgs {
    #[command(flatten)]
    pub profile: Profile,
    pub conversation: String,
    /// The file to send.
    pub path: PathBuf,
    /// No progress bar (there is none either when stdout is not a terminal).
    #[arg(long, short)]
    pub quiet: bool,
    /// Testing aid: cut the upload after this many chunks, as a lost
    /// connection would (exit 1); the next run resumes it.
    #[arg(long, hide = true)]
    pub stop_after_chunks: Option<u32>,
}

#[derive(Debug, Args)]
pub struct DownloadArgs {
    #[command(flatten)]
    pub profile: Profile,
    /// The message id of the file's message, or the file's media id.
    pub id: String,
    /// Where to save it: a file path, or an existing directory.
    pub dest: PathBuf,
    /// Look for the message only in this conversation.
    #[arg(long)]
    pub conversation: Option<String>,
    /// For a media id: how many of each conversation's latest messages to
    /// look through.
    #[arg(long, default_value_t = 1000)]
    pub search: usize,
    /// Replace DEST if it exists.
    #[arg(long)]
    pub force: bool,
    /// No progress bar (there is none either when stdout is not a terminal).
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct PresenceArgs {
    #[command(flatten)]
    pub profile: Profile,
    /// The users to show.
    #[arg(required_unless_present = "hide_last_seen")]
    pub users: Vec<String>,
    /// Hide your last-seen time from others (on), or show it again (off).
    #[arg(long, value_name = "on|off")]
    pub hide_last_seen: Option<OnOff>,
}

/// A switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
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
    let _ = match &m.attachment {
        None => writeln!(
            out,
            "<{}> {}/{}: {}",
            m.conversation_id, m.sender_user, m.sender_device, m.body
        ),
        Some(file) => writeln!(
            out,
            "<{}> {}/{}: [file {:?}, {} bytes; chappe download {} DEST]",
            m.conversation_id, m.sender_user, m.sender_device, file.name, file.size, m.message_id
        ),
    };
    let _ = out.flush();
}

/// A byte progress bar on stderr, hidden with `--quiet` or when stdout is
/// not a terminal.
fn progress_bar(quiet: bool, total: u64, what: &str) -> ProgressBar {
    if quiet || !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}

fn show_progress(bar: &ProgressBar) -> impl Fn(Progress) + '_ {
    move |p: Progress| {
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
    }
}

async fn send_file(args: SendFileArgs) -> Result<()> {
    let client = args.profile.open().await?;
    let id = conversation(&args.conversation)?;
    let size = tokio::fs::metadata(&args.path)
        .await
        .with_context(|| format!("cannot read {}", args.path.display()))?
        .len();
    let bar = progress_bar(args.quiet, size, "uploading");
    let options = SendFileOptions {
        upload_id: None,
        stop_after_chunks: args.stop_after_chunks,
    };
    let sent = client
        .send_file_with(&id, &args.path, options, show_progress(&bar))
        .await;
    bar.finish_and_clear();
    let sent = match sent {
        Ok(sent) => sent,
        Err(e @ chappe_client::Error::UploadInterrupted { .. }) => {
            bail!("{e}; run the same command again to resume the upload")
        }
        Err(e) if e.is_retryable() => {
            return Err(e).with_context(|| {
                format!(
                    "{} not sent; run the same command again to resume the upload",
                    args.path.display()
                )
            });
        }
        Err(e) => return Err(e).with_context(|| format!("{} not sent", args.path.display())),
    };
    println!(
        "sent {} media {} ({} chunks sent, {} already stored)",
        sent.sent.message_id, sent.media_id, sent.chunks_sent, sent.chunks_skipped
    );
    Ok(())
}

/// The message carrying the file `id` (a message id or a media id); see
/// `DOWNLOAD_HELP`.
async fn find_file(
    client: &Client,
    id: &str,
    only: Option<ConversationId>,
    search: usize,
) -> Result<DecryptedMessage> {
    let Ok(message_id) = MessageId::parse(id) else {
        bail!("{id:?} is neither a message id nor a media id (32 lowercase hex digits)");
    };
    let matches = |m: &DecryptedMessage| {
        only.is_none_or(|c| c == m.conversation_id)
            && (m.message_id == message_id
                || m.attachment.as_ref().is_some_and(|a| a.media_id == id))
    };
    // A sync fetches pending room keys, and brings messages not seen yet.
    for event in client.sync().await.context("sync failed")? {
        if let Event::Message(m) = event
            && matches(&m)
        {
            return Ok(m);
        }
    }
    let conversations = match only {
        Some(c) => vec![c],
        None => client
            .conversations()
            .await?
            .into_iter()
            .map(|c| c.id)
            .collect(),
    };
    for c in &conversations {
        let found = client
            .message(c, &message_id)
            .await
            .with_context(|| format!("message {id} cannot be read"))?;
        if let Some(m) = found {
            return Ok(m);
        }
    }
    if search > 0 {
        for c in &conversations {
            if let Some(m) = client.history(c, search).await?.into_iter().find(&matches) {
                return Ok(m);
            }
        }
    }
    bail!(
        "no message or file {id} in your conversations (looked through the latest {search} messages of each)"
    )
}

/// The last component of a sender-given name, if it is a usable file name.
fn safe_file_name(name: &str) -> Option<&str> {
    let base = name.rsplit(['/', '\\']).next()?;
    let bad = base.is_empty() || base == "." || base == ".." || base.chars().any(char::is_control);
    (!bad).then_some(base)
}

async fn download(args: DownloadArgs) -> Result<()> {
    let client = args.profile.open().await?;
    let only = args.conversation.as_deref().map(conversation).transpose()?;
    let message = find_file(&client, &args.id, only, args.search).await?;
    let Some(file) = &message.attachment else {
        bail!("message {} is not a file", message.message_id);
    };
    let dest = if args.dest.is_dir() {
        let Some(name) = safe_file_name(&file.name) else {
            bail!(
                "the file's name {:?} cannot be used here; give DEST as a file path",
                file.name
            );
        };
        args.dest.join(name)
    } else {
        args.dest.clone()
    };
    if !args.force && tokio::fs::symlink_metadata(&dest).await.is_ok() {
        bail!("{} exists; pass --force to replace it", dest.display());
    }
    let bar = progress_bar(args.quiet, file.size, "downloading");
    let done = client.download(file, &dest, show_progress(&bar)).await;
    bar.finish_and_clear();
    done.with_context(|| format!("{:?} not downloaded", file.name))?;
    println!(
        "downloaded {:?} ({} bytes) from {}/{} to {}",
        file.name,
        file.size,
        message.sender_user,
        message.sender_device,
        dest.display()
    );
    Ok(())
}

async fn presence(args: PresenceArgs) -> Result<()> {
    let client = args.profile.open().await?;
    if let Some(switch) = args.hide_last_seen {
        let hide = switch == OnOff::On;
        client.set_hide_last_seen(hide).await?;
        println!(
            "your last-seen time is {}",
            if hide { "hidden" } else { "shown" }
        );
    }
    let users = args
        .users
        .iter()
        .map(|u| UserId::parse(u.as_str()).with_context(|| format!("{u:?} is not a user id")))
        .collect::<Result<Vec<_>>>()?;
    if users.is_empty() {
        return Ok(());
    }
    let known = client.presence(&users).await?;
    let mut out = std::io::stdout().lock();
    for user in &users {
        match known.iter().find(|p| &p.user_id == user) {
            Some(p) => match p.last_seen_ms {
                Some(ms) => writeln!(out, "{user}  {}  last seen {}", p.state, utc(ms))?,
                None => writeln!(out, "{user}  {}", p.state)?,
            },
            None => writeln!(out, "{user}  unknown")?,
        }
    }
    Ok(())
}

/// `ms` since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Runs one command to completion.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Up(args) => up(args).await,
        Command::Migrate(args) => {
            let (_, version) = chappe_storage::AnyStore::migrate_and_open(&args.store)
                .await
                .with_context(|| format!("migrating {}", args.store))?;
            match version {
                Some(version) => println!("{}: schema version {version}", args.store),
                None => println!("{}: tables ready (embedded store)", args.store),
            }
            Ok(())
        }
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
        Command::SendFile(args) => send_file(args).await,
        Command::Download(args) => download(args).await,
        Command::Presence(args) => presence(args).await,
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
        Event::Typing {
            conversation_id,
            user_id,
            typing: true,
            ..
        } if only.is_none_or(|c| *c == conversation_id) => {
            eprintln!("<{conversation_id}> {user_id} is typing");
        }
        Event::PresenceChanged(p) => eprintln!("{} is {}", p.user_id, p.state),
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
    config.store = args.store.clone();
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
        "  store: {}, bus: {}",
        platform.store_location(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_764_583_445_123), "2025-12-01T10:04:05Z");
    }

    #[test]
    fn sender_file_names_are_sanitized() {
        assert_eq!(safe_file_name("report.pdf"), Some("report.pdf"));
        assert_eq!(safe_file_name("../../etc/passwd"), Some("passwd"));
        assert_eq!(safe_file_name("a\\b.txt"), Some("b.txt"));
        for bad in ["", "..", "dir/", "x\nx"] {
            assert_eq!(safe_file_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn file_verbs_parse() {
        let cli = Cli::try_parse_from([
            "chappe",
            "--passphrase",
            "pw",
            "presence",
            "--hide-last-seen",
            "on",
        ]);
        // --passphrase belongs to the subcommand.
        assert!(cli.is_err());
        let cli =
            Cli::try_parse_from(["chappe", "presence", "--passphrase", "pw", "alice"]).unwrap();
        assert!(matches!(cli.command, Command::Presence(ref a) if a.users == ["alice"]));
        let cli = Cli::try_parse_from([
            "chappe",
            "presence",
            "--passphrase",
            "pw",
            "--hide-last-seen",
            "on",
        ])
        .unwrap();
        assert!(
            matches!(cli.command, Command::Presence(ref a) if a.hide_last_seen == Some(OnOff::On))
        );
        assert!(Cli::try_parse_from(["chappe", "presence", "--passphrase", "pw"]).is_err());
        let cli = Cli::try_parse_from([
            "chappe",
            "send-file",
            "--passphrase",
            "pw",
            "c0",
            "/tmp/f",
            "--quiet",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::SendFile(ref a) if a.quiet));
        let cli = Cli::try_parse_from([
            "chappe",
            "download",
            "--passphrase",
            "pw",
            "0123",
            "out",
            "--force",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Download(ref a) if a.force && a.search == 1000));
    }
}
